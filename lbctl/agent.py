"""`lbctl agent`: the long-running daemon of one instance. Attaches and applies the config file
(or each revision of the document in etcd), runs health checks and moves failing backends out
of the rings, serves Prometheus metrics, re-reads the file on SIGHUP, and leaves the data plane
forwarding when it stops."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Any

from lbctl import bgp, planner, runlock
from lbctl.apply import apply_config
from lbctl.cluster import ClusterNode
from lbctl.config import BgpSpec, DesiredState, HealthSpec, load_file, vip_item
from lbctl.control import LOCK_DIR, Controller
from lbctl.errors import ConflictError
from lbctl.health import BackendHealth, CheckResult, HealthChecker
from lbctl.l7.host import add_vip_address, remove_vip_address
from lbctl.l7.stats import L7Collector
from lbctl.l7.supervisor import L7Supervisor, worker_spec
from lbctl.metrics import AgentView, BackendHealthView, LbCollector, MetricsServer
from lbctl.model import Config
from xdp.codec import Endpoint
from xdp.errors import XdpError

log = logging.getLogger("lbctl.agent")

STATE_FILE = "agent.json"
LOCK_FILE = "agent.lock"
# How often the state file is refreshed with the latest check results (transitions and
# applies are written at once).
PUBLISH_INTERVAL_S = 2.0
# How often the announcer re-checks what this node can serve (health transitions, drain and
# applies wake it at once; the interval bounds how late a data plane that stopped answering
# its self-check is noticed).
ANNOUNCE_INTERVAL_S = 1.0
# The self-check's client: TEST-NET-1 (RFC 5737), never a real peer. Its probe creates no flow.
SELF_CHECK_CLIENT = ("192.0.2.1", 40000)
SELF_CHECK_CLIENT6 = ("2001:db8::1", 40000)     # the same for IPv6 VIPs (a documentation address)


def _route(addr: str) -> str:
    """How a VIP address is announced: a /32, or a /128 for IPv6."""
    return f"{addr}/128" if ":" in addr else f"{addr}/32"

HealthKey = tuple[Endpoint, str]          # (VIP, backend name)


def state_dir(instance: str) -> str:
    """/run/lbctl/<instance>/: the agent's lock and the health it publishes (tmpfs: a boot
    clears it, as it clears the maps)."""
    return os.path.join(LOCK_DIR, instance)


def read_published(instance: str) -> dict[str, Any] | None:
    """What a running agent of this instance publishes, or None when no agent runs."""
    path = os.path.join(state_dir(instance), STATE_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health_by_backend(instance: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(vip 'addr:port', proto, backend 'addr:port') -> the agent's view of it; {} without an agent."""
    data = read_published(instance)
    if data is None:
        return {}
    return {(b["vip"], b["proto"], b["backend"]): b for b in data.get("backends", [])}


