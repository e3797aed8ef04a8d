"""The data plane's trace switch and event stream (bpf_programs/lb_trace.h): the ctypes mirrors
of its structs, turning tracing on and off in the pinned trace_ctl map, and reading events from
the pinned trace_events ring buffer with libbpf's ring_buffer API."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xdp import libbpf
from xdp.errors import XdpError
from xdp.limits import OUTCOMES

if TYPE_CHECKING:  # typing.Self is 3.11+
    from typing_extensions import Self

SNAP_BYTES = 128            # LB_TRACE_SNAP_BYTES
RING_BYTES = 512 * 1024     # LB_TRACE_RING_BYTES
F_FRAMES = 0x1              # LB_TRACE_F_FRAMES
NO_OUTCOME = 0xFFFFFFFF
NO_BACKEND = 0xFFFFFFFF
KINDS = ("pass", "new_flow", "flow_hit", "reverse_nat", "drop", "other")  # enum lb_trace_kind
ACTIONS = ("aborted", "drop", "pass", "tx", "redirect")
PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp"}


class TraceBusyError(XdpError):
    exit_code = 8


_Addr = ctypes.c_uint32 * 4     # either family: IPv4 in the first word (network order)


class TraceTuple(ctypes.Structure):
    _fields_ = [("src", _Addr), ("dst", _Addr), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2)]


class TraceCtl(ctypes.Structure):
    _fields_ = [("enabled", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("vip_addr", _Addr), ("vip_port", ctypes.c_uint16),
                ("vip_proto", ctypes.c_uint8), ("vip_family", ctypes.c_uint8),
                ("client_addr", _Addr), ("backend_addr", _Addr),
                ("backend_port", ctypes.c_uint16), ("client_family", ctypes.c_uint8),
                ("backend_family", ctypes.c_uint8)]


class TraceEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("ifindex", ctypes.c_uint32),
                ("action", ctypes.c_uint32), ("outcome", ctypes.c_uint32),
                ("kind", ctypes.c_uint32), ("backend_id", ctypes.c_uint32),
                ("frame_len", ctypes.c_uint32), ("in_", TraceTuple), ("out", TraceTuple),
                ("before_len", ctypes.c_uint16), ("after_len", ctypes.c_uint16),
                ("pad", ctypes.c_uint32), ("before", ctypes.c_uint8 * SNAP_BYTES),
                ("after", ctypes.c_uint8 * SNAP_BYTES)]


class NoValue(ctypes.Structure):
    """A ring buffer's key and value: it has neither (the kernel reports size 0)."""

    _fields_ = ()


def _addr(words: ctypes.Array, family: int) -> str:
    raw = bytes(words)
    return str(ipaddress.IPv6Address(raw)) if family == 6 else socket.inet_ntoa(raw[:4])


def _encode_addr(addr: str) -> tuple[ctypes.Array, int]:
    """(the address in the program's four words, its family)."""
    ip = ipaddress.ip_address(addr)
    return _Addr.from_buffer_copy(ip.packed.ljust(16, b"\0")), ip.version


def _port(be16: int) -> int:
    return int(socket.ntohs(be16))


@dataclass(frozen=True)
class Tuple:
    src: str
    sport: int
    dst: str
    dport: int
    proto: str

    @classmethod
    def of(cls, t: TraceTuple) -> Tuple:
        if not t.family:
            return cls("", 0, "", 0, "-")
        proto = PROTO_NAMES.get(t.proto, str(t.proto))
        if t.family == 6 and t.proto == 58:
            proto = "icmpv6"
        return cls(_addr(t.src, t.family), _port(t.sport), _addr(t.dst, t.family),
                   _port(t.dport), proto)

    def __str__(self) -> str:
        if self.proto == "-":
            return "(not IP)"
        src, dst = (f"[{self.src}]", f"[{self.dst}]") if ":" in self.src else (self.src, self.dst)
        if self.proto in ("tcp", "udp"):
            return f"{src}:{self.sport} -> {dst}:{self.dport} {self.proto}"
        return f"{self.src} -> {self.dst} {self.proto}"


