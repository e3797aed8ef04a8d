"""Starts, reconfigures and stops the L7 proxy's worker processes (one per core by default):
writes the spec they read, SIGHUPs them on a change, SIGTERMs them (they drain) on stop."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from lbctl.config import L7Spec, VipEntry
from lbctl.errors import LbctlError
from lbctl.l7.ejection import FIRST_SLOT, SLOTS, EjectionTable, create
from lbctl.l7.stats import totals
from xdp.codec import Endpoint


class L7StartError(LbctlError):
    exit_code = 1


def settings_dict(spec: L7Spec) -> dict[str, Any]:
    """The spec as the workers read it (JSON: tuples become lists; lbctl.l7.worker.settings_of
    makes the L7Spec again)."""
    return asdict(spec)


def worker_spec(vips: dict[Endpoint, VipEntry], is_up: Callable[[Endpoint, str], bool]) -> dict[str, Any]:
    """What the workers serve: each L7 VIP, its settings and its backends with the agent's
    view of their health."""
    out = []
    for vip, entry in sorted(vips.items()):
        if entry.mode != "l7" or entry.l7 is None:
            continue
        out.append({"vip": f"{vip.addr}:{vip.port}", "host": vip.addr, "port": vip.port,
                    "settings": settings_dict(entry.l7),
                    "backends": [{"name": b.name, "addr": b.addr, "port": b.port, "weight": b.weight,
                                  "state": b.state, "up": is_up(vip, b.name)}
                                 for b in entry.spec.backends]})
    return {"vips": out}


class L7Supervisor:
    def __init__(self, run_dir: str, workers: int = 0):
        self.run_dir = run_dir
        self.count = workers or os.cpu_count() or 1
        self.spec_path = os.path.join(run_dir, "l7-spec.json")
        self.stats_dir = os.path.join(run_dir, "l7-stats")
        self.table_path = os.path.join(self.stats_dir, "ejection.bin")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.table: EjectionTable | None = None
        self.slots: dict[tuple[str, str], int] = {}     # (VIP, backend) -> ejection table slot

    def _assign_slots(self, spec: dict[str, Any]) -> None:
        """A backend keeps its slot while it stays (its failures and ejection with it); a new
        one gets a free slot, zeroed."""
        assert self.table is not None
        wanted = [(v["vip"], b["name"]) for v in spec["vips"] for b in v["backends"]]
        self.slots = {key: slot for key, slot in self.slots.items() if key in set(wanted)}
        free = iter(sorted(set(range(FIRST_SLOT, SLOTS)) - set(self.slots.values())))
        for key in wanted:
            if key not in self.slots:
                slot = next(free, None)
                if slot is None:
                    continue          # past SLOTS backends: that one ejects per worker
                self.table.reset(slot)
                self.slots[key] = slot
        for v in spec["vips"]:
            for b in v["backends"]:
                b["eject_slot"] = self.slots.get((v["vip"], b["name"]))
        spec["ejection_table"] = self.table_path

    def _write(self, spec: dict[str, Any]) -> None:
        os.makedirs(self.stats_dir, exist_ok=True)
        if self.table is None:
            create(self.table_path)
            self.table = EjectionTable(self.table_path)
        self._assign_slots(spec)
        tmp = f"{self.spec_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(spec, f)
        os.replace(tmp, self.spec_path)

    def start(self, spec: dict[str, Any]) -> None:
        """Starts the workers and waits until each listens; a worker that cannot (address not
        here, port taken) stops them all and raises with its message."""
        self._write(spec)
        for i in range(self.count):
            # stderr is the caller's (the agent's journal), never an unread pipe that would
            # block a worker that logs.
            proc = subprocess.Popen(
                [sys.executable, "-m", "lbctl.l7.worker", "--spec", self.spec_path,
                 "--stats", os.path.join(self.stats_dir, f"worker-{i}.json")],
                stdout=subprocess.PIPE)
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                status = proc.wait()
                self.stop()
                self.cleanup()
                raise L7StartError(f"the L7 proxy did not start (worker exit status {status}, its "
                                   "error is logged above); hint: is the VIP's port free?")

    def reload(self, spec: dict[str, Any]) -> None:
        self._write(spec)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM: each worker stops accepting, finishes what is in flight, exits."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []

    def cleanup(self) -> None:
        """Removes the spec and the workers' counters (after stop)."""
        for path in [self.spec_path] + [os.path.join(self.stats_dir, n)
                                        for n in (os.listdir(self.stats_dir)
                                                  if os.path.isdir(self.stats_dir) else [])]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.stats_dir)
        if self.table is not None:
            self.table.close()
            self.table = None

    def totals(self) -> dict[str, Any]:
        return totals(self.stats_dir)
