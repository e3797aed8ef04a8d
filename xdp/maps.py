"""The balancer's pinned maps: one table of what each holds (key, value, type, size), opened as
libbpf.MapHandles and read and written through the codecs (no compile, no bcc)."""
from __future__ import annotations

import ctypes
import errno
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING

from xdp import codec, libbpf, tracing
from xdp.errors import IncompatibleMapsError, MapFullError, NotAttachedError
from xdp.libbpf import MapType
from xdp.limits import DEFAULT_LIMITS, FLOW_STATES, OUTCOMES, PIN_ROOT, Limits

if TYPE_CHECKING:  # typing.Self is 3.11+; the project still runs on 3.9
    from typing_extensions import Self


# The program stamps last_seen at most once per refresh interval (1 s) and reads a coarse
# clock: an entry counts as alive a little past its timeout rather than a little before.
_ALIVE_SLACK_NS = 2_000_000_000


def monotonic_ns() -> int:
    """The clock of the program's time stamps (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def flow_timeout_s(limits: Limits, state: str) -> int:
    """How long a flow-table entry in `state` lives without a packet (lb_timeout_ns in C)."""
    return {"syn": limits.tcp_syn_timeout_s, "established": limits.tcp_established_timeout_s,
            "closing": limits.tcp_closing_timeout_s}.get(state, limits.udp_timeout_s)


def entry_alive(limits: Limits, state: str, last_seen_ns: int, now_ns: int) -> bool:
    """Whether the program would still forward by this entry (lb_entry_alive in C)."""
    return now_ns - last_seen_ns <= flow_timeout_s(limits, state) * 1_000_000_000 + _ALIVE_SLACK_NS


def pin_dir_for(instance: str) -> str:
    """Where one balancer instance (the host, or a named network namespace) pins its objects."""
    return os.path.join(PIN_ROOT, instance)


@dataclass(frozen=True)
class MapSpec:
    """One map as bpf_programs/lb_maps.h declares it. tests/bpf/test_layout.py compares each
    entry with what clang and the kernel made of the C declaration."""

    key_type: type
    value_type: type
    map_type: MapType
    entries: Callable[[Limits], int]

    def shape(self, limits: Limits) -> MapShape:
        return MapShape(self.map_type, ctypes.sizeof(self.key_type),
                        ctypes.sizeof(self.value_type), self.entries(limits))


@dataclass(frozen=True)
class MapShape:
    """What the kernel knows of a map, and all that must match for this build to use it."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int

    @classmethod
    def of(cls, info: libbpf.MapInfo) -> MapShape:
        return cls(info.type, info.key_size, info.value_size, info.max_entries)

    def __str__(self) -> str:
        names = libbpf.MAP_TYPE_NAMES
        kind = names[self.map_type] if self.map_type < len(names) else f"type {self.map_type}"
        return (f"{kind}, key {self.key_size} B, value {self.value_size} B, "
                f"{self.max_entries} entries")