@dataclass(frozen=True)
class Event:
    """One packet the program decided on."""

    ts_ns: int
    ifindex: int
    action: str
    outcome: str
    kind: str
    backend_id: int | None
    frame_len: int
    tuple_in: Tuple
    tuple_out: Tuple
    before: bytes
    after: bytes

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        e = TraceEvent.from_buffer_copy(raw[:ctypes.sizeof(TraceEvent)])
        return cls(
            e.ts_ns, e.ifindex,
            ACTIONS[e.action] if e.action < len(ACTIONS) else f"action{e.action}",
            OUTCOMES[e.outcome] if e.outcome < len(OUTCOMES) else "unknown",
            KINDS[e.kind] if e.kind < len(KINDS) else f"kind{e.kind}",
            None if e.backend_id == NO_BACKEND else e.backend_id, e.frame_len,
            Tuple.of(e.in_), Tuple.of(e.out),
            bytes(e.before)[:min(e.before_len, SNAP_BYTES)],
            bytes(e.after)[:min(e.after_len, SNAP_BYTES)])


@dataclass(frozen=True)
class Filter:
    """What the program emits events for; None matches anything."""

    vip: tuple[str, int, str] | None = None        # addr (IPv4 or IPv6), port (0: any), proto ('': any)
    client: str | None = None                      # IPv4 or IPv6
    backend: tuple[str, int] | None = None         # addr (IPv4 or IPv6), port (0: any)
    frames: bool = False                           # carry the frames' first bytes (capture)

    def ctl(self, owner_pid: int) -> TraceCtl:
        ctl = TraceCtl(enabled=owner_pid, flags=F_FRAMES if self.frames else 0)
        if self.vip:
            ctl.vip_addr, ctl.vip_family = _encode_addr(self.vip[0])
            ctl.vip_port = socket.htons(self.vip[1])
            ctl.vip_proto = {"tcp": 6, "udp": 17}.get(self.vip[2], 0)
        if self.client:
            ctl.client_addr, ctl.client_family = _encode_addr(self.client)
        if self.backend:
            ctl.backend_addr, ctl.backend_family = _encode_addr(self.backend[0])
            ctl.backend_port = socket.htons(self.backend[1])
        return ctl


def tracer_alive(pid: int) -> bool:
    """Whether the pid that switched tracing on still runs an lbctl (a reused pid does not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"lbctl" in f.read()
    except OSError:
        return False


class TraceSwitch:
    """trace_ctl's one entry."""

    def __init__(self, ctl_map: libbpf.MapHandle):
        self.map = ctl_map

    def read(self) -> TraceCtl:
        raw = self.map.lookup(bytes(4))
        return TraceCtl.from_buffer_copy(raw) if raw else TraceCtl()

    def clear_stale(self) -> int | None:
        """Turns off tracing left on by a tracer that is gone; returns its pid, else None."""
        ctl = self.read()
        if ctl.enabled and not tracer_alive(ctl.enabled):
            self.off()
            return int(ctl.enabled)
        return None

    def on(self, flt: Filter, owner_pid: int | None = None) -> None:
        ctl = self.read()
        if ctl.enabled and tracer_alive(ctl.enabled):
            raise TraceBusyError(f"another tracer (pid {ctl.enabled}) has tracing on; hint: stop "
                                 "it first (one trace or capture at a time)")
        self.map.update(bytes(4), bytes(flt.ctl(owner_pid or os.getpid())))

    def off(self) -> None:
        self.map.update(bytes(4), bytes(TraceCtl()))


_SampleFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingReader:
    """Events from the pinned ring buffer, through libbpf's ring_buffer__poll."""

    def __init__(self, path: str, on_event: Callable[[bytes], None]):
        lib = libbpf._lib()
        lib.ring_buffer__new.restype = ctypes.c_void_p
        lib.ring_buffer__new.argtypes = [ctypes.c_int, _SampleFn, ctypes.c_void_p, ctypes.c_void_p]
        lib.ring_buffer__poll.restype = ctypes.c_int
        lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ring_buffer__free.restype = None
        lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._fd = libbpf.obj_get(path)

        def sample(_ctx: Any, data: int, size: int) -> int:
            on_event(ctypes.string_at(data, size))
            return 0

        self._sample = _SampleFn(sample)   # kept: libbpf calls it for as long as rb lives
        ctypes.set_errno(0)
        self._rb = lib.ring_buffer__new(self._fd, self._sample, None, None)
        if not self._rb:
            err = ctypes.get_errno()
            libbpf.close(self._fd)
            raise libbpf.BpfError(err, "ring_buffer__new", path)

    def poll(self, timeout_ms: int) -> int:
        n = self._lib.ring_buffer__poll(self._rb, timeout_ms)
        if n < 0 and -n != 4:   # EINTR: a signal (Ctrl-C) woke us, not an error
            raise libbpf.BpfError(-n, "ring_buffer__poll", "trace_events")
        return max(n, 0)

    def close(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
            libbpf.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
