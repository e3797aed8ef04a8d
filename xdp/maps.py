"""Opens the balancer's pinned maps (no compile) and reads and writes them through the codecs."""
from __future__ import annotations

import ctypes
import errno
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from xdp import codec, libbpf
from xdp.errors import IncompatibleMapsError, MapFullError, NotAttachedError
from xdp.limits import DEFAULT_LIMITS, OUTCOMES, PIN_ROOT, Limits

BPF_MAP_TYPES = {"vips": 1, "backends": 2, "rings": 2, "flows": 9, "rnat": 9, "frags": 9,
                 "stats_vip": 6, "stats_backend": 6, "stats_global": 6}


def pin_dir_for(instance: str) -> str:
    """Where one balancer instance (the host, or a named network namespace) pins its objects."""
    return os.path.join(PIN_ROOT, instance)


def expected_entries(name: str, limits: Limits) -> int:
    return {
        "vips": limits.max_vips, "backends": limits.max_backends, "rings": limits.ring_entries,
        "flows": limits.flow_table_size, "rnat": limits.flow_table_size,
        "frags": limits.frag_table_size,
        "stats_vip": limits.max_vips, "stats_backend": limits.max_backends,
        "stats_global": len(limits.outcomes),
    }[name]


@dataclass
class PinnedMap:
    name: str
    fd: int
    key_size: int
    value_size: int


