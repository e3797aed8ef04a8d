"""One L7 proxy worker process: serves every mode: l7 VIP of the spec file on its own
SO_REUSEPORT socket (the kernel spreads new connections over the workers), re-reads the spec
on SIGHUP without dropping connections, drains on SIGTERM. Started by lbctl.l7.supervisor."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Any

from lbctl.config import L7Route
from lbctl.l7.ejection import EjectionTable
from lbctl.l7.proxy import L7Settings, VipProxy, tls_context
from lbctl.l7.stats import Stats

log = logging.getLogger("lbctl.l7")


def settings_of(raw: dict[str, Any]) -> L7Settings:
    """A VIP's settings from the supervisor's JSON (lbctl.l7.supervisor.settings_dict)."""
    raw = dict(raw)
    raw["hash_on"] = tuple(raw["hash_on"]) if raw.get("hash_on") else None
    raw["groups"] = tuple((name, tuple(members)) for name, members in raw.get("groups", ()))
    raw["routes"] = tuple(L7Route(r["host"], r["path_prefix"], tuple(tuple(s) for s in r["split"]))
                          for r in raw.get("routes", ()))
    return L7Settings(**raw)


class Worker:
    def __init__(self, spec_path: str, stats_path: str | None):
        self.spec_path = spec_path
        self.stats = Stats(stats_path)
        self.vips: dict[str, VipProxy] = {}
        self.tls: dict[str, tuple[str | None, str | None, bool]] = {}
        self.stop = asyncio.Event()
        self.ejection: EjectionTable | None = None

    def read_spec(self) -> list[dict[str, Any]]:
        with open(self.spec_path) as f:
            spec = json.load(f)
        if self.ejection is None and spec.get("ejection_table"):
            # Opened once: the supervisor keeps one table for the life of its workers.
            self.ejection = EjectionTable(spec["ejection_table"])
        return list(spec["vips"])

    async def apply(self, spec: list[dict[str, Any]]) -> None:
        wanted = {v["vip"]: v for v in spec}
        for name in list(self.vips):
            tls_changed = name in wanted and self.tls.get(name) != _tls_of(wanted[name])
            if name not in wanted or tls_changed:
                await self.vips.pop(name).drain()
        for name, v in wanted.items():
            settings = settings_of(v["settings"])
            if name in self.vips:
                self.vips[name].update(settings, v["backends"])
                continue
            proxy = VipProxy(name, v["host"], v["port"], settings, v["backends"], self.stats,
                             self.ejection)
            ctx = tls_context(settings.tls_cert, settings.tls_key, settings.http2_tls) \
                if settings.tls_cert and settings.tls_key else None
            await proxy.start(ctx)
            self.vips[name] = proxy
            self.tls[name] = _tls_of(v)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        await self.apply(self.read_spec())
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload()))
        writer = loop.create_task(self._write_stats())
        print("ready", flush=True)
        await self.stop.wait()
        await asyncio.gather(*(v.drain() for v in self.vips.values()))
        writer.cancel()
        self.stats.write()
        return 0

    async def _reload(self) -> None:
        try:
            await self.apply(self.read_spec())
        except (OSError, ValueError, KeyError) as exc:
            log.error("L7 worker: spec not applied, the running one stays: %s", exc)

    async def _write_stats(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.stats.write()
            await asyncio.sleep(1.0)


def _tls_of(v: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    # ALPN is fixed in the listening socket's TLS context: offering h2 or not restarts it too.
    return v["settings"].get("tls_cert"), v["settings"].get("tls_key"), v["settings"].get("http2_tls", True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbctl.l7.worker")
    parser.add_argument("--spec", required=True, help="the JSON spec the supervisor writes")
    parser.add_argument("--stats", help="where this worker writes its counters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lbctl-l7 %(levelname)s: %(message)s")
    worker = Worker(args.spec, args.stats)
    try:
        import uvloop  # libuv's loop: fewer syscalls and less per-callback overhead than asyncio's
        return uvloop.run(worker.main())
    except ImportError:
        return asyncio.run(worker.main())


if __name__ == "__main__":
    sys.exit(main())