# Every map the program pins, by its pin name.
MAPS: dict[str, MapSpec] = {
    "vips": MapSpec(codec.VipKey, codec.VipMeta, MapType.HASH, attrgetter("max_vips")),
    "backends": MapSpec(ctypes.c_uint32, codec.BackendEntry, MapType.ARRAY, attrgetter("max_backends")),
    # Value: a backend id, or codec.NO_BACKEND.
    "rings": MapSpec(ctypes.c_uint32, ctypes.c_uint32, MapType.ARRAY, attrgetter("ring_entries")),
    "flows": MapSpec(codec.FlowKey, codec.NatEntry, MapType.LRU_HASH, attrgetter("flow_table_size")),
    "rnat": MapSpec(codec.FlowKey, codec.NatEntry, MapType.LRU_HASH, attrgetter("flow_table_size")),
    "frags": MapSpec(codec.FragKey, codec.FragEntry, MapType.LRU_HASH, attrgetter("frag_table_size")),
    # IPv6 (bpf_programs/lb_maps6.h): its own VIP and tracking tables; ids, backends, rings
    # and counters are shared with IPv4.
    "vips6": MapSpec(codec.VipKey6, codec.VipMeta, MapType.HASH, attrgetter("max_vips")),
    "flows6": MapSpec(codec.FlowKey6, codec.NatEntry6, MapType.LRU_HASH, attrgetter("flow_table_size")),
    "rnat6": MapSpec(codec.FlowKey6, codec.NatEntry6, MapType.LRU_HASH, attrgetter("flow_table_size")),
    "frags6": MapSpec(codec.FragKey6, codec.FragEntry6, MapType.LRU_HASH, attrgetter("frag_table_size")),
    # full-NAT (bpf_programs/lb_snat.h): per-VIP SNAT settings, both directions, fragments.
    "snat_cfg": MapSpec(ctypes.c_uint32, codec.SnatCfg, MapType.ARRAY, attrgetter("max_vips")),
    "snat_flows": MapSpec(codec.FlowKey, codec.SnatEntry, MapType.LRU_HASH, attrgetter("snat_table_size")),
    "snat_rnat": MapSpec(codec.FlowKey, codec.SnatEntry, MapType.LRU_HASH,
                         lambda limits: 2 * limits.snat_table_size),
    "snat_frags": MapSpec(codec.FragKey, codec.SnatFragEntry, MapType.LRU_HASH,
                          attrgetter("frag_table_size")),
    # full-NAT over IPv6 (bpf_programs/lb_snat6.h): both directions, sized as IPv4's.
    "snat_flows6": MapSpec(codec.FlowKey6, codec.SnatEntry6, MapType.LRU_HASH,
                           attrgetter("snat_table_size")),
    "snat_rnat6": MapSpec(codec.FlowKey6, codec.SnatEntry6, MapType.LRU_HASH,
                          lambda limits: 2 * limits.snat_table_size),
    # Switches the planner sets for the whole program (xdp/limits.py DP_FLAGS).
    "dp_config": MapSpec(ctypes.c_uint32, codec.DpConfig, MapType.ARRAY, lambda limits: 1),
    "stats_vip": MapSpec(ctypes.c_uint32, codec.Counters, MapType.PERCPU_ARRAY, attrgetter("max_vips")),
    "stats_backend": MapSpec(ctypes.c_uint32, codec.Counters, MapType.PERCPU_ARRAY,
                             attrgetter("max_backends")),
    "stats_global": MapSpec(ctypes.c_uint32, codec.Counters, MapType.PERCPU_ARRAY,
                            lambda limits: len(limits.outcomes)),
    # `lbctl trace` / `capture` (bpf_programs/lb_trace.h): the switch and filter, and the events.
    "trace_ctl": MapSpec(ctypes.c_uint32, tracing.TraceCtl, MapType.ARRAY, lambda limits: 1),
    "trace_events": MapSpec(tracing.NoValue, tracing.NoValue, MapType.RINGBUF,
                            lambda limits: tracing.RING_BYTES),
}

# The tracking tables, each with the entry type that names its VIP.
_TRACKING: tuple[tuple[str, type[ctypes.Structure]], ...] = (
    ("flows", codec.NatEntry), ("rnat", codec.NatEntry), ("frags", codec.FragEntry),
    ("flows6", codec.NatEntry6), ("rnat6", codec.NatEntry6), ("frags6", codec.FragEntry6),
    ("snat_flows", codec.SnatEntry), ("snat_rnat", codec.SnatEntry),
    ("snat_frags", codec.SnatFragEntry),
    ("snat_flows6", codec.SnatEntry6), ("snat_rnat6", codec.SnatEntry6))
# Client -> VIP tables (a flow each), of both families and of full-NAT.
_FLOW_TABLES = ("flows", "flows6", "snat_flows", "snat_flows6")


