"""Every change goes through here: desired config vs. what the maps hold -> a plan (ids, rings,
share of slots moved) -> apply in an order where a packet never sees a half-made change."""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from lbctl.errors import ConfigError
from lbctl.maglev import (
    DEFAULT_RING_SIZE,
    EMPTY_SLOT,
    MaglevBackend,
    MaglevError,
    build_ring,
    ring_fingerprint,
    unplaced_backends,
)
from lbctl.model import (
    BackendSpec,
    Config,
    VipSpec,
    check_vip,
    format_port_range,
    snat_family_problem,
)
from xdp.codec import (
    NO_BACKEND,
    Endpoint,
    affinity_of,
    format_endpoint,
    forwarding_of,
    is_ipv6,
    vip_flags,
)
from xdp.errors import MapFullError
from xdp.limits import DEFAULT_LIMITS, DP_FLAGS, Limits


@dataclass(frozen=True)
class LiveVip:
    """A VIP as the maps hold it."""

    spec: VipSpec
    vip_id: int
    ring_generation: int
    backend_ids: dict[str, int]        # backend name -> id in backends[]
    # Reads the live ring (backend id per slot) from the maps when a plan needs it; without
    # it the planner rebuilds the ring from `spec`, which costs as much as the new ring.
    read_ring: Callable[[], Sequence[int]] | None = field(default=None, compare=False, repr=False)


LiveState = dict[Endpoint, LiveVip]


@dataclass
class VipChange:
    vip: Endpoint
    action: str                         # add | delete | update
    vip_id: int
    old: VipSpec | None
    new: VipSpec | None
    backend_ids: dict[str, int] = field(default_factory=dict)   # every backend of `new`
    new_backend_ids: dict[str, int] = field(default_factory=dict)
    ring: list[int] = field(default_factory=list)               # backend id per slot
    moved_slots: int = 0
    ring_size: int = DEFAULT_RING_SIZE
    ring_changed: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def moved_share(self) -> float:
        return self.moved_slots / self.ring_size

    def describe(self) -> list[str]:
        if self.action == "add":
            lines = [f"+ vip {self.vip} ({self.vip.proto})"]
        elif self.action == "delete":
            count = len(self.old.backends) if self.old else 0
            return [f"- vip {self.vip} ({self.vip.proto}) and its {count} backends"]
        else:
            lines = [f"~ vip {self.vip} ({self.vip.proto})"]
        assert self.new is not None  # add and update always carry the new spec
        if self.old is not None and self.old.forwarding != self.new.forwarding:
            # The program keeps each tracked flow's mode in its entry: switching is hitless
            # for open connections, which end as they began.
            lines.append(f"  forwarding {self.old.forwarding}->{self.new.forwarding} (new flows; "
                         f"tracked flows keep {self.old.forwarding} until they end)")
        elif self.old is None and self.new.forwarding != "nat":
            lines[0] += f" forwarding {self.new.forwarding}"
        if self.new.forwarding == "fullnat":
            snat = (self.new.snat, self.new.snat_ports)
            if self.old is None or self.old.forwarding != "fullnat" or \
                    (self.old.snat, self.old.snat_ports) != snat:
                lines.append(f"  snat {','.join(self.new.snat) or 'the FIB source toward each backend'}"
                             f" ports {format_port_range(self.new.snat_ports)}"
                             + (" (new flows; tracked flows keep theirs)" if self.old else ""))
        if self.old is not None and self.old.affinity != self.new.affinity:
            lines.append(f"  affinity {self.old.affinity}->{self.new.affinity}")
        elif self.old is None and self.new.affinity != "flow":
            lines[0] += f" affinity {self.new.affinity}"
        old = {b.name: b for b in self.old.backends} if self.old else {}
        new = {b.name: b for b in self.new.backends}
        for name, b in new.items():
            if name not in old:
                lines.append(f"  + backend {name} weight {b.weight} {b.state}")
            elif old[name] != b:
                diffs = [f"{attr} {getattr(old[name], attr)}->{getattr(b, attr)}"
                         for attr in ("weight", "state") if getattr(old[name], attr) != getattr(b, attr)]
                lines.append(f"  ~ backend {name} {' '.join(diffs)}")
        for name in old.keys() - new.keys():
            lines.append(f"  - backend {name}")
        if self.ring_changed and self.action == "update":
            lines.append(f"  ring: {self.moved_slots} of {self.ring_size} slots move "
                         f"({self.moved_share:.1%})")
        return lines


@dataclass
class Plan:
    changes: list[VipChange]
    # Warnings about the host rather than one VIP's change (a DSR backend the balancer
    # cannot reach at L2), added when the plan is applied.
    host_warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    @property
    def warnings(self) -> list[str]:
        """What the plan does that the user may not expect (printed apart from the plan)."""
        return [w for c in self.changes for w in c.warnings] + self.host_warnings

    def describe(self) -> list[str]:
        if self.empty:
            return ["no changes"]
        return [line for c in self.changes for line in c.describe()]