class LbMaps:
    """The pinned maps of one instance. Use as a context manager to close the fds."""

    def __init__(self, pin_dir: str, limits: Limits = DEFAULT_LIMITS):
        self.pin_dir = pin_dir
        self.limits = limits
        self._maps: dict[str, PinnedMap] = {}
        try:
            for name, (key_type, value_type) in codec.MAP_LAYOUTS.items():
                self._maps[name] = self._open(name, key_type, value_type)
        except BaseException:
            self.close()
            raise

    def _open(self, name: str, key_type: type, value_type: type) -> PinnedMap:
        path = os.path.join(self.pin_dir, name)
        try:
            fd = libbpf.obj_get(path)
        except libbpf.BpfError as exc:
            if exc.errno == errno.ENOENT and name != "vips" and \
                    os.path.exists(os.path.join(self.pin_dir, "vips")):
                # The others are there: pinned by an lbctl from before this map existed.
                raise IncompatibleMapsError(
                    f"pinned maps in {self.pin_dir} have no '{name}' map, which this lbctl "
                    f"needs (made by an older version); hint: 'lbctl detach --all --purge' "
                    f"removes the old maps (and their configuration)"
                ) from exc
            if exc.errno == errno.ENOENT:
                raise NotAttachedError(
                    f"balancer not set up: no pinned map at {path}; hint: run 'lbctl attach IFACE' first"
                ) from exc
            raise
        info = libbpf.map_info(fd)
        key_size, value_size = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
        want = (BPF_MAP_TYPES[name], key_size, value_size, expected_entries(name, self.limits))
        got = (info.type, info.key_size, info.value_size, info.max_entries)
        if got != want:
            libbpf.close(fd)
            raise IncompatibleMapsError(
                f"pinned map {path} has type/key/value/entries {got}, this lbctl expects {want}; "
                f"hint: 'lbctl detach --all --purge' removes the old maps (and their configuration)"
            )
        return PinnedMap(name, fd, key_size, value_size)

    def close(self) -> None:
        for m in self._maps.values():
            libbpf.close(m.fd)
        self._maps.clear()

    def __enter__(self) -> LbMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _m(self, name: str) -> PinnedMap:
        return self._maps[name]

    # -- VIPs -------------------------------------------------------------------------------
    def vips(self) -> dict[codec.Endpoint, codec.VipMeta]:
        m = self._m("vips")
        out = {}
        for key in libbpf.map_keys(m.fd, m.key_size):
            raw = libbpf.map_lookup(m.fd, key, m.value_size)
            if raw is not None:
                out[codec.decode_vip_key(key)] = codec.decode_vip_meta(raw)
        return out

    def put_vip(self, vip: codec.Endpoint, vip_id: int, ring_generation: int, backend_count: int) -> None:
        m = self._m("vips")
        try:
            libbpf.map_update(m.fd, codec.encode_vip_key(vip),
                              codec.encode_vip_meta(vip_id, ring_generation, backend_count))
        except libbpf.BpfError as exc:
            if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise MapFullError(
                    f"cannot add VIP {vip}: the vips map is full ({self.limits.max_vips} entries); "
                    "hint: delete an unused VIP with 'lbctl vip del'"
                ) from exc
            raise

    def delete_vip(self, vip: codec.Endpoint) -> bool:
        m = self._m("vips")
        return libbpf.map_delete(m.fd, codec.encode_vip_key(vip))

    # -- backends ---------------------------------------------------------------------------
    def backends(self) -> list[codec.BackendRecord]:
        m = self._m("backends")
        out = []
        # One batch syscall per 4096 entries instead of one lookup per slot.
        for key, raw in libbpf.map_lookup_batch(m.fd, m.key_size, m.value_size):
            rec = codec.decode_backend(int.from_bytes(key, "little"), raw)
            if rec is not None:
                out.append(rec)
        return out

    def put_backend(self, backend_id: int, addr: str, port: int, state: str, vip_id: int, weight: int) -> None:
        m = self._m("backends")
        libbpf.map_update(m.fd, codec.encode_u32(backend_id),
                          codec.encode_backend(addr, port, state, vip_id, weight))

    def clear_backend(self, backend_id: int) -> None:
        m = self._m("backends")
        libbpf.map_update(m.fd, codec.encode_u32(backend_id), codec.EMPTY_BACKEND)

    # -- rings ------------------------------------------------------------------------------
    def ring_base(self, vip_id: int, generation: int) -> int:
        return self.limits.ring_index(vip_id, generation)

    def write_ring(self, vip_id: int, generation: int, backend_ids: list[int]) -> None:
        """Writes one whole ring in a single batch syscall."""
        if len(backend_ids) != self.limits.ring_size:
            raise ValueError(f"ring has {len(backend_ids)} slots, expected {self.limits.ring_size}")
        m = self._m("rings")
        base = self.ring_base(vip_id, generation)
        keys = array("I", range(base, base + self.limits.ring_size)).tobytes()
        values = array("I", backend_ids).tobytes()
        libbpf.map_update_batch(m.fd, keys, values, self.limits.ring_size, 4, 4)

    # -- flows ------------------------------------------------------------------------------
    def flows(self) -> Iterator[codec.FlowRecord]:
        m = self._m("flows")
        for key in libbpf.map_keys(m.fd, m.key_size):
            raw = libbpf.map_lookup(m.fd, key, m.value_size)
            if raw is not None:
                yield codec.decode_flow(key, raw)

    def forget_flows(self, vip_id: int) -> int:
        """Deletes one VIP's entries from both flow tables (after the VIP itself is gone, so its
        reverse entries cannot catch a later connection that reuses a tuple)."""
        removed = 0
        for name, entry_type in (("flows", codec.NatEntry), ("rnat", codec.NatEntry),
                                 ("frags", codec.FragEntry)):
            m = self._m(name)
            for key in list(libbpf.map_keys(m.fd, m.key_size)):
                raw = libbpf.map_lookup(m.fd, key, m.value_size)
                if raw is not None and entry_type.from_buffer_copy(raw).vip_id == vip_id:
                    if libbpf.map_delete(m.fd, key) and name == "flows":
                        removed += 1
        return removed

    def flush_flows(self) -> int:
        removed = 0
        for name in ("flows", "rnat", "frags"):
            m = self._m(name)
            for key in list(libbpf.map_keys(m.fd, m.key_size)):
                if libbpf.map_delete(m.fd, key) and name == "flows":
                    removed += 1
        return removed

    # -- counters ---------------------------------------------------------------------------
    def _counters(self, name: str, index: int) -> dict[str, int]:
        m = self._m(name)
        return codec.decode_counters(libbpf.percpu_lookup(m.fd, codec.encode_u32(index), m.value_size) or [])

    def vip_counters(self, vip_id: int) -> dict[str, int]:
        return self._counters("stats_vip", vip_id)

    def backend_counters(self, backend_id: int) -> dict[str, int]:
        return self._counters("stats_backend", backend_id)

    def global_counters(self) -> dict[str, dict[str, int]]:
        return {name: self._counters("stats_global", i) for i, name in enumerate(OUTCOMES)}

    def reset_counters(self, name: str, index: int) -> None:
        """Zeroes one per-CPU entry, e.g. before a reused backend id starts counting again."""
        m = self._m(name)
        ncpu = libbpf.num_possible_cpus()
        stride = (m.value_size + 7) // 8 * 8
        libbpf.map_update(m.fd, codec.encode_u32(index), bytes(stride * ncpu))
