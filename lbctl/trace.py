"""`lbctl trace`: the program's decisions live, one event a packet, read from the pinned ring
buffer while tracing is switched on, and switched off again however the tracer stops."""
from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from xdp.balancer import Balancer, require_root
from xdp.codec import BackendRecord
from xdp.tracing import Event, Filter, RingReader, TraceSwitch

POLL_MS = 200
KIND_TEXT = {"new_flow": "new flow", "flow_hit": "flow hit", "reverse_nat": "reverse NAT"}


@dataclass
class TraceRun:
    """What a finished trace saw; stale_pid names a tracer that left tracing on and is gone."""

    events: int = 0
    stale_pid: int | None = None


def describe(event: Event) -> str:
    """The outcome in words: new flow, flow hit, reverse NAT, pass (why), drop (why)."""
    if event.kind in KIND_TEXT:
        return KIND_TEXT[event.kind]
    why = event.outcome.split("_", 1)[1] if "_" in event.outcome else event.outcome
    if event.kind in ("pass", "drop"):
        return f"{event.kind} ({why})"
    return f"{event.action} ({event.outcome})"


def ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"if{ifindex}"


def as_dict(event: Event, backends: dict[int, str]) -> dict:
    return {"ts_ns": event.ts_ns, "iface": ifname(event.ifindex), "in": str(event.tuple_in),
            "outcome": describe(event), "kind": event.kind, "counter": event.outcome,
            "action": event.action, "out": str(event.tuple_out),
            "backend": backends.get(event.backend_id) if event.backend_id is not None else None,
            "backend_id": event.backend_id}


def line(event: Event, backends: dict[int, str]) -> str:
    d = as_dict(event, backends)
    text = f"{d['iface']:<8} {d['in']:<44} {d['outcome']:<22}"
    if event.action in ("tx", "redirect"):
        text += f" {d['out']}"
    if d["backend"]:
        text += f"  backend {d['backend']}"
    return text.rstrip()


def run(instance: str, flt: Filter, count: int | None, emit: Callable[[Event, dict[int, str]], None],
        stop: Callable[[], bool] = lambda: False) -> TraceRun:
    """Streams events to `emit` until `count` of them, `stop()`, or SIGINT/SIGTERM; tracing is
    off again on return. A flag left on by a tracer that is gone is cleared first."""
    require_root()
    balancer = Balancer(instance)
    result = TraceRun()
    with balancer.maps() as maps:
        switch = TraceSwitch(maps["trace_ctl"])
        result.stale_pid = switch.clear_stale()
        def name(b: BackendRecord) -> str:
            return f"[{b.addr}]:{b.port}" if ":" in b.addr else f"{b.addr}:{b.port}"

        backends = {b.backend_id: name(b) for b in maps.backends()}

        def refresh() -> None:
            backends.update({b.backend_id: name(b) for b in maps.backends()})

        pending: list[Event] = []
        started = [False]

        def on_raw(raw: bytes) -> None:
            if started[0]:
                pending.append(Event.decode(raw))

        stopping = [False]

        def on_signal(_sig: int, _frame: object) -> None:
            stopping[0] = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with RingReader(os.path.join(balancer.pin_dir, "trace_events"), on_raw) as reader:
                reader.poll(0)          # events a killed tracer left unread are not ours
                switch.on(flt)
                started[0] = True
                try:
                    while not stopping[0] and not stop() and (count is None or result.events < count):
                        reader.poll(POLL_MS)
                        for event in pending:
                            if count is not None and result.events >= count:
                                break
                            if event.backend_id is not None and event.backend_id not in backends:
                                refresh()
                            emit(event, backends)
                            result.events += 1
                        pending.clear()
                finally:
                    switch.off()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    return result


def wall_clock_offset_ns() -> int:
    """Add to an event's ts_ns (CLOCK_MONOTONIC, as bpf_ktime_get_ns) for Unix time."""
    return time.time_ns() - time.monotonic_ns()