class Agent:
    def __init__(self, controller: Controller, config_path: str, metrics_addr: str,
                 detach_on_exit: bool = False, version: str = "0", cluster: ClusterNode | None = None):
        """config_path: the file; with `cluster`, the document comes from etcd instead and
        config_path is only its etcd:// address, for what the agent shows."""
        self.controller = controller
        self.instance = controller.instance
        self.config_path = config_path
        self.cluster = cluster
        self.ring_fingerprints: dict[str, str] = {}
        self._first_revision = 0
        self.metrics_addr = metrics_addr
        self.detach_on_exit = detach_on_exit
        self.version = version
        self.state: DesiredState | None = None
        self.checker = HealthChecker(self._on_transition, self._on_result)
        self.last_in_ring: dict[Endpoint, set[str]] = {}
        self.all_failing: set[Endpoint] = set()
        self.view = AgentView(config_path=config_path if cluster else os.path.abspath(config_path))
        self._view_lock = threading.Lock()
        self._dirty: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._apply_lock: asyncio.Lock | None = None
        self._lock_fd: int | None = None
        self._publish_due = False
        self.l7: L7Supervisor | None = None
        self.l7_addrs: set[str] = set()       # VIP addresses this agent put on lo (and removes)
        self.speaker: bgp.Speaker | None = None
        self._announce_now: asyncio.Event | None = None
        self.withheld: dict[str, str] = {}    # VIP address -> why this node does not announce it
        self.bgp_error: str | None = None
        self.drain_applied: bool | None = None   # the drain flag the last announcement followed
        # Coming back into service (start, or every BGP session lost): nothing is announced
        # until the node's ring is the one the others have (_recovery_gate).
        self.recovering = True
        self._checks_at_session_up: dict[HealthKey, int] = {}
        self.session_next_hop6: str | None = None   # the IPv6 next hop the sessions carry

    # -- life cycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Runs in the foreground until SIGTERM/SIGINT; returns the exit status."""
        self._take_instance_lock()
        try:
            if self.cluster is not None:
                log.info("lbctl agent %s starting for instance '%s' as node '%s' of %s", self.version,
                         self.instance, self.cluster.name, self.config_path)
                # Until etcd gives a valid document the maps keep whatever they hold: forwarding
                # goes on as a previous agent left it.
                state, self._first_revision = self.cluster.first_state()
                log.info("revision %d read (%d VIPs)", self._first_revision, len(state.vips))
            else:
                state = load_file(self.config_path)
                log.info("lbctl agent %s starting for instance '%s' with %s (%d VIPs)", self.version,
                         self.instance, self.config_path, len(state.vips))
            return asyncio.run(self._main(state))
        finally:
            if self.cluster is not None:
                self.cluster.withdraw()
            self._remove_published()
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def _take_instance_lock(self) -> None:
        try:
            # The inode check of runlock.acquire: a stopping agent removes this file while it
            # still holds it, and a lock won on the removed file would be no lock at all.
            fd = runlock.acquire(os.path.join(state_dir(self.instance), LOCK_FILE), blocking=False)
        except BlockingIOError:
            other = read_published(self.instance)
            pid = f" (pid {other['pid']})" if other else ""
            raise ConflictError(f"an agent already runs for instance '{self.instance}'{pid}; hint: "
                                "send it SIGHUP to re-read its file, or stop it first") from None
        self._lock_fd = fd

    async def _main(self, state: DesiredState) -> int:
        loop = asyncio.get_running_loop()
        self._dirty, self._stop, self._apply_lock = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        self._announce_now = asyncio.Event()
        self.state = state
        initially_down = self._drained_by_checks(state)
        if initially_down:
            log.info("%d backends were out of the ring by a previous agent's checks; they rejoin "
                     "after passing 'rise' checks", len(initially_down))
        self.checker.sync(self._targets(state), initially_down)
        # The first apply attaches and fills the maps; failing here stops the agent (exit code
        # of the error), before any metrics port or signal handler exists.
        try:
            await self._apply(reason="start", raise_errors=True)
        except XdpError:
            await asyncio.to_thread(self._stop_l7)
            raise
        collector = LbCollector(self.instance, self.controller.balancer.pin_dir, self.controller.limits,
                                self._snapshot, self.version)
        metrics = MetricsServer(self.metrics_addr, collector)
        metrics.registry.register(L7Collector(os.path.join(state_dir(self.instance), "l7-stats")))
        metrics.start()
        log.info("metrics on http://%s:%d/metrics", metrics.host, metrics.port)
        with self._view_lock:
            self.view.last_reload_ok = time.time()
        try:
            await self._follow_bgp(state)
        except XdpError:
            metrics.stop()
            await asyncio.to_thread(self._stop_l7)
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload()))
        loop.add_signal_handler(signal.SIGUSR1, self._announce_now.set)   # lbctl node drain|undrain
        workers = [loop.create_task(self._reconciler()), loop.create_task(self._publisher()),
                   loop.create_task(self._announcer())]
        if self.cluster is not None:
            self.cluster.applied(self._first_revision)
            log.info("revision %d applied", self._first_revision)
            workers += [loop.create_task(self.cluster.follow(self._adopt_revision)),
                        loop.create_task(self.cluster.publish(self._node_record, self._node_record_sessions))]
        self._publish()
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            # Withdraw first: the routers move new flows to the other nodes while this one
            # still forwards what arrives meanwhile.
            self._stop_speaker()
            await self.checker.stop()
            metrics.stop()
            await asyncio.to_thread(self._stop_l7)
        if self.detach_on_exit:
            done = self.controller.detach(None, force=True)   # the operator asked for it
            log.info("stopped; detached from %s (--detach-on-exit); the maps stay pinned",
                     ", ".join(a.ifname for a in done) or "nothing")
        else:
            log.info("stopped; the data plane keeps forwarding on the last applied state")
        return 0

    # -- desired state: the file, less the backends failing their checks -------------------
    @staticmethod
    def _checked(health: HealthSpec | None) -> bool:
        return health is not None and health.check != "none"

    def _targets(self, state: DesiredState) -> dict[HealthKey, tuple[HealthSpec, str, int]]:
        out: dict[HealthKey, tuple[HealthSpec, str, int]] = {}
        for vip, entry in state.vips.items():
            if entry.health is not None and self._checked(entry.health):
                for b in entry.spec.backends:
                    out[(vip, b.name)] = (entry.health, b.addr, b.port)
        return out

    def _drained_by_checks(self, state: DesiredState) -> set[HealthKey]:
        """Backends the file wants active but the maps hold drained: a previous agent's checks
        took them out. They start down, so a restart moves nothing."""
        pin = self.controller.balancer.pin_dir
        if not os.path.exists(os.path.join(pin, "vips")):
            return set()
        with self.controller.balancer.maps() as maps:
            live = planner.read_live(maps)
        out = set()
        for vip, entry in state.vips.items():
            lv = live.get(vip)
            if lv is None or not self._checked(entry.health):
                continue
            for b in entry.spec.backends:
                have = lv.spec.backend(b.name)
                if b.state == "active" and have is not None and have.state == "drain":
                    out.add((vip, b.name))
        return out

    def effective(self) -> Config:
        """What the maps should hold now. A backend failing its checks is drained (no new flows;
        established ones finish where the server still answers). The operator's drain/down in
        the file always wins. When every active backend of a VIP fails, the last healthy set
        stays in the ring: a monitoring glitch must not black-hole the whole service."""
        assert self.state is not None
        out: Config = {}
        for vip, entry in self.state.vips.items():
            if entry.mode != "l4":
                continue   # an L7 VIP stays out of the maps: XDP passes its packets to the proxy
            active = [b for b in entry.spec.backends if b.state == "active"]
            if self._checked(entry.health):
                healthy = {b.name for b in active if self._health(vip, b.name).up}
            else:
                healthy = {b.name for b in active}
            if active and not healthy:
                keep = self.last_in_ring.get(vip, set()) & {b.name for b in active}
                healthy = keep or {b.name for b in active}
                if vip not in self.all_failing:
                    self.all_failing.add(vip)
                    log.error("VIP %s (%s): ALL %d backends fail their checks; keeping the last "
                              "healthy set in the ring (%s) instead of dropping the service",
                              vip, vip.proto, len(active), ", ".join(sorted(healthy)))
            else:
                if vip in self.all_failing:
                    self.all_failing.discard(vip)
                    log.warning("VIP %s (%s): %d backends pass their checks again; the all-failing "
                                "fallback ends", vip, vip.proto, len(healthy))
                self.last_in_ring[vip] = healthy
            backends = tuple(b if b.state != "active" or b.name in healthy else replace(b, state="drain")
                             for b in entry.spec.backends)
            out[vip] = replace(entry.spec, backends=backends)   # affinity, forwarding as in the file
        return out

    def _health(self, vip: Endpoint, name: str) -> BackendHealth:
        return self.checker.states.get((vip, name)) or BackendHealth()

    # -- applying ---------------------------------------------------------------------------
    async def _apply(self, reason: str, raise_errors: bool = False) -> bool:
        assert self.state is not None and self._apply_lock is not None
        async with self._apply_lock:
            desired = self.effective()
            state = self.state
            try:
                if self._xdp_needed(state):
                    result = await asyncio.to_thread(apply_config, self.controller, desired,
                                                     state.interfaces, state.xdp_mode, False,
                                                     reason != "check")
                else:
                    result = None
                await asyncio.to_thread(self._sync_l7)
            except XdpError as exc:
                if raise_errors:
                    raise
                log.error("apply (%s) failed, the maps keep their previous state: %s", reason, exc)
                return False
            if self._announce_now is not None:
                self._announce_now.set()
            if result is not None and result.applied:
                for line in result.describe():
                    log.info("apply (%s): %s", reason, line)
                for warning in result.plan.warnings:
                    log.warning("apply (%s): %s", reason, warning)
                with self._view_lock:
                    self.view.plans_applied += 1
                    for c in result.plan.changes:
                        if c.ring_changed:
                            self.view.ring_changes += 1
                            self.view.slots_moved += c.moved_slots
            elif reason == "start":
                log.info("apply (start): the maps already hold this state; nothing moved")
            if result is not None and (result.applied or not self.ring_fingerprints):
                self.ring_fingerprints = await asyncio.to_thread(self.controller.ring_fingerprints)
            self._publish()
            return True

    def _xdp_needed(self, state: DesiredState) -> bool:
        """`interfaces: []` with only L7 VIPs runs no XDP at all (unless maps from an earlier
        file still exist and must follow the file)."""
        return bool(state.interfaces or state.config()
                    or os.path.exists(os.path.join(self.controller.balancer.pin_dir, "vips")))

    # -- the L7 proxy: addresses on lo, worker processes -------------------------------------
    def _sync_l7(self) -> None:
        """Brings the L7 proxy to the file: VIP addresses local, workers running with the
        current backends and health; nothing of it when the file has no L7 VIP."""
        assert self.state is not None
        l7 = self.state.l7_vips()
        wanted = {vip.addr for vip in l7}
        for addr in sorted(wanted - self.l7_addrs):
            if add_vip_address(addr):
                self.l7_addrs.add(addr)
                log.info("L7: VIP address %s added to lo", addr)
        spec = worker_spec(self.state.vips, self._l7_up)
        workers = max((e.l7.workers for e in l7.values() if e.l7 is not None), default=0)
        if not l7:
            if self.l7 is not None:
                self.l7.stop()
                self.l7 = None
                log.info("L7: no mode: l7 VIP left; the proxy stopped")
        elif self.l7 is None or self.l7.count != (workers or os.cpu_count() or 1):
            if self.l7 is not None:
                self.l7.stop()
                self.l7 = None
            sup = L7Supervisor(state_dir(self.instance), workers)
            sup.start(spec)     # raises (having stopped what it started) when a worker cannot serve
            self.l7 = sup
            log.info("L7: %d proxy workers serve %s", self.l7.count,
                     ", ".join(str(v) for v in sorted(l7)))
        else:
            self.l7.reload(spec)
        for addr in sorted(self.l7_addrs - wanted):
            remove_vip_address(addr)
            self.l7_addrs.discard(addr)
            log.info("L7: VIP address %s removed from lo", addr)

    def _l7_up(self, vip: Endpoint, name: str) -> bool:
        entry = self.state.vips.get(vip) if self.state else None
        return entry is None or not self._checked(entry.health) or self._health(vip, name).up

    def _stop_l7(self) -> None:
        """Drains and stops the workers, then takes the addresses this agent added off lo."""
        if self.l7 is not None:
            self.l7.stop()
            self.l7.cleanup()
            self.l7 = None
        for addr in sorted(self.l7_addrs):
            remove_vip_address(addr)
            log.info("L7: VIP address %s removed from lo", addr)
        self.l7_addrs.clear()

    async def _reconciler(self) -> None:
        assert self._dirty is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self._apply(reason="check"):
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def _reload(self) -> None:
        """SIGHUP: a broken file leaves the running state untouched and says so in one line."""
        if self.cluster is not None:
            log.info("SIGHUP: the document comes from etcd and is followed as it changes; nothing to re-read")
            return
        log.info("SIGHUP: re-reading %s", self.config_path)
        try:
            new = await asyncio.to_thread(load_file, self.config_path)
        except XdpError as exc:
            self._reload_failed(str(exc))
            return
        if not await self._adopt(new, "reload"):
            self._reload_failed("its changes could not be applied (see the line above)")

    async def _adopt(self, new: DesiredState, reason: str) -> bool:
        """Makes a validated document the running one, all or nothing: when its changes cannot
        be applied, the previous document stays (its checks too)."""
        old = self.state
        self.state = new
        self.checker.sync(self._targets(new), set())
        if not await self._apply(reason=reason):
            self.state = old
            if old is not None:
                self.checker.sync(self._targets(old), set())
            return False
        try:
            await self._follow_bgp(new)
        except XdpError as exc:
            # The maps follow the new document; the announcements keep their last good state.
            log.error("BGP: the new bgp block could not be applied, the speaker keeps the old one: %s",
                      exc)
        assert self._announce_now is not None
        self._announce_now.set()
        with self._view_lock:
            self.view.reloads["ok"] += 1
            self.view.last_reload_ok = time.time()
        return True

    async def _adopt_revision(self, new: DesiredState, revision: int) -> bool:
        ok = await self._adopt(new, f"revision {revision}")
        if not ok:
            with self._view_lock:
                self.view.reloads["error"] += 1
        return ok

    def _reload_failed(self, why: str) -> None:
        log.error("reload refused, the running configuration stays: %s", why)
        with self._view_lock:
            self.view.reloads["error"] += 1

    # -- BGP: announce what this node can serve ----------------------------------------------
    def _router_id(self, spec: BgpSpec, state: DesiredState) -> str:
        if spec.router_id is not None:
            return spec.router_id
        first = state.interfaces[0]
        addr = bgp.first_address(first)
        if addr is None:
            raise bgp.BgpError(f"no router_id in the bgp block and interface '{first}' has no IPv4 "
                               "address to take it from; hint: add router_id: to the bgp block")
        return addr

    async def _follow_bgp(self, state: DesiredState) -> None:
        """Starts, re-configures or stops the speaker to follow the file's bgp block. BIRD is
        started on this (the main) thread: its death signal is tied to the thread that started
        it, and the worker threads of asyncio.to_thread come and go."""
        spec = state.bgp
        if spec is None:
            if self.speaker is not None:
                log.info("BGP: the file has no bgp block any more; withdrawing everything")
                self._stop_speaker()
            return
        # pyroute2 runs an event loop of its own: not on this thread, where asyncio's runs.
        router_id = await asyncio.to_thread(self._router_id, spec, state)
        if self.speaker is None:
            speaker = bgp.Speaker(self.instance, state_dir(self.instance), spec, router_id)
            # Read before BIRD starts: its sessions take the IPv6 next hop they find then.
            self.session_next_hop6 = await asyncio.to_thread(self.interface_addr6)
            speaker.start()
            self.speaker = speaker
            log.info("BGP: BIRD pid %d, AS %d, router id %s, peers %s (hold time %d s); socket %s",
                     speaker.proc.pid if speaker.proc else 0, spec.local_as, router_id,
                     ", ".join(f"{p.addr} AS {p.asn}" for p in spec.peers), spec.hold_time_s,
                     speaker.sock_path)
        elif (spec, router_id) != (self.speaker.spec, self.speaker.router_id):
            await asyncio.to_thread(self.speaker.set, self.speaker.announced, spec, router_id,
                                    self.speaker.next_hop6)
            log.info("BGP: re-configured: AS %d, router id %s, peers %s", spec.local_as, router_id,
                     ", ".join(f"{p.addr} AS {p.asn}" for p in spec.peers))

    def _stop_speaker(self) -> None:
        if self.speaker is None:
            return
        announced = sorted(self.speaker.announced)
        self.speaker.stop(clean=True)
        self.speaker = None
        if announced:
            log.info("BGP: speaker stopped; withdrew %s", ", ".join(_route(a) for a in announced))

    def drained(self) -> bool:
        return os.path.exists(os.path.join(state_dir(self.instance), bgp.DRAIN_FILE))

    def interface_addr6(self) -> str | None:
        """The first global IPv6 address of the first interface: the /128s' next hop."""
        state = self.state
        if state is None or not state.interfaces:
            return None
        return bgp.first_address(state.interfaces[0], socket.AF_INET6)

    def next_hop6_problem(self) -> str | None:
        """Why this node's sessions cannot carry a /128 (None: they can). BIRD fixes a
        session's IPv6 next hop when the session comes up; one that came up before the
        interface had a global IPv6 address would send /128s with no next hop, which the
        router refuses."""
        assert self.state is not None
        first = self.state.interfaces[0] if self.state.interfaces else "-"
        if self.session_next_hop6 is not None:
            return None
        if self.interface_addr6() is None:
            return f"interface {first} has no global IPv6 address to be the /128's next hop"
        return (f"the BGP sessions came up before interface {first} had a global IPv6 address, so "
                "they carry no IPv6 next hop; hint: restart the agent to announce /128s")

    def announceable(self, drained: bool) -> tuple[set[str], dict[str, str]]:
        """VIP addresses this node should announce now, and why each other one is withheld.
        An address is announced when every VIP on it (each port and protocol) has at least
        min_healthy healthy backends and, for L4, the live program attached where the file
        says answers a self-check with a backend. A node that cannot serve one of its ports
        gives the whole address to the nodes that can (docs/scale-out.md)."""
        assert self.state is not None
        state = self.state
        reasons: dict[str, list[str]] = {}
        addrs: set[str] = set()
        l4 = [vip for vip, e in state.vips.items() if e.mode == "l4"]
        dataplane = self._self_check(state, l4) if l4 else {}
        no_next_hop6 = self.next_hop6_problem() if any(":" in v.addr for v in state.vips) else None
        for vip, entry in sorted(state.vips.items()):
            addrs.add(vip.addr)
            why = reasons.setdefault(vip.addr, [])
            if ":" in vip.addr and no_next_hop6 is not None:
                why.append(f"{vip} ({vip.proto}): {no_next_hop6}")
            active = [b for b in entry.spec.backends if b.state == "active"]
            checked = self._checked(entry.health)
            healthy = sum(1 for b in active if not checked or self._health(vip, b.name).up)
            if healthy < entry.min_healthy:
                why.append(f"{vip} ({vip.proto}): {healthy} of {len(entry.spec.backends)} backends "
                           f"healthy, min_healthy {entry.min_healthy}")
            if vip in dataplane:
                why.append(f"{vip} ({vip.proto}): {dataplane[vip]}")
            if entry.mode == "l7" and self.l7 is None:
                why.append(f"{vip} ({vip.proto}): the L7 proxy is not running")
        if drained:
            return set(), {a: "node drained (lbctl node undrain announces again)" for a in addrs}
        withheld = {a: "; ".join(w) for a, w in reasons.items() if w}
        return addrs - withheld.keys(), withheld

    def _self_check(self, state: DesiredState, vips: list[Endpoint]) -> dict[Endpoint, str]:
        """VIP -> what is wrong with the local data plane for it (nothing: it serves). The
        pinned program must be attached to every interface of the file, and a test run of it
        on a SYN to the VIP must pick a backend (it creates no flow and moves no counter)."""
        from xdp import libbpf
        from xdp.explain import explain

        bal = self.controller.balancer
        try:
            attached = {a.ifname for a in bal.attachments()}
        except (OSError, XdpError) as exc:
            return {v: f"cannot read the XDP attachments: {exc}" for v in vips}
        missing = [i for i in state.interfaces if i not in attached]
        if not state.interfaces or missing:
            what = ", ".join(missing) if missing else "any interface (interfaces: [])"
            return {v: f"the program is not attached to {what}" for v in vips}
        try:
            fd = libbpf.obj_get(bal.prog_pin)
        except (OSError, XdpError) as exc:
            return {v: f"no live program to self-check: {exc}" for v in vips}
        out: dict[Endpoint, str] = {}
        try:
            for vip in vips:
                addr, port = SELF_CHECK_CLIENT6 if ":" in vip.addr else SELF_CHECK_CLIENT
                client = Endpoint(addr, port, vip.proto)
                try:
                    answer = explain(fd, client, vip, new_connection=True)
                except (OSError, XdpError) as exc:
                    out[vip] = f"self-check test run failed: {exc}"
                    continue
                if answer.backend is None:
                    out[vip] = f"self-check: the live program answers '{answer.verdict}', no backend"
        finally:
            libbpf.close(fd)
        return out

    async def _announcer(self) -> None:
        assert self._announce_now is not None and self._apply_lock is not None
        while True:
            try:
                await asyncio.wait_for(self._announce_now.wait(), ANNOUNCE_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._announce_now.clear()
            if self.speaker is None:
                continue
            if self.speaker.proc is not None and self.speaker.proc.poll() is not None:
                # Its sessions closed with it, so the routers already dropped this node.
                log.error("BGP: BIRD exited with %s; starting it again", self.speaker.proc.returncode)
                self.speaker.proc = None
                self.speaker = None
                try:
                    assert self.state is not None
                    await self._follow_bgp(self.state)
                except XdpError as exc:
                    log.error("BGP: cannot start BIRD again, retrying: %s", exc)
                    continue
                if self.speaker is None:
                    continue
            # The apply lock: the self-check reads the attachments and program an apply changes.
            gate = await self._recovery_gate()      # first: it learns the sessions' IPv6 next hop
            async with self._apply_lock:
                drained = self.drained()
                wanted, withheld = await asyncio.to_thread(self.announceable, drained)
            if gate is not None:
                withheld = {**{a: gate for a in wanted}, **withheld}
                wanted = set()
            before = set(self.speaker.announced)
            try:
                changed = await asyncio.to_thread(self.speaker.set, wanted, None, None, self.session_next_hop6)
                self.bgp_error = None
            except XdpError as exc:
                if self.bgp_error != str(exc):
                    log.error("BGP: cannot update the announcements: %s", exc)
                self.bgp_error = str(exc)
                continue
            if changed:
                for addr in sorted(wanted - before):
                    log.info("BGP: announcing %s", _route(addr))
                for addr in sorted(before - wanted):
                    log.warning("BGP: withdrawing %s: %s", _route(addr), withheld.get(addr, "no VIP left on it"))
            for addr, why in sorted(withheld.items()):
                if self.withheld.get(addr) != why and addr not in before - wanted:
                    log.warning("BGP: not announcing %s: %s", _route(addr), why)
            self.withheld = withheld
            self.drain_applied = drained
            if changed:
                self._publish()
            else:
                self._publish_due = True

    async def _recovery_gate(self) -> str | None:
        """None when this node may announce; else why it waits. A node is in service once it
        announced with a session up; it comes back into service (at start, or after losing
        every BGP session: link down, router restart) only when, since its session came up,
        (1) a fresh read of etcd shows the revision it applied is the current one, and (2)
        every checked backend was checked again and its state agrees with its last result.
        Until then its ring may not be the other nodes' (an older revision, backends still
        rising after the link was down), and a flow the router moves to it could get another
        backend. While it has no session its routes are taken out of BIRD, so a session that
        comes back carries nothing stale."""
        assert self.speaker is not None and self.state is not None
        try:
            sessions = await asyncio.to_thread(self.speaker.sessions)
        except bgp.BgpError:
            sessions = []
        if not any(s.established for s in sessions):
            # The address a session coming up now takes as its IPv6 next hop (read while it is
            # down, so an address added after it came up is not taken for one it has).
            self.session_next_hop6 = await asyncio.to_thread(self.interface_addr6)
            if not self.recovering:
                log.warning("BGP: no session established; the VIPs are announced again once the node "
                            "is current (etcd's revision, fresh checks)")
            self.recovering = True
            self._checks_at_session_up = {k: h.checks for k, h in self.checker.states.items()}
            return "no BGP session established"
        if not self.recovering:
            return None
        if self.cluster is not None:
            stale = await asyncio.to_thread(self.cluster.confirm_current)
            if stale is not None:
                return f"coming back into service: {stale}"
        rising = sorted(f"{vip} {name}" for (vip, name) in self._targets(self.state)
                        if (h := self.checker.states.get((vip, name))) is None or h.streak
                        or h.checks <= self._checks_at_session_up.get((vip, name), -1))
        if rising:
            return f"coming back into service: waiting for fresh checks of {', '.join(rising[:3])}" + (
                f" and {len(rising) - 3} more" if len(rising) > 3 else "")
        self.recovering = False
        revision = f"revision {self.cluster.view.applied_revision} current, " if self.cluster else ""
        log.info("BGP: in service: %severy backend checked since the session came up", revision)
        return None

    def bgp_view(self) -> dict[str, Any] | None:
        """What `lbctl status` and `node drain` read back (the sessions are read live)."""
        if self.speaker is None:
            return None
        sp = self.speaker
        return {"local_as": sp.spec.local_as, "router_id": sp.router_id, "hold_time_s": sp.spec.hold_time_s,
                "peers": [{"addr": p.addr, "as": p.asn} for p in sp.spec.peers],
                "socket": sp.sock_path, "drained": bool(self.drain_applied),
                "drain_applied": self.drain_applied is not None,
                "announced": sorted(sp.announced), "withheld": dict(sorted(self.withheld.items())),
                "error": self.bgp_error}

    # -- health events ----------------------------------------------------------------------
    def _on_transition(self, key: HealthKey, state: BackendHealth, result: CheckResult) -> None:
        vip, name = key
        assert self.state is not None
        entry = self.state.vips.get(vip)
        total = len(entry.spec.backends) if entry else 0
        up = sum(1 for b in (entry.spec.backends if entry else ()) if self._health(vip, b.name).up)
        log.warning("backend %s of VIP %s (%s) is %s, reason: %s, check duration: %dms, was %s for "
                    "%.1fs; %d of %d backends up", name, vip, vip.proto, "UP" if state.up else "DOWN",
                    result.reason, round(result.duration_s * 1000), "DOWN" if state.up else "UP",
                    state.previous_state_s, up, total)
        self._publish_due = True
        assert self._dirty is not None
        self._dirty.set()
        if self._announce_now is not None:
            self._announce_now.set()

    def _on_result(self, key: HealthKey, state: BackendHealth) -> None:
        self._publish_due = True

    # -- what others read: metrics and the state file ---------------------------------------
    def _snapshot(self) -> AgentView:
        with self._view_lock:
            return replace(self.view, backends=dict(self.view.backends), all_failing=dict(self.view.all_failing),
                           reloads=dict(self.view.reloads))

    def _rows(self) -> list[dict[str, Any]]:
        rows = []
        assert self.state is not None
        for vip, entry in sorted(self.state.vips.items()):
            checked = self._checked(entry.health)
            for b in entry.spec.backends:
                h = self.checker.states.get((vip, b.name)) if checked else None
                rows.append({
                    "vip": str(vip), "proto": vip.proto, "backend": b.name,
                    "operator_state": b.state,
                    "health": "unchecked" if h is None else ("up" if h.up else "down"),
                    "since": h.since if h else None, "checks": h.checks if h else 0,
                    "last_check": h.last.reason if h and h.last else None,
                    "check_ms": round(h.last.duration_s * 1000, 3) if h and h.last else None,
                    "failures": h.failures if h else 0,
                })
        return rows

    def _health_by_vip(self) -> dict[str, dict[str, Any]]:
        """'VIP:PORT/proto' -> backends up (in the ring by the checks) of those the document lists."""
        assert self.state is not None
        failing = {f"{v}/{v.proto}" for v in self.all_failing}
        out: dict[str, dict[str, Any]] = {}
        for r in self._rows():
            key = f"{r['vip']}/{r['proto']}"
            v = out.setdefault(key, {"up": 0, "total": 0, "down": [], "all_failing": key in failing})
            v["total"] += 1
            if r["health"] == "down":
                v["down"].append(r["backend"])
            else:
                v["up"] += 1
        return out

    def _node_record(self) -> dict[str, Any]:
        """What this node publishes in etcd besides its revisions (cluster.ClusterNode.record)."""
        return {"instance": self.instance, "agent_version": self.version, "health": self._health_by_vip(),
                "rings": dict(self.ring_fingerprints), "bgp": self.bgp_view()}

    def _node_record_sessions(self, record: dict[str, Any]) -> None:
        """Adds the BGP sessions read live from this node's BIRD (a socket call: run in a thread)
        and the one-line summary `cluster status` shows."""
        view = record.get("bgp")
        speaker = self.speaker
        if not view or speaker is None:
            return
        try:
            sessions = speaker.sessions()
            view["sessions"] = [{"peer": x.peer, "state": x.info, "established": x.established} for x in sessions]
        except bgp.BgpError as exc:
            sessions, view["sessions_error"] = [], str(exc)
        up = sum(1 for x in sessions if x.established)
        summary = f"{up}/{len(view.get('peers') or [])} established, {len(view.get('announced') or [])} announced"
        if view.get("drained"):
            summary += ", drained"
        if view.get("withheld"):
            summary += f", {len(view['withheld'])} withheld"
        if view.get("error"):
            summary += ", error"
        view["summary"] = summary

    def _publish(self) -> None:
        self._publish_due = False
        if self.state is None:
            return
        rows = self._rows()
        with self._view_lock:
            self.view.backends = {
                (r["vip"], r["proto"], r["backend"]): BackendHealthView(
                    r["health"], r["operator_state"],
                    None if r["check_ms"] is None else r["check_ms"] / 1000,
                    "" if r["health"] == "unchecked" or (r["last_check"] or "").find("passed") >= 0
                    else (r["last_check"] or ""), r["checks"], r["failures"])
                for r in rows}
            self.view.all_failing = {(str(v), v.proto): True for v in self.all_failing}
            self.view.checks_inconclusive = self.checker.inconclusive
            self.view.checker_stalls = self.checker.stalls
        data = {"pid": os.getpid(), "instance": self.instance, "config": self.view.config_path,
                "updated": time.time(), "metrics_addr": self.metrics_addr, "bgp": self.bgp_view(),
                "all_failing": sorted(f"{v} ({v.proto})" for v in self.all_failing), "backends": rows,
                "rings": dict(self.ring_fingerprints),
                "cluster": None if self.cluster is None else {"node": self.cluster.name,
                                                              **self.cluster.view.as_dict()},
                "health": {f"{v}/{v.proto}": _health_dict(e.health)
                           for v, e in self.state.vips.items() if e.health is not None},
                # The maps never hold an L7 VIP: export reads them from here, as the file has them.
                "l7_vips": [vip_item(v, e) for v, e in sorted(self.state.l7_vips().items())]}
        path = os.path.join(state_dir(self.instance), STATE_FILE)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)   # readers see the old file or the new one, never half of one

    async def _publisher(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            # A node of a cluster also shows whether etcd answers, which changes without a check.
            if self._publish_due or self.cluster is not None:
                self._publish()

    def _remove_published(self) -> None:
        """Removes the state file and (still holding it) the lock: nothing of the agent's is
        left in /run. A second agent opening the lock meanwhile fails its non-blocking flock."""
        for name in (STATE_FILE, LOCK_FILE) if self._lock_fd is not None else (STATE_FILE,):
            try:
                os.unlink(os.path.join(state_dir(self.instance), name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(state_dir(self.instance))
        except OSError:
            pass   # not empty (someone else's file) or already gone


def _health_dict(h: HealthSpec | None) -> dict[str, Any] | None:
    if h is None:
        return None
    return {"check": h.check, "path": h.path, "expect": list(h.expect), "interval_ms": h.interval_ms,
            "timeout_ms": h.timeout_ms, "rise": h.rise, "fall": h.fall, "port": h.port}


def setup_logging() -> None:
    """One line per event on stderr (the journal under systemd adds its own timestamps, but a
    foreground run needs them)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s lbctl-agent %(levelname)s: %(message)s"))
    root = logging.getLogger("lbctl")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def set_drained(instance: str, drained: bool, wait_s: float = 5.0) -> dict[str, Any]:
    """`lbctl node drain|undrain`: sets the instance's drain flag (a file, so an agent started
    later starts drained too), wakes the running agent and waits until it has published the
    announcements that follow. Returns what it found: agent pid, announced, withheld."""
    os.makedirs(state_dir(instance), exist_ok=True)
    flag = os.path.join(state_dir(instance), bgp.DRAIN_FILE)
    was = os.path.exists(flag)
    if drained:
        with open(flag, "w") as f:
            f.write(f"{time.time()}\n")
    else:
        try:
            os.unlink(flag)
        except FileNotFoundError:
            pass
    out: dict[str, Any] = {"instance": instance, "drained": drained, "changed": was != drained,
                           "agent": None, "bgp": None, "settled": False}
    agent = read_published(instance)
    if agent is None:
        return out
    out["agent"] = agent["pid"]
    os.kill(agent["pid"], signal.SIGUSR1)
    deadline = time.monotonic() + wait_s
    while True:
        agent = read_published(instance)
        view = (agent or {}).get("bgp")
        if view is None:
            return out          # an agent without a bgp block announces nothing to drain
        out["bgp"] = view
        if view.get("drain_applied") and view.get("drained") == drained:
            out["settled"] = True
            return out
        if time.monotonic() > deadline:
            return out
        time.sleep(0.1)