def _nat_entry(raw: bytes, entry_type: type[ctypes.Structure] | None = None) -> codec.NatEntry:
    """The state/ids/times part of a flows/rnat, flows6/rnat6 or snat_flows/snat_rnat value."""
    if entry_type is codec.SnatEntry:
        return codec.SnatEntry.from_buffer_copy(raw).nat
    if entry_type is codec.SnatEntry6:
        return codec.SnatEntry6.from_buffer_copy(raw).nat.e
    if len(raw) >= ctypes.sizeof(codec.NatEntry6):
        return codec.NatEntry6.from_buffer_copy(raw).e
    return codec.NatEntry.from_buffer_copy(raw)


def _entry_vip_id(raw: bytes, entry_type: type[ctypes.Structure] | None = None) -> int:
    if entry_type is codec.SnatFragEntry:
        return int(codec.SnatFragEntry.from_buffer_copy(raw).vip_id)
    if entry_type is codec.FragEntry:
        return int(codec.FragEntry.from_buffer_copy(raw).vip_id)
    if entry_type is codec.FragEntry6:
        return int(codec.FragEntry6.from_buffer_copy(raw).e.vip_id)
    return int(_nat_entry(raw, entry_type).vip_id)

_PURGE_HINT = "hint: 'lbctl detach --all --purge' removes the old maps (and their configuration)"


