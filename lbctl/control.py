"""The control-plane library the CLI calls: one function per user action, each validated,
planned and applied under a lock so concurrent lbctl commands never interleave."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from lbctl import planner
from lbctl.errors import ConflictError
from lbctl.model import BackendSpec, Config, VipSpec, with_backend, without_backend
from xdp.balancer import Attachment, Balancer, require_root
from xdp.codec import Endpoint
from xdp.limits import DEFAULT_LIMITS, Limits

LOCK_DIR = "/run/lbctl"


@dataclass
class Result:
    """What a change did: the plan's lines, and whether it was applied."""

    plan: planner.Plan
    applied: bool


class Controller:
    def __init__(self, instance: str = "host", limits: Limits = DEFAULT_LIMITS, maglev_seed: int = 0):
        self.instance = instance
        self.limits = limits
        self.maglev_seed = maglev_seed
        self.balancer = Balancer(instance, limits)

    # -- locking and the change pipeline ----------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        require_root()
        os.makedirs(LOCK_DIR, exist_ok=True)
        with open(os.path.join(LOCK_DIR, f"{self.instance}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def change(self, edit: Callable[[Config], Config], dry_run: bool = False) -> Result:
        """Reads the maps, applies `edit` to the config they hold, plans, and (unless dry_run)
        writes. `edit` raises on invalid input, before anything is written."""
        require_root()
        with self._locked(), self.balancer.maps() as maps:
            live = planner.read_live(maps)
            desired = edit({vip: lv.spec for vip, lv in live.items()})
            _check_new_addresses(live, desired)
            the_plan = planner.plan(live, desired, self.limits, self.maglev_seed,
                                    busy_backend_ids=maps.tracked_backend_ids)
            if not dry_run and not the_plan.empty:
                planner.apply(the_plan, live, maps)
            return Result(the_plan, applied=not dry_run and not the_plan.empty)

    # -- VIPs -------------------------------------------------------------------------------
    def vip_add(self, vip: Endpoint, force: bool = False) -> Result:
        if not force:
            from lbctl.safety import local_service_at  # noqa: PLC0415

            taken = local_service_at(vip)
            if taken is not None:
                raise ConflictError(
                    f"VIP {vip} ({vip.proto}) is an address of this host where a local service "
                    f"listens ({taken.addr}:{taken.port}): the balancer would take its traffic; "
                    "hint: use an address of no interface, or --force if that is the intent")

        def edit(config: Config) -> Config:
            if vip in config:
                raise ConflictError(f"VIP {vip} ({vip.proto}) already exists; hint: 'lbctl vip list' shows it")
            return {**config, vip: VipSpec(vip)}
        return self.change(edit)

    def vip_del(self, vip: Endpoint) -> Result:
        def edit(config: Config) -> Config:
            _need_vip(config, vip)
            return {v: s for v, s in config.items() if v != vip}
        return self.change(edit)

    def vips(self) -> list[dict]:
        require_root()
        with self.balancer.maps() as maps:
            live = planner.read_live(maps)
            out = []
            for vip in sorted(live):
                lv = live[vip]
                out.append({"vip": str(vip), "addr": vip.addr, "port": vip.port, "proto": vip.proto,
                            "vip_id": lv.vip_id, "ring_generation": lv.ring_generation,
                            "backends": len(lv.spec.backends),
                            "active_backends": sum(1 for b in lv.spec.backends if b.in_ring),
                            **maps.vip_counters(lv.vip_id)})
            return out

    # -- backends ---------------------------------------------------------------------------
    def backend_add(self, vip: Endpoint, backend: Endpoint, weight: int = 1) -> Result:
        def edit(config: Config) -> Config:
            spec = _need_vip(config, vip)
            if (backend.addr, backend.port) == (vip.addr, vip.port):
                raise ConflictError(f"backend {backend} is the VIP itself; hint: name the address "
                                    "and port of a real server")
            if spec.backend(str(backend)):
                raise ConflictError(f"backend {backend} is already in VIP {vip}; hint: use "
                                    "'lbctl backend set' to change its weight or state")
            return {**config, vip: with_backend(spec, BackendSpec(backend.addr, backend.port, weight))}
        return self.change(edit)

    def backend_del(self, vip: Endpoint, backend: Endpoint) -> Result:
        def edit(config: Config) -> Config:
            spec = _need_vip(config, vip)
            _need_backend(spec, backend)
            return {**config, vip: without_backend(spec, str(backend))}
        return self.change(edit)

    def backend_set(self, vip: Endpoint, backend: Endpoint, weight: int | None, state: str | None) -> Result:
        def edit(config: Config) -> Config:
            spec = _need_vip(config, vip)
            old = _need_backend(spec, backend)
            new = replace(old, weight=old.weight if weight is None else weight,
                          state=old.state if state is None else state)
            return {**config, vip: with_backend(spec, new)}
        return self.change(edit)

    def backends(self, vip: Endpoint | None = None) -> list[dict]:
        require_root()
        with self.balancer.maps() as maps:
            live = planner.read_live(maps)
            if vip is not None:
                _need_vip({v: lv.spec for v, lv in live.items()}, vip)
            out = []
            for v in sorted(live):
                if vip is not None and v != vip:
                    continue
                lv = live[v]
                in_ring = [b for b in lv.spec.backends if b.in_ring]
                total_weight = sum(b.weight for b in in_ring) or 1
                for b in lv.spec.backends:
                    bid = lv.backend_ids[b.name]
                    out.append({"vip": str(v), "proto": v.proto, "backend": b.name, "addr": b.addr,
                                "port": b.port, "weight": b.weight, "state": b.state, "backend_id": bid,
                                "ring_share": (b.weight / total_weight) if b.in_ring else 0.0,
                                **maps.backend_counters(bid)})
        return _with_agent_health(self.instance, out)

    # -- data plane -------------------------------------------------------------------------
    def attach(self, ifnames: list[str], mode: str | None = None) -> list[Attachment]:
        """mode None: each interface gets its driver's default (xdp/modes.py)."""
        with self._locked():
            try:
                return self.balancer.attach(ifnames, mode)
            finally:
                self.balancer.close()

    def detach(self, ifnames: list[str] | None, purge: bool = False) -> list[Attachment]:
        with self._locked():
            return self.balancer.detach(ifnames, purge)

    def reload(self) -> list[Attachment]:
        """A fresh program on every attached interface, maps and flows kept (hitless)."""
        from xdp.balancer import reload_program  # noqa: PLC0415

        with self._locked():
            return reload_program(self.balancer)

    def status(self) -> dict:
        require_root()
        attachments = self.balancer.attachments()
        out: dict = {"instance": self.instance, "pin_dir": self.balancer.pin_dir,
                     "attached": [{"ifname": a.ifname, "ifindex": a.ifindex, "mode": a.mode,
                                   "prog_id": a.prog_id, "driver": a.driver, "why": a.reason}
                                  for a in attachments],
                     "prog_id": self.balancer.pinned_prog_id(), "vips": 0, "backends": 0,
                     "maps": os.path.isdir(self.balancer.pin_dir)}
        if out["maps"]:
            with self.balancer.maps() as maps:
                live = planner.read_live(maps)
                out["vips"] = len(live)
                out["backends"] = sum(len(lv.spec.backends) for lv in live.values())
        from lbctl.agent import read_published  # noqa: PLC0415

        agent = read_published(self.instance)
        out["agent"] = None if agent is None else {k: agent.get(k) for k in ("pid", "config", "metrics_addr",
                                                                             "all_failing")}
        return out

    def stats(self) -> dict:
        require_root()
        with self.balancer.maps() as maps:
            return {"outcomes": maps.global_counters(), "vips": self.vips(), "backends": self.backends()}

    def flows(self, limit: int | None = None) -> list[dict]:
        require_root()
        out = []
        with self.balancer.maps() as maps:
            for rec in maps.flows():
                out.append(rec.__dict__)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def explain(self, client: Endpoint, vip: Endpoint) -> dict:
        """Which backend the running program would pick for client -> vip, and why."""
        from xdp.explain import explain  # noqa: PLC0415

        require_root()
        fd = self.balancer.program_fd()
        try:
            answer = explain(fd, client, vip)
        finally:
            self.balancer.close()
        return {"client": str(client), "vip": str(vip), "proto": vip.proto, **answer.__dict__}

    def flows_flush(self) -> int:
        require_root()
        with self._locked(), self.balancer.maps() as maps:
            return maps.flush_flows()


def _with_agent_health(instance: str, rows: list[dict]) -> list[dict]:
    """Adds the agent's health view (up, down, unchecked; '-' when no agent runs)."""
    from lbctl.agent import health_by_backend  # noqa: PLC0415

    health = health_by_backend(instance)
    for row in rows:
        h = health.get((row["vip"], row["proto"], row["backend"]))
        row["health"] = h["health"] if h else "-"
        row["last_check"] = h["last_check"] if h else None
    return rows


def _check_new_addresses(live: planner.LiveState, desired: Config) -> None:
    """Refuses a new VIP or backend on an address no balanced connection can reach (loopback,
    broadcast, multicast, unspecified); what the maps already hold is left as it is."""
    from lbctl.safety import check_usable, local_networks  # noqa: PLC0415

    networks = None
    for vip, spec in desired.items():
        lv = live.get(vip)
        known = set(lv.backend_ids) if lv else set()
        fresh = [] if lv else [(vip, "VIP")]
        fresh += [(Endpoint(b.addr, b.port, vip.proto), "backend") for b in spec.backends
                  if b.name not in known]
        for endpoint, what in fresh:
            if networks is None:
                networks = local_networks()
            check_usable(endpoint, what, networks)


def _need_vip(config: Config, vip: Endpoint) -> VipSpec:
    spec = config.get(vip)
    if spec is None:
        raise ConflictError(f"no VIP {vip} ({vip.proto}); hint: add it first with 'lbctl vip add {vip}"
                            f"{'' if vip.proto == 'tcp' else ' --proto ' + vip.proto}'")
    return spec


def _need_backend(spec: VipSpec, backend: Endpoint) -> BackendSpec:
    b = spec.backend(str(backend))
    if b is None:
        raise ConflictError(f"VIP {spec.vip} has no backend {backend}; hint: 'lbctl backend list "
                            f"{spec.vip}' shows its backends")
    return b

