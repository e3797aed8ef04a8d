"""The control-plane library the CLI calls: one function per user action, each validated,
planned and applied under a lock so concurrent lbctl commands never interleave."""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from lbctl import planner, runlock
from lbctl.errors import ConfigError, ConflictError, NetnsError
from lbctl.model import (
    SNAT_PORTS_DEFAULT,
    BackendSpec,
    Config,
    VipSpec,
    check_forwarding,
    check_vip,
    format_port_range,
    with_backend,
    without_backend,
)
from xdp.balancer import Attachment, Balancer, require_root
from xdp.codec import Endpoint, format_endpoint
from xdp.limits import DEFAULT_LIMITS, PIN_ROOT, RUN_DIR, Limits

LOCK_DIR = RUN_DIR
NETNS_DIR = "/var/run/netns"   # where `ip netns add` names namespaces


def lock_path(instance: str) -> str:
    """The lock file that serialises changes to one balancer instance (runlock's, so take and
    remove it only through runlock)."""
    return os.path.join(LOCK_DIR, f"{instance}.lock")


@dataclass
class Result:
    """What a change did: the plan's lines, and whether it was applied."""

    plan: planner.Plan
    applied: bool


@dataclass
class AttachResult:
    """Where the program now runs, and what pinned state it took up (None: it started empty
    or was already running)."""

    attachments: list[Attachment]
    restored: dict[str, int] | None
    warnings: list[str]


def orphaned_instances() -> list[str]:
    """Instances whose network namespace is gone while their pinned maps remain."""
    try:
        names = sorted(os.listdir(PIN_ROOT))
    except FileNotFoundError:
        return []
    return [n for n in names if n != "host" and not os.path.exists(os.path.join(NETNS_DIR, n))]


def _snat_fields(spec: VipSpec) -> dict[str, object]:
    """A full-NAT VIP's SNAT settings for listings (none: the FIB's source toward each backend)."""
    if spec.forwarding != "fullnat":
        return {}
    return {"snat": list(spec.snat) or "fib", "snat_ports": format_port_range(spec.snat_ports)}