class LbMaps:
    """The pinned maps of one instance. Use as a context manager to close the fds."""

    def __init__(self, pin_dir: str, limits: Limits = DEFAULT_LIMITS):
        self.pin_dir = pin_dir
        self.limits = limits
        self._maps: dict[str, libbpf.MapHandle] = {}
        try:
            for name, spec in MAPS.items():
                self._maps[name] = self._open(name, spec)
        except BaseException:
            self.close()
            raise

    def _open(self, name: str, spec: MapSpec) -> libbpf.MapHandle:
        path = os.path.join(self.pin_dir, name)
        try:
            handle = libbpf.MapHandle.open(path)
        except libbpf.BpfError as exc:
            if exc.errno == errno.ENOENT and name != "vips" and \
                    os.path.exists(os.path.join(self.pin_dir, "vips")):
                # The others are there: pinned by an lbctl from before this map existed.
                raise IncompatibleMapsError(
                    f"pinned maps in {self.pin_dir} have no '{name}' map, which this lbctl "
                    f"needs (made by an older version); {_PURGE_HINT}"
                ) from exc
            if exc.errno == errno.ENOENT:
                raise NotAttachedError(
                    f"balancer not set up: no pinned map at {path}; hint: run 'lbctl attach IFACE' first"
                ) from exc
            raise
        want, got = spec.shape(self.limits), MapShape.of(handle.info)
        if got != want:
            handle.close()
            raise IncompatibleMapsError(
                f"pinned map {path} is {got}; this lbctl expects {want}; {_PURGE_HINT}")
        return handle

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> libbpf.MapHandle:
        return self._maps[name]

    # -- VIPs -------------------------------------------------------------------------------
    def vips(self) -> dict[codec.Endpoint, codec.VipMeta]:
        """VIPs of both families (vips and vips6)."""
        return {codec.decode_vip_key(key): codec.decode_vip_meta(raw)
                for name in ("vips", "vips6") for key, raw in self[name].items()}

    def put_vip(self, vip: codec.Endpoint, vip_id: int, ring_generation: int, backend_count: int,
                flags: int = 0) -> None:
        try:
            self[codec.vip_map_name(vip)].update(codec.encode_vip_key(vip),
                                codec.encode_vip_meta(vip_id, ring_generation, backend_count, flags))
        except libbpf.BpfError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise MapFullError(
                    f"cannot add VIP {vip}: the vips map is full ({self.limits.max_vips} entries); "
                    "hint: delete an unused VIP with 'lbctl vip del'"
                ) from exc
            raise

    def delete_vip(self, vip: codec.Endpoint) -> bool:
        return self[codec.vip_map_name(vip)].delete(codec.encode_vip_key(vip))

    # -- backends ---------------------------------------------------------------------------
    def backends(self) -> list[codec.BackendRecord]:
        out = []
        for key, raw in self["backends"].items():
            rec = codec.decode_backend(int.from_bytes(key, "little"), raw)
            if rec is not None:
                out.append(rec)
        return out

    def put_backend(self, backend_id: int, addr: str, port: int, state: str, vip_id: int, weight: int) -> None:
        self["backends"].update(codec.encode_u32(backend_id),
                                codec.encode_backend(addr, port, state, vip_id, weight))

    def clear_backend(self, backend_id: int) -> None:
        self["backends"].update(codec.encode_u32(backend_id), codec.EMPTY_BACKEND)

    # -- rings ------------------------------------------------------------------------------
    def ring_base(self, vip_id: int, generation: int) -> int:
        return self.limits.ring_index(vip_id, generation)

    def write_ring(self, vip_id: int, generation: int, backend_ids: list[int]) -> None:
        """Writes one whole ring in a single batch syscall."""
        size = self.limits.ring_size
        if len(backend_ids) != size:
            raise ValueError(f"ring has {len(backend_ids)} slots, expected {size}")
        base = self.ring_base(vip_id, generation)
        keys = array("I", range(base, base + size)).tobytes()
        self["rings"].update_batch(keys, array("I", backend_ids).tobytes(), size)

    def ring(self, vip_id: int, generation: int) -> list[int]:
        """One whole ring as the program reads it: a backend id (or codec.NO_BACKEND) a slot."""
        base = self.ring_base(vip_id, generation)
        table = self["rings"]
        return [int.from_bytes(table.lookup(codec.encode_u32(i)) or bytes(4), "little")
                for i in range(base, base + self.limits.ring_size)]

    def read_ring(self, vip_id: int, generation: int) -> array[int]:
        """One whole ring (backend id per slot) in a single batch syscall: what the data plane
        uses now, so a plan need not rebuild the old ring to count the slots a change moves."""
        size = self.limits.ring_size
        raw = libbpf.map_lookup_array_range(self["rings"].fd, self.ring_base(vip_id, generation),
                                            size, 4)
        ring = array("I")
        ring.frombytes(raw)
        return ring

    # -- flows ------------------------------------------------------------------------------
    def flows(self) -> Iterator[codec.FlowRecord]:
        """Tracked client -> VIP flows of both families, and full-NAT's (with the SNAT source)."""
        for name in ("flows", "flows6"):
            for key, raw in self[name].items():
                yield codec.decode_flow(key, raw)
        for name in ("snat_flows", "snat_flows6"):
            for key, raw in self[name].items():
                yield codec.decode_snat_flow(key, raw)

    # -- full-NAT settings ------------------------------------------------------------------
    def put_snat_cfg(self, vip_id: int, addrs: tuple[str, ...], port_min: int, port_max: int) -> None:
        self["snat_cfg"].update(codec.encode_u32(vip_id), codec.encode_snat_cfg(addrs, port_min, port_max))

    def snat_cfg(self, vip_id: int) -> codec.SnatSettings:
        raw = self["snat_cfg"].lookup(codec.encode_u32(vip_id))
        return codec.decode_snat_cfg(raw or bytes(ctypes.sizeof(codec.SnatCfg)))

    def tracked_backend_ids(self, now_ns: int | None = None) -> set[int]:
        """Backend ids that entries still alive in the flow tables point at: the data plane
        counts their packets under that id, whether or not the backend still exists."""
        now = monotonic_ns() if now_ns is None else now_ns
        ids: set[int] = set()
        for name, entry_type in (("flows", None), ("rnat", None), ("flows6", None), ("rnat6", None),
                                 ("snat_flows", codec.SnatEntry), ("snat_rnat", codec.SnatEntry),
                                 ("snat_flows6", codec.SnatEntry6), ("snat_rnat6", codec.SnatEntry6)):
            for _key, raw in self[name].items():  # noqa: PERF102 (a map handle, not a dict)
                e = _nat_entry(raw, entry_type)
                state = FLOW_STATES[e.state] if e.state < len(FLOW_STATES) else "established"
                if entry_alive(self.limits, state, e.last_seen_ns, now):
                    ids.add(e.backend_id)
        for name, entry_type in (("frags", codec.FragEntry), ("snat_frags", codec.SnatFragEntry),
                                 ("frags6", codec.FragEntry6)):
            for _key, raw in self[name].items():  # noqa: PERF102 (a map handle, not a dict)
                f = entry_type.from_buffer_copy(raw)
                if entry_type is codec.FragEntry6:
                    f = f.e  # type: ignore[attr-defined]
                if now - f.seen_ns <= self.limits.frag_timeout_s * 1_000_000_000 + _ALIVE_SLACK_NS:  # type: ignore[attr-defined]
                    ids.add(f.backend_id)  # type: ignore[attr-defined]
        return ids

    def live_flow_count(self, now_ns: int | None = None) -> int:
        """Tracked client->VIP flows that are open and not timed out: connections that would
        break if the program stopped rewriting them (a closing one has only its last ACKs left)."""
        now = monotonic_ns() if now_ns is None else now_ns
        return sum(1 for rec in self.flows()
                   if rec.state != "closing" and entry_alive(self.limits, rec.state, rec.last_seen_ns, now))

    def forget_flows(self, vip_id: int) -> int:
        """Deletes one VIP's entries from the tracking tables (after the VIP itself is gone, so
        its reverse entries cannot catch a later connection that reuses a tuple); returns how
        many flows it had."""
        removed = 0
        for name, entry_type in _TRACKING:
            table = self[name]
            keys = [key for key, raw in table.items() if _entry_vip_id(raw, entry_type) == vip_id]
            deleted = table.delete_keys(keys)
            if name in _FLOW_TABLES:
                removed += deleted
        return removed

    def flush_flows(self) -> int:
        """Empties the tracking tables; returns how many flows there were."""
        removed = 0
        for name, _ in _TRACKING:
            deleted = self[name].clear()
            if name in _FLOW_TABLES:
                removed += deleted
        return removed

    # -- program-wide switches --------------------------------------------------------------
    def dp_flags(self) -> int:
        raw = self["dp_config"].lookup(codec.encode_u32(0))
        return int(codec.DpConfig.from_buffer_copy(raw).flags) if raw else 0

    def put_dp_flags(self, flags: int) -> None:
        self["dp_config"].update(codec.encode_u32(0), bytes(codec.DpConfig(flags, 0)))

    def holds_entries(self, name: str) -> bool:
        """Whether a table has any entry (one key read, not a count)."""
        return next(iter(self[name].keys()), None) is not None

    # -- counters ---------------------------------------------------------------------------
    def _counters(self, name: str, index: int) -> dict[str, int]:
        return codec.decode_counters(self[name].lookup_percpu(codec.encode_u32(index)) or [])

    def vip_counters(self, vip_id: int) -> dict[str, int]:
        return self._counters("stats_vip", vip_id)

    def backend_counters(self, backend_id: int) -> dict[str, int]:
        return self._counters("stats_backend", backend_id)

    def global_counters(self) -> dict[str, dict[str, int]]:
        table = self["stats_global"]
        by_index = {int.from_bytes(key, "little"): codec.decode_counters(table.split_percpu(raw))
                    for key, raw in table.items()}
        return {name: by_index[i] for i, name in enumerate(OUTCOMES)}

    def reset_counters(self, name: str, index: int) -> None:
        """Zeroes one per-CPU entry, e.g. before a reused backend id starts counting again."""
        table = self[name]
        table.update(codec.encode_u32(index), bytes(table.value_bytes))