def _ring_ids(spec: VipSpec | None, backend_ids: dict[str, int], ring_size: int,
              seed: int) -> tuple[list[int], list[str]]:
    """The VIP's Maglev ring by backend id (NO_BACKEND: empty slot), and the active backends
    whose share rounded to no slot. Only active backends take slots."""
    members = [b for b in (spec.backends if spec else ()) if b.in_ring]
    ring_members = [MaglevBackend(b.name, b.weight) for b in members]
    try:
        ring = build_ring(ring_members, ring_size, seed)
    except MaglevError as exc:
        where = f" of VIP {spec.vip}" if spec else ""
        raise ConfigError(f"cannot build the ring{where}: {exc}") from exc
    # One lookup per slot into a list indexed like the ring: 65537 names looked up in a dict,
    # or formatted, were a quarter of a change's cost.
    ids = [backend_ids[m.name] for m in ring_members]
    ids.append(NO_BACKEND)       # index -1 (EMPTY_SLOT) lands here
    return list(map(ids.__getitem__, ring)), unplaced_backends(ring_members, ring)


def _live_ring(lv: LiveVip, ring_size: int, seed: int) -> Sequence[int]:
    """The ring the data plane uses for `lv`: read from the maps when the live state can, or
    rebuilt from its spec (the same ring, as every node computes the same one)."""
    if lv.read_ring is not None:
        try:
            ring = lv.read_ring()
        except (OSError, KeyError):
            ring = ()      # maps closed or unreadable: rebuild instead
        if len(ring) == ring_size:
            return ring
    return _ring_ids(lv.spec, lv.backend_ids, ring_size, seed)[0]


def check_families(desired: Config) -> None:
    """A VIP, its backends and its SNAT addresses share one address family: the data plane
    rewrites addresses in place (NAT44, NAT66, full-NAT of either), it does not translate
    between families."""
    for vip, spec in desired.items():
        problem = snat_family_problem(vip, spec.snat)
        if problem is not None:
            raise ConfigError(problem)
        for b in spec.backends:
            if is_ipv6(b.addr) != vip.ipv6:
                vip_family, b_family = ("IPv6", "IPv4") if vip.ipv6 else ("IPv4", "IPv6")
                raise ConfigError(f"backend {b.name} is {b_family} but VIP {vip} is {vip_family}; "
                                  "hint: a VIP and its backends share one address family")


def plan(live: LiveState, desired: Config, limits: Limits = DEFAULT_LIMITS, seed: int = 0,
         busy_backend_ids: Callable[[], set[int]] | None = None) -> Plan:
    """A pure function: what must change for the maps to hold `desired`. Raises MapFullError
    before anything is written when ids run out.

    `busy_backend_ids` gives the ids that tracked flows still point at (a deleted backend's
    established connections go on, counted under its id); it is asked at most once, and only
    when a new backend needs an id."""
    check_families(desired)
    used_vip_ids = {lv.vip_id for v, lv in live.items() if v in desired}
    used_backend_ids = {i for v, lv in live.items() if v in desired for i in lv.backend_ids.values()}
    # Ids of removed VIPs and backends are freed only after this plan: never reused within it,
    # so no packet meets a new owner of an id while the old one is being taken out.
    reserved_backend_ids = {i for lv in live.values() for i in lv.backend_ids.values()}
    reserved_vip_ids = {lv.vip_id for lv in live.values()}
    flows_asked = busy_backend_ids is None
    busy_count = 0

    def take_backend_id(name: str) -> int:
        nonlocal flows_asked, busy_count
        if not flows_asked:
            flows_asked = True
            # A new backend under an id that flows still use would inherit their packets in
            # its counters (and show traffic it never carried): skip those ids until they end.
            assert busy_backend_ids is not None
            busy = busy_backend_ids() - used_backend_ids - reserved_backend_ids
            busy_count = len(busy)
            reserved_backend_ids.update(busy)
        for i in range(limits.max_backends):
            if i not in used_backend_ids and i not in reserved_backend_ids:
                used_backend_ids.add(i)
                return i
        held = (f" ({busy_count} are held by live flows of deleted backends until those end; "
                "'lbctl flows list' shows them)") if busy_count else ""
        raise MapFullError(f"cannot add backend {name}: all {limits.max_backends} slots are in "
                           f"use{held}; hint: delete unused backends first")

    def take_vip_id(vip: Endpoint) -> int:
        for i in range(limits.max_vips):
            if i not in used_vip_ids and i not in reserved_vip_ids:
                used_vip_ids.add(i)
                return i
        raise MapFullError(f"cannot add VIP {vip}: all {limits.max_vips} slots are in use; "
                           "hint: delete unused VIPs first")

    changes: list[VipChange] = []
    for vip in sorted(live.keys() - desired.keys()):
        gone = live[vip]
        changes.append(VipChange(vip, "delete", gone.vip_id, gone.spec, None, dict(gone.backend_ids)))
    for vip in sorted(desired):
        new = desired[vip]
        lv = live.get(vip)
        if lv is not None and lv.spec == new:
            continue
        check_vip(new)      # every path (CLI, file, agent) meets the same rules here
        if lv is None:
            change = VipChange(vip, "add", take_vip_id(vip), None, new, ring_size=limits.ring_size)
        else:
            change = VipChange(vip, "update", lv.vip_id, lv.spec, new, ring_size=limits.ring_size)
        for b in new.backends:
            if lv is not None and b.name in lv.backend_ids:
                change.backend_ids[b.name] = lv.backend_ids[b.name]
            else:
                bid = take_backend_id(b.name)
                change.backend_ids[b.name] = bid
                change.new_backend_ids[b.name] = bid
        # Ids, not names, compare rings: a kept backend keeps its id, and no id freed by this
        # plan is handed out in it, so a slot's id changes exactly when its backend does.
        new_ring, unplaced = _ring_ids(new, change.backend_ids, limits.ring_size, seed)
        total_weight = sum(b.weight for b in new.backends if b.in_ring)
        for name in unplaced:
            weight = next(b.weight for b in new.backends if b.name == name)
            change.warnings.append(
                f"backend {name} of VIP {vip} gets no ring slot (weight {weight} of {total_weight} "
                f"is {limits.ring_size * weight / total_weight:.2f} of {limits.ring_size} slots), so "
                f"it receives no new connections; hint: raise its weight or lower the others'")
        if lv is not None:
            old_ring = _live_ring(lv, limits.ring_size, seed)
            change.moved_slots = sum(map(operator.ne, old_ring, new_ring))
        change.ring_changed = lv is None or change.moved_slots > 0
        change.ring = new_ring
        changes.append(change)
    return Plan(changes)


