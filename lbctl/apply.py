"""`lbctl apply` and `lbctl export`: a whole config file against the running balancer, through
the same planner as the map commands (attach what the file lists, then one plan for the maps,
with the ring share moved and the live flows touched per VIP); and the live state as a file."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from lbctl import planner
from lbctl.config import DesiredState, HealthSpec, VipEntry, dump
from lbctl.control import Controller, check_new_addresses, sync_dsr_neighbours
from lbctl.model import Config
from xdp.balancer import require_root
from xdp.codec import Endpoint
from xdp.errors import NotAttachedError
from xdp.limits import Limits


@dataclass
class ApplyResult:
    plan: planner.Plan
    attach: list[str]                      # interfaces the file adds (or switches mode on)
    left_attached: list[str]               # attached here, not in the file: left alone
    xdp_mode: str
    flows_touched: dict[Endpoint, int] = field(default_factory=dict)
    applied: bool = False
    l7_vips: list[str] = field(default_factory=list)   # in the file; served by the agent, not here

    @property
    def empty(self) -> bool:
        return self.plan.empty and not self.attach

    def describe(self) -> list[str]:
        lines = [f"+ attach {name} ({self.xdp_mode})" for name in self.attach]
        if not self.plan.empty:
            for change in self.plan.changes:
                lines.extend(change.describe())
                touched = self.flows_touched.get(change.vip, 0)
                if touched:
                    what = "are forgotten" if change.action == "delete" else "are on backends that leave the ring"
                    lines.append(f"  flows: {touched} live flows {what}")
        if not lines:
            lines.append("no changes")
        lines.extend(f"note: {name} is attached but not in the file; left attached "
                     f"('lbctl detach {name}' removes it)" for name in self.left_attached)
        lines.extend(f"note: {vip} is mode l7: the agent's L7 proxy serves it from the agent's file "
                     "(apply changes the maps only; edit that file and send the agent SIGHUP)"
                     for vip in self.l7_vips)
        return lines


def _flow_timeouts_ns(limits: Limits) -> dict[str, int]:
    s = 1_000_000_000
    return {"syn": limits.tcp_syn_timeout_s * s, "established": limits.tcp_established_timeout_s * s,
            "closing": limits.tcp_closing_timeout_s * s, "udp": limits.udp_timeout_s * s}


def leaving_ids(change: planner.VipChange, live: planner.LiveState) -> set[int]:
    """Backend ids whose flows the change touches: a deleted VIP's, and those of backends
    that are removed or leave the ring (drain, down)."""
    if change.action == "add" or change.old is None:
        return set()
    ids = live[change.vip].backend_ids
    if change.action == "delete" or change.new is None:
        return set(ids.values())
    out = set()
    for b in change.old.backends:
        new = change.new.backend(b.name)
        if new is None or (b.in_ring and not new.in_ring) or (new.state == "down" and b.state != "down"):
            out.add(ids[b.name])
    return out


def count_flows_touched(the_plan: planner.Plan, live: planner.LiveState, maps, limits: Limits) -> dict[Endpoint, int]:
    """Live (not timed out) tracked flows per VIP that the plan touches."""
    by_vip = {c.vip: (live[c.vip].vip_id, leaving_ids(c, live)) for c in the_plan.changes if c.vip in live}
    wanted = {vip_id: (vip, ids) for vip, (vip_id, ids) in by_vip.items() if ids}
    counts: dict[Endpoint, int] = {}
    if not wanted:
        return counts
    timeouts = _flow_timeouts_ns(limits)
    now = time.monotonic_ns()   # the data plane stamps flows with bpf_ktime_get_ns, CLOCK_MONOTONIC
    for rec in maps.flows():
        hit = wanted.get(rec.vip_id)
        if hit is None or rec.backend_id not in hit[1]:
            continue
        if now - rec.last_seen_ns > timeouts.get(rec.state, timeouts["established"]):
            continue
        counts[hit[0]] = counts.get(hit[0], 0) + 1
    return counts


def _maps_exist(controller: Controller) -> bool:
    return os.path.exists(os.path.join(controller.balancer.pin_dir, "vips"))


def apply_config(controller: Controller, desired: Config, interfaces: tuple[str, ...], xdp_mode: str,
                 dry_run: bool = False, count_flows: bool = True) -> ApplyResult:
    """Brings the balancer to `desired`: attaches the listed interfaces, then plans and writes
    the maps in one step. Everything is checked (ids, map room) before the first write."""
    require_root()
    bal = controller.balancer
    # The same lock as the map commands: an apply never interleaves with them.
    with controller._locked():
        current = {a.ifname: a for a in bal.attachments()}
        # auto leaves an attached interface in whatever mode its driver's default gave it.
        to_attach = [n for n in interfaces
                     if n not in current or (xdp_mode != "auto" and current[n].mode != xdp_mode)]
        left = [n for n in current if n not in interfaces]
        if desired and not interfaces and not current and not _maps_exist(controller):
            raise NotAttachedError("the file lists no interfaces and the balancer is not attached here; "
                                   "hint: add 'interfaces: [IFACE, ...]' to the file, or run 'lbctl attach'")
        live: planner.LiveState = {}
        if _maps_exist(controller):
            with bal.maps() as maps:
                live = planner.read_live(maps)
                check_new_addresses(live, desired)
                the_plan = planner.plan(live, desired, controller.limits, controller.maglev_seed)
                touched = count_flows_touched(the_plan, live, maps, controller.limits) if count_flows else {}
        else:
            # Fresh host (after a boot): plan against empty maps, so a file that cannot fit
            # is refused before anything is compiled or attached.
            check_new_addresses({}, desired)
            the_plan = planner.plan({}, desired, controller.limits, controller.maglev_seed)
            touched = {}
        result = ApplyResult(the_plan, to_attach, left, xdp_mode, touched)
        if dry_run or result.empty:
            return result
        if to_attach:
            try:
                bal.attach(list(to_attach), None if xdp_mode == "auto" else xdp_mode)
            finally:
                bal.close()
        with bal.maps() as maps:
            if not the_plan.empty:
                # Re-read under the same lock: attach may just have created the maps.
                live = planner.read_live(maps)
                the_plan = planner.plan(live, desired, controller.limits, controller.maglev_seed,
                                        busy_backend_ids=maps.tracked_backend_ids)
                planner.apply(the_plan, live, maps)
                the_plan.host_warnings += sync_dsr_neighbours(live, desired)
        result.plan = the_plan
        result.applied = True
        return result


def apply_state(controller: Controller, state: DesiredState, dry_run: bool = False) -> ApplyResult:
    result = apply_config(controller, state.config(), state.interfaces, state.xdp_mode, dry_run)
    result.l7_vips = [str(v) for v in sorted(state.l7_vips())]
    return result


def live_state(controller: Controller) -> tuple[list[str], str, dict[Endpoint, VipEntry]]:
    """What the balancer runs: attached interfaces, their mode, and the VIPs the maps hold.
    When an agent runs, a backend its checks drained is shown in the file's state and each
    VIP gets its health block back, so the export is the agent's file, not a health snapshot."""
    from lbctl.agent import read_published  # here, not at the top: the agent imports this module

    require_root()
    attachments = controller.balancer.attachments()
    modes = sorted({a.mode for a in attachments})
    agent = read_published(controller.instance) or {}
    operator = {(r["vip"], r["proto"], r["backend"]): r["operator_state"] for r in agent.get("backends", [])}
    health = agent.get("health", {})
    vips: dict[Endpoint, VipEntry] = {}
    if _maps_exist(controller):
        with controller.balancer.maps() as maps:
            for vip, lv in planner.read_live(maps).items():
                key = str(vip)
                backends = tuple(replace(b, state=operator.get((key, vip.proto, b.name), b.state))
                                 for b in lv.spec.backends)
                h = health.get(f"{key}/{vip.proto}")
                spec = None if h is None else HealthSpec(h["check"], h["path"], tuple(h["expect"]),
                                                         h["interval_ms"], h["timeout_ms"], h["rise"],
                                                         h["fall"], h["port"])
                vips[vip] = VipEntry(replace(lv.spec, backends=backends), spec)
    # Interfaces in different modes were attached by driver default: export says auto.
    mode = "native" if not modes else modes[0] if len(modes) == 1 else "auto"
    return [a.ifname for a in attachments], mode, vips


def export_text(controller: Controller) -> str:
    """The live state as a file: interfaces and L4 VIPs from the maps, and (while an agent
    runs) its mode: l7 VIPs with their l7 blocks, which live in the agent, not in the maps."""
    from lbctl.agent import read_published

    interfaces, mode, vips = live_state(controller)
    agent = read_published(controller.instance) or {}
    return dump(interfaces, mode, vips, agent.get("l7_vips", []))