class Controller:
    def __init__(self, instance: str = "host", limits: Limits = DEFAULT_LIMITS, maglev_seed: int = 0):
        self.instance = instance
        self.limits = limits
        self.maglev_seed = maglev_seed
        self.balancer = Balancer(instance, limits)

    @property
    def namespace_gone(self) -> bool:
        """The instance names a network namespace that no longer exists (its pins outlive it)."""
        return self.instance != "host" and not os.path.exists(os.path.join(NETNS_DIR, self.instance))

    def _need_namespace(self, action: str) -> None:
        if self.namespace_gone:
            raise NetnsError(
                f"cannot {action}: network namespace '{self.instance}' no longer exists"
                + (f" (its pinned state remains in {self.balancer.pin_dir})"
                   if os.path.isdir(self.balancer.pin_dir) else "")
                + f"; hint: 'lbctl -n {self.instance} detach --all --purge' removes that state, "
                "or create the namespace again")

    def purge_orphaned(self) -> bool:
        """Removes the pinned state of an instance whose namespace is gone: nothing can be
        attached there any more, so only the pins are left to remove."""
        with self._locked():
            if not os.path.isdir(self.balancer.pin_dir):
                return False
            shutil.rmtree(self.balancer.pin_dir)
            return True

    # -- locking and the change pipeline ----------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        require_root()
        # Removed again on release, so /run keeps no file per instance name ever used.
        with runlock.held(lock_path(self.instance)):
            yield

    def change(self, edit: Callable[[Config], Config], dry_run: bool = False) -> Result:
        """Reads the maps, applies `edit` to the config they hold, plans, and (unless dry_run)
        writes. `edit` raises on invalid input, before anything is written."""
        require_root()
        with self._locked(), self.balancer.maps() as maps:
            live = planner.read_live(maps)
            desired = edit({vip: lv.spec for vip, lv in live.items()})
            check_new_addresses(live, desired)
            the_plan = planner.plan(live, desired, self.limits, self.maglev_seed,
                                    busy_backend_ids=maps.tracked_backend_ids)
            if not dry_run and not the_plan.empty:
                planner.apply(the_plan, live, maps)
                the_plan.host_warnings += sync_dsr_neighbours(live, desired)
            return Result(the_plan, applied=not dry_run and not the_plan.empty)

    # -- VIPs -------------------------------------------------------------------------------
    def vip_add(self, vip: Endpoint, force: bool = False, affinity: str = "flow",
                forwarding: str = "nat", snat: tuple[str, ...] = (),
                snat_ports: tuple[int, int] = SNAT_PORTS_DEFAULT) -> Result:
        check_forwarding(forwarding)     # before anything else is looked at: a mode not built
        check_vip(VipSpec(vip, forwarding=forwarding, snat=snat, snat_ports=snat_ports))
        if not force:
            from lbctl.safety import local_service_at

            taken = local_service_at(vip)
            if taken is not None:
                raise ConflictError(
                    f"VIP {vip} ({vip.proto}) is an address of this host where a local service "
                    f"listens ({format_endpoint(taken.addr, taken.port)}): the balancer would take its traffic; "
                    "hint: use an address of no interface, or --force if that is the intent")

        def edit(config: Config) -> Config:
            if vip in config:
                raise ConflictError(f"VIP {vip} ({vip.proto}) already exists; hint: 'lbctl vip list' shows it")
            return {**config, vip: VipSpec(vip, affinity=affinity, forwarding=forwarding,
                                           snat=snat, snat_ports=snat_ports)}
        return self.change(edit)

    def vip_del(self, vip: Endpoint) -> Result:
        def edit(config: Config) -> Config:
            _need_vip(config, vip)
            return {v: s for v, s in config.items() if v != vip}
        return self.change(edit)

    def ring_fingerprints(self) -> dict[str, str]:
        """'VIP:PORT/proto' -> the fingerprint of the ring the data plane uses ({} without maps):
        nodes holding the same backends show the same value."""
        require_root()
        if not os.path.isdir(self.balancer.pin_dir):
            return {}
        with self.balancer.maps() as maps:
            fps = planner.ring_fingerprints(planner.read_live(maps), self.limits.ring_size, self.maglev_seed)
        return {f"{vip}/{vip.proto}": fp for vip, fp in sorted(fps.items())}

    def vips(self) -> list[dict]:
        require_root()
        with self.balancer.maps() as maps:
            live = planner.read_live(maps)
            out = []
            for vip in sorted(live, key=_endpoint_key):
                lv = live[vip]
                out.append({"vip": str(vip), "addr": vip.addr, "port": vip.port, "proto": vip.proto,
                            "vip_id": lv.vip_id, "ring_generation": lv.ring_generation,
                            "affinity": lv.spec.affinity, "forwarding": lv.spec.forwarding,
                            **_snat_fields(lv.spec),
                            "backends": len(lv.spec.backends),
                            "active_backends": sum(1 for b in lv.spec.backends if b.in_ring),
                            **maps.vip_counters(lv.vip_id)})
            return out

    # -- backends ---------------------------------------------------------------------------
    def backend_add(self, vip: Endpoint, backend: Endpoint | Sequence[Endpoint], weight: int = 1) -> Result:
        """Adds one backend, or several in one plan (one ring rebuild, one commit)."""
        new = [backend] if isinstance(backend, Endpoint) else list(backend)

        def edit(config: Config) -> Config:
            spec = _need_vip(config, vip, adding_backend=True)
            seen: set[Endpoint] = set()
            for b in new:
                if (b.addr, b.port) == (vip.addr, vip.port):
                    raise ConflictError(f"backend {b} is the VIP itself; hint: name the address "
                                        "and port of a real server")
                if b in seen:
                    raise ConflictError(f"backend {b} is listed twice; hint: name each backend once")
                seen.add(b)
                if spec.backend(str(b)):
                    raise ConflictError(f"backend {b} is already in VIP {vip}; hint: use "
                                        "'lbctl backend set' to change its weight or state")
                spec = with_backend(spec, BackendSpec(b.addr, b.port, weight))
            return {**config, vip: spec}
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
            for v in sorted(live, key=_endpoint_key):
                if vip is not None and v != vip:
                    continue
                lv = live[v]
                in_ring = [b for b in lv.spec.backends if b.in_ring]
                total_weight = sum(b.weight for b in in_ring) or 1
                for b in sorted(lv.spec.backends, key=lambda b: (_addr_key(b.addr), b.port)):
                    bid = lv.backend_ids[b.name]
                    out.append({"vip": str(v), "proto": v.proto, "backend": b.name, "addr": b.addr,
                                "port": b.port, "weight": b.weight, "state": b.state, "backend_id": bid,
                                "ring_share": (b.weight / total_weight) if b.in_ring else 0.0,
                                **maps.backend_counters(bid)})
        return _with_agent_health(self.instance, out)

    # -- data plane -------------------------------------------------------------------------
    def attach(self, ifnames: list[str], mode: str | None = None, fresh: bool = False) -> AttachResult:
        """Attaches to `ifnames` (mode None: each interface gets its driver's default,
        xdp/modes.py). Pinned maps left by an earlier run (a detach without --purge, or a
        namespace that was deleted and made again) are reused: the result says what they
        restore, and `fresh` removes them first so the balancer starts empty."""
        self._need_namespace("attach")
        with self._locked():
            running = self.balancer.attachments()
            restored = None
            if running and fresh:
                raise ConflictError(
                    f"--fresh would drop the configuration of the balancer running on "
                    f"{', '.join(a.ifname for a in running)}; hint: 'lbctl detach --all --purge' "
                    "first, or attach without --fresh")
            if not running and os.path.isdir(self.balancer.pin_dir):
                if fresh:
                    shutil.rmtree(self.balancer.pin_dir)
                elif os.path.exists(os.path.join(self.balancer.pin_dir, "vips")):
                    with self.balancer.maps() as maps:
                        live = planner.read_live(maps)
                        restored = {"vips": len(live),
                                    "backends": sum(len(lv.spec.backends) for lv in live.values()),
                                    "flows": maps.live_flow_count()}
            try:
                done = self.balancer.attach(ifnames, mode)
            finally:
                self.balancer.close()
            return AttachResult(done, restored, self.one_sided_warnings())

    def detach(self, ifnames: list[str] | None, purge: bool = False, force: bool = False) -> list[Attachment]:
        """Detaches; refuses (unless force) while tracked flows are live: the kernel cannot
        continue a NATed connection, so every one of them would break."""
        with self._locked():
            if not force and self.balancer.attachments() and os.path.isdir(self.balancer.pin_dir):
                with self.balancer.maps() as maps:
                    live = maps.live_flow_count()
                if live:
                    what = ("--all" if ifnames is None else " ".join(ifnames)) + (" --purge" if purge else "")
                    raise ConflictError(
                        f"detaching would break {live} live flow{'s' if live != 1 else ''}: the kernel "
                        "cannot continue connections NATed by the balancer; hint: drain the backends "
                        f"and wait, or 'lbctl detach {what} --force' to break them")
            done = self.balancer.detach(ifnames, purge)
            if purge and not os.path.isdir(self.balancer.pin_dir):
                from lbctl.neigh import sync_dsr_neighbours as sync

                sync(())     # the configuration is gone: so are the DSR neighbours lbctl made
            return done

    def reload(self) -> list[Attachment]:
        """A fresh program on every attached interface, maps and flows kept (hitless)."""
        from xdp.balancer import reload_program

        with self._locked():
            return reload_program(self.balancer)

    def one_sided_warnings(self) -> list[str]:
        """VIPs whose backends this namespace reaches through an interface that does not run
        the program: their replies would pass un-NATed, so no connection to them completes."""
        from lbctl.safety import egress_ifindex

        attached = {a.ifindex for a in self.balancer.attachments()}
        if not attached or not os.path.exists(os.path.join(self.balancer.pin_dir, "vips")):
            return []
        names = dict(socket.if_nameindex())
        out = []
        with self.balancer.maps() as maps:
            live = planner.read_live(maps)
        egress: dict[str, int | None] = {}
        for vip in sorted(live, key=_endpoint_key):
            if live[vip].spec.forwarding == "dsr":
                continue        # DSR backends answer clients directly: no reply comes back here
            by_iface: dict[str, list[str]] = {}
            for b in live[vip].spec.backends:
                if b.addr not in egress:
                    egress[b.addr] = egress_ifindex(b.addr)
                ifindex = egress[b.addr]
                if ifindex is not None and ifindex not in attached:
                    by_iface.setdefault(names.get(ifindex, f"ifindex {ifindex}"), []).append(b.name)
            for ifname, backends in sorted(by_iface.items()):
                shown = ", ".join(backends[:3]) + (f" and {len(backends) - 3} more" if len(backends) > 3 else "")
                out.append(f"VIP {vip} ({vip.proto}): backend{'s' if len(backends) > 1 else ''} {shown} "
                           f"{'are' if len(backends) > 1 else 'is'} reached through {ifname}, which does "
                           "not run the balancer, so their replies cannot be translated back and "
                           f"connections to them fail; hint: lbctl attach {ifname}")
        return out

    def status(self) -> dict:
        require_root()
        gone = self.namespace_gone
        # In a namespace that is gone there is nothing to look at but the pins.
        attachments = [] if gone else self.balancer.attachments()
        out: dict = {"instance": self.instance, "pin_dir": self.balancer.pin_dir,
                     "namespace_gone": gone,
                     # The host's status is where the other instances are looked over; a
                     # namespace's own status stays about that namespace.
                     "orphaned_instances": orphaned_instances() if self.instance == "host" else [],
                     "attached": [{"ifname": a.ifname, "ifindex": a.ifindex, "mode": a.mode,
                                   "prog_id": a.prog_id, "driver": a.driver, "why": a.reason}
                                  for a in attachments],
                     "prog_id": self.balancer.pinned_prog_id(),
                     # The tc build, pinned while an interface runs it (--mode tc).
                     "tc_prog_id": self.balancer.pinned_prog_id(self.balancer.tc_prog_pin), "vips": 0, "backends": 0, "vip_modes": [],
                     "maps": os.path.isdir(self.balancer.pin_dir)}
        if out["maps"]:
            with self.balancer.maps() as maps:
                live = planner.read_live(maps)
                out["vips"] = len(live)
                out["backends"] = sum(len(lv.spec.backends) for lv in live.values())
                rings = planner.ring_fingerprints(live, self.limits.ring_size, self.maglev_seed)
                out["vip_modes"] = [{"vip": str(v), "proto": v.proto, "forwarding": live[v].spec.forwarding,
                                     "affinity": live[v].spec.affinity,
                                     "ring": rings.get(v), **_snat_fields(live[v].spec)}
                                    for v in sorted(live)]
        from lbctl.agent import read_published

        agent = read_published(self.instance)
        out["agent"] = None if agent is None else {k: agent.get(k) for k in ("pid", "config", "metrics_addr",
                                                                             "all_failing", "cluster")}
        out["bgp"] = _bgp_status(agent)
        from lbctl.agent import state_dir
        from lbctl.l7.stats import backend_rows

        out["l7_backends"] = backend_rows(state_dir(self.instance))
        out["warnings"] = [] if gone else self.one_sided_warnings()
        return out

    def stats(self, vip: Endpoint | None = None) -> dict:
        """Counters by outcome, per VIP and per backend; with `vip`, only that VIP's rows."""
        require_root()
        with self.balancer.maps() as maps:
            outcomes = maps.global_counters()
        backends = self.backends(vip)       # checks the VIP exists
        vips = [v for v in self.vips() if vip is None or (v["vip"], v["proto"]) == (str(vip), vip.proto)]
        return {"outcomes": outcomes, "vips": vips, "backends": backends}

    def flows(self, limit: int | None = None, include_expired: bool = False,
              vip: Endpoint | None = None, backend: Endpoint | None = None,
              client_addr: str | None = None, client_port: int | None = None) -> list[dict]:
        """Tracked flows with their age and idle time, sorted by VIP then client (numerically).
        Entries past their state's timeout stay in the LRU table until reused or evicted, but
        forward nothing: they are left out unless include_expired (then marked expired)."""
        from xdp.maps import entry_alive, monotonic_ns

        require_root()
        out = []
        with self.balancer.maps() as maps:
            now = monotonic_ns()
            for rec in maps.flows():
                if vip is not None and (rec.vip, rec.vip_port, rec.proto) != (vip.addr, vip.port, vip.proto):
                    continue
                if backend is not None and (rec.backend, rec.backend_port) != (backend.addr, backend.port):
                    continue
                if client_addr is not None and rec.client != client_addr:
                    continue
                if client_port is not None and rec.client_port != client_port:
                    continue
                expired = not entry_alive(self.limits, rec.state, rec.last_seen_ns, now)
                if expired and not include_expired:
                    continue
                out.append({**rec.__dict__, "expired": expired,
                            "age_s": round(max(0, now - rec.created_ns) / 1e9, 1),
                            "idle_s": round(max(0, now - rec.last_seen_ns) / 1e9, 1)})
        out.sort(key=lambda r: (_addr_key(r["vip"]), r["vip_port"], r["proto"],
                                _addr_key(r["client"]), r["client_port"]))
        return out if limit is None else out[:limit]

    def explain(self, client: Endpoint, vip: Endpoint) -> dict:
        """What the running program does with client -> vip, asked twice: a new connection
        from that port (TCP: a SYN, which a closing flow does not keep) at the top level, and,
        when a flow is tracked for the tuple, the next packet of that flow (`tracked_flow`).
        Also where the program is attached: nowhere means no packet is balanced now."""
        from xdp.explain import explain

        if client.ipv6 != vip.ipv6:
            raise ConfigError(f"client {client} and VIP {vip} are of different address families; "
                              "hint: a VIP is reached from clients of its own family")
        require_root()
        attached = [] if self.namespace_gone else [a.ifname for a in self.balancer.attachments()]
        fd = self.balancer.program_fd()
        try:
            first = explain(fd, client, vip, new_connection=True)
            # A UDP datagram is the same question either way.
            then = explain(fd, client, vip, new_connection=False) if vip.proto == "tcp" else first
        finally:
            self.balancer.close()
        out = {"client": str(client), "vip": str(vip), "proto": vip.proto, "attached_to": attached,
               **_explained(first),
               "tracked_flow": _explained(then) if then.verdict == "flow_hit" else None}
        if out.get("forwarding") == "fullnat" or (out["tracked_flow"] or {}).get("forwarding") == "fullnat":
            self._explain_snat(client, vip, out)
        return out

    def _explain_snat(self, client: Endpoint, vip: Endpoint, out: dict) -> None:
        """The source a full-NAT flow gets: for a new connection the VIP's SNAT addresses (or
        the FIB's source toward the backend) and port range, since the port is only claimed by
        a real packet; for a tracked flow the address and port it holds."""
        from xdp import codec

        with self.balancer.maps() as maps:
            live = planner.read_live(maps).get(vip)
            table = "snat_flows6" if vip.ipv6 else "snat_flows"
            raw = maps[table].lookup(codec.encode_flow_key(client.addr, client.port, vip.addr,
                                                           vip.port, vip.proto))
        if out.get("forwarding") == "fullnat" and out.get("backend") and live is not None:
            if live.spec.snat:
                source = ",".join(live.spec.snat)
            else:
                from lbctl.neigh import route_to

                route = route_to(out["backend"].rsplit(":", 1)[0].strip("[]"))
                source = route.prefsrc if route is not None and route.prefsrc else "none (no route)"
            out.update(snat=source, snat_ports=format_port_range(live.spec.snat_ports))
        tracked = out["tracked_flow"]
        if tracked is not None and tracked.get("forwarding") == "fullnat" and raw is not None:
            rec = codec.decode_snat_flow(codec.encode_flow_key(client.addr, client.port, vip.addr,
                                                               vip.port, vip.proto), raw)
            tracked["snat"] = format_endpoint(rec.snat or "", rec.snat_port or 0)

    def flows_flush(self) -> int:
        require_root()
        with self._locked(), self.balancer.maps() as maps:
            return maps.flush_flows()