class MapsWriter(Protocol):
    """What apply() needs from the maps (xdp.maps.LbMaps has it; tests may pass a recorder)."""

    def put_vip(self, vip: Endpoint, vip_id: int, ring_generation: int, backend_count: int,
                flags: int = 0) -> None: ...
    def delete_vip(self, vip: Endpoint) -> bool: ...
    def put_backend(self, backend_id: int, addr: str, port: int, state: str, vip_id: int, weight: int) -> None: ...
    def clear_backend(self, backend_id: int) -> None: ...
    def write_ring(self, vip_id: int, generation: int, backend_ids: list[int]) -> None: ...
    def reset_counters(self, name: str, index: int) -> None: ...
    def forget_flows(self, vip_id: int) -> int: ...
    def put_snat_cfg(self, vip_id: int, addrs: tuple[str, ...], port_min: int, port_max: int) -> None: ...


def fullnat_dp_flags(the_plan: Plan, live: LiveState) -> int:
    """dp_config's full-NAT flags for the configuration the plan leaves: one per family that
    has a full-NAT VIP (the program then looks a non-VIP packet up in that family's snat_rnat)."""
    after = {vip: lv.spec for vip, lv in live.items()}
    for c in the_plan.changes:
        if c.action == "delete":
            after.pop(c.vip, None)
        elif c.new is not None:
            after[c.vip] = c.new
    flags = 0
    for vip, spec in after.items():
        if spec.forwarding == "fullnat":
            flags |= DP_FLAGS["fullnat6" if vip.ipv6 else "fullnat"]
    return flags


def _put_dp_flags(maps: MapsWriter, wanted: int, before: bool) -> None:
    """Before the changes: the old flags and the new (a new full-NAT VIP's first reply is
    looked up). After: the new, and a family's flag stays while its reverse table still holds
    entries (flows of a VIP switched away from full-NAT end full-NAT: their replies must still
    be found). Maps without dp_config (a test's recorder) are left alone."""
    put = getattr(maps, "put_dp_flags", None)
    if put is None:
        return
    if before:
        put(maps.dp_flags() | wanted)   # type: ignore[attr-defined]
        return
    for name, table in (("fullnat", "snat_rnat"), ("fullnat6", "snat_rnat6")):
        if maps.holds_entries(table):   # type: ignore[attr-defined]
            wanted |= DP_FLAGS[name]
    put(wanted)