def _bgp_status(agent: dict | None) -> dict | None:
    """The agent's BGP view with the sessions read live from its BIRD; None without a bgp block."""
    from lbctl import bgp

    view = (agent or {}).get("bgp")
    if not view:
        return None
    view = dict(view)
    try:
        view["sessions"] = [s.__dict__ | {"established": s.established} for s in bgp.sessions(view["socket"])]
        view["sessions_error"] = None
    except bgp.BgpError as exc:
        view["sessions"], view["sessions_error"] = [], str(exc)
    return view


def _with_agent_health(instance: str, rows: list[dict]) -> list[dict]:
    """Adds the agent's health view (up, down, unchecked; '-' when no agent runs)."""
    from lbctl.agent import health_by_backend

    health = health_by_backend(instance)
    for row in rows:
        h = health.get((row["vip"], row["proto"], row["backend"]))
        row["health"] = h["health"] if h else "-"
        row["last_check"] = h["last_check"] if h else None
    return rows


def _explained(answer) -> dict:
    """One explain answer with only the fields that mean something for its verdict: a slot and
    ring generation for a ring pick, a flow state and age for a flow-table hit."""
    out = {"verdict": answer.verdict}
    if answer.verdict == "not_vip":
        return out
    out["vip_id"] = answer.vip_id
    out["forwarding"] = answer.forwarding
    if answer.verdict == "flow_hit":
        out.update(flow_state=answer.flow_state, flow_age_ms=answer.flow_age_ms)
    else:
        out.update(slot=answer.slot, ring_generation=answer.ring_generation)
    if answer.verdict in ("flow_hit", "ring"):
        out.update(backend=answer.backend, backend_id=answer.backend_id)
    return out


def _addr_key(addr: str) -> tuple[int, int]:
    """Sorts addresses by value: 10.0.0.2 before 10.0.0.10, IPv4 before IPv6."""
    ip = ipaddress.ip_address(addr)
    return ip.version, int(ip)


def _endpoint_key(endpoint: Endpoint) -> tuple[tuple[int, int], int, str]:
    return (_addr_key(endpoint.addr), endpoint.port, endpoint.proto)


def check_new_addresses(live: planner.LiveState, desired: Config) -> None:
    """Refuses a new VIP or backend on an address no balanced connection can reach (loopback,
    broadcast, multicast, unspecified); what the maps already hold is left as it is."""
    from lbctl.safety import check_usable, local_networks

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


def sync_dsr_neighbours(live: planner.LiveState, desired: Config) -> list[str]:
    """After a change: the backends of DSR VIPs (and the next hops of full-NAT VIPs' backends)
    get managed neighbour entries (lbctl/neigh.py:
    the program finds their MACs by bpf_fib_lookup, and no traffic of the balancer's own would
    resolve them); entries lbctl made for backends that left go. One warning per backend that
    cannot be reached at L2. Nothing is done while no DSR VIP is, or was, configured."""
    needs = ("dsr", "fullnat")      # full-NAT: the backends' next hops (lbctl/neigh.py says why)
    if not any(s.forwarding in needs for s in desired.values()) and \
            not any(lv.spec.forwarding in needs for lv in live.values()):
        return []
    from lbctl.neigh import sync_dsr_neighbours as sync

    users: dict[str, list[str]] = {}
    routed: dict[str, list[str]] = {}
    for vip, spec in sorted(desired.items()):
        if spec.forwarding in needs:
            for b in spec.backends:
                (users if spec.forwarding == "dsr" else routed).setdefault(b.addr, []).append(str(vip))
    problems = sync(users, routed)
    return [f"DSR backend {addr} of VIP {', '.join(users[addr])} cannot be reached at L2: {why}; "
            f"its connections are dropped (drop_dsr_unreachable); hint: lbctl backend check "
            f"{users[addr][0]} {addr}" if addr in users else
            f"full-NAT backend {addr} of VIP {', '.join(routed[addr])}: {why}; without a route its "
            f"new connections are dropped (drop_snat_no_source); hint: check 'ip route get {addr}'"
            for addr, why in sorted(problems.items())]


def _need_vip(config: Config, vip: Endpoint, adding_backend: bool = False) -> VipSpec:
    """The VIP's spec; a missing VIP raises a message whose hint fits what was being done."""
    spec = config.get(vip)
    if spec is not None:
        return spec
    other = next((v for v in config if (v.addr, v.port) == (vip.addr, vip.port)), None)
    if other is not None:
        hint = f"{vip} is a VIP for {other.proto}: add '--proto {other.proto}'"
    elif adding_backend:
        hint = f"add it first with 'lbctl vip add {vip}{'' if vip.proto == 'tcp' else ' --proto ' + vip.proto}'"
    else:
        hint = "'lbctl vip list' shows the VIPs"
    raise ConflictError(f"no VIP {vip} ({vip.proto}); hint: {hint}")


def _need_backend(spec: VipSpec, backend: Endpoint) -> BackendSpec:
    b = spec.backend(str(backend))
    if b is None:
        raise ConflictError(f"VIP {spec.vip} has no backend {backend}; hint: 'lbctl backend list "
                            f"{spec.vip}' shows its backends")
    return b