def apply(the_plan: Plan, live: LiveState, maps: MapsWriter) -> None:
    """Writes a plan. Per VIP the order keeps every packet's view whole: backends a new ring
    needs exist before the ring; the ring is written into the VIP's idle half and goes live
    with one update of the VIP entry; what only the old ring used is removed after."""
    if the_plan.empty:
        return
    dp_flags = fullnat_dp_flags(the_plan, live)
    _put_dp_flags(maps, dp_flags, before=True)
    _apply_changes(the_plan, live, maps)
    _put_dp_flags(maps, dp_flags, before=False)


def _apply_changes(the_plan: Plan, live: LiveState, maps: MapsWriter) -> None:
    for c in the_plan.changes:
        if c.action == "delete":
            maps.delete_vip(c.vip)
            for bid in c.backend_ids.values():
                maps.clear_backend(bid)
            maps.forget_flows(c.vip_id)
            continue
        assert c.new is not None
        old = {b.name: b for b in c.old.backends} if c.old else {}
        removed = [live[c.vip].backend_ids[n] for n in old if c.new.backend(n) is None] if c.old else []
        late: list[BackendSpec] = []
        for b in c.new.backends:
            bid = c.backend_ids[b.name]
            if b.name in c.new_backend_ids:
                maps.reset_counters("stats_backend", bid)
            elif old.get(b.name) == b:
                continue
            elif not b.in_ring and old[b.name].in_ring:
                late.append(b)        # leaving the ring: mark it only once the ring no longer has it
                continue
            maps.put_backend(bid, b.addr, b.port, b.state, c.vip_id, b.weight)
        in_ring = sum(1 for b in c.new.backends if b.in_ring)
        if c.new.forwarding == "fullnat" and (c.old is None or c.old.forwarding != "fullnat" or
                                              (c.old.snat, c.old.snat_ports) !=
                                              (c.new.snat, c.new.snat_ports)):
            # Before the VIP entry that makes it full-NAT: its first new flow finds its settings.
            maps.put_snat_cfg(c.vip_id, c.new.snat, *c.new.snat_ports)
        if c.action == "add":
            maps.reset_counters("stats_vip", c.vip_id)
            maps.write_ring(c.vip_id, 0, c.ring)
            maps.put_vip(c.vip, c.vip_id, 0, in_ring, vip_flags(c.new.affinity, c.new.forwarding))
        else:
            generation = live[c.vip].ring_generation
            if c.ring_changed:
                generation ^= 1
                maps.write_ring(c.vip_id, generation, c.ring)
            maps.put_vip(c.vip, c.vip_id, generation, in_ring, vip_flags(c.new.affinity, c.new.forwarding))
        for b in late:
            maps.put_backend(c.backend_ids[b.name], b.addr, b.port, b.state, c.vip_id, b.weight)
        for bid in removed:
            maps.clear_backend(bid)


def read_live(maps) -> LiveState:
    """Rebuilds the configuration from the maps alone: they are the one source of truth."""
    by_vip_id: dict[int, list] = {}
    for rec in maps.backends():
        by_vip_id.setdefault(rec.vip_id, []).append(rec)
    live: LiveState = {}
    for vip, meta in maps.vips().items():
        recs = by_vip_id.get(meta.vip_id, [])
        specs = tuple(sorted((BackendSpec(r.addr, r.port, r.weight, r.state) for r in recs),
                             key=lambda b: (b.addr, b.port)))
        reader = getattr(maps, "read_ring", None)
        spec = VipSpec(vip, specs, affinity_of(meta.flags), forwarding_of(meta.flags))
        snat_reader = getattr(maps, "snat_cfg", None)
        if spec.forwarding == "fullnat" and snat_reader is not None:
            cfg = snat_reader(meta.vip_id)
            spec = replace(spec, snat=cfg.addrs, snat_ports=(cfg.port_min, cfg.port_max))
        live[vip] = LiveVip(spec, meta.vip_id, meta.ring_generation,
                            {format_endpoint(r.addr, r.port): r.backend_id for r in recs},
                            functools.partial(reader, meta.vip_id, meta.ring_generation)
                            if reader is not None else None)
    return live


def ring_fingerprints(live: LiveState, ring_size: int = DEFAULT_RING_SIZE, seed: int = 0) -> dict[Endpoint, str]:
    """Each VIP's ring fingerprint (maglev.ring_fingerprint) from the ring the data plane uses:
    backend ids are this node's own numbering, so slots are translated to backend names."""
    out = {}
    for vip, lv in live.items():
        names = list(lv.backend_ids)
        index_of = {bid: i for i, bid in enumerate(lv.backend_ids.values())}
        index_of[NO_BACKEND] = EMPTY_SLOT
        ring = _live_ring(lv, ring_size, seed)
        try:
            slots = list(map(index_of.__getitem__, ring))
        except KeyError:
            # A slot naming a backend id the VIP does not hold: not a ring any node can match.
            out[vip] = "corrupt"
            continue
        out[vip] = ring_fingerprint(slots, names)
    return out
