"""The program's trace switch, frame by frame through BPF_PROG_TEST_RUN: no event while off,
one event a packet while on (tuple, outcome, the frame's first bytes when asked), and the
filters (VIP, client, backend) applied in the program."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lbctl.control import Controller
from xdp import libbpf
from xdp.codec import Endpoint
from xdp.maps import LbMaps
from xdp.program import LoadedProgram
from xdp.tracing import SNAP_BYTES, Event, Filter, RingReader, TraceSwitch

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")

EMPTY_VIP = Endpoint("10.10.7.1", 80, "tcp")      # a VIP without backends: its packets drop
EMPTY_VIP6 = Endpoint("fd00:10:7::1", 80, "tcp")
CLIENT = "10.10.1.100"
CLIENT6 = "fd00:10:1::100"


def frame(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    ip = IPv6(src=src, dst=dst, hlim=64) if ":" in src else IP(src=src, dst=dst, ttl=64)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / ip / TCP(sport=sport, dport=dport, flags="S") / payload)


TO_VIP = frame(CLIENT, EMPTY_VIP.addr, 40000, 80, b"x" * 300)
NOT_VIP = frame(CLIENT, "10.10.6.6", 40001, 80)
OTHER_CLIENT_TO_VIP = frame("10.10.1.200", EMPTY_VIP.addr, 40002, 80)
TO_VIP6 = frame(CLIENT6, EMPTY_VIP6.addr, 40000, 80)
NOT_VIP6 = frame(CLIENT6, "fd00:10:6::6", 40001, 80)
OTHER_CLIENT_TO_VIP6 = frame("fd00:10:1::200", EMPTY_VIP6.addr, 40002, 80)
# An IPv6 client whose address words are an IPv4 address's as the program holds it (the first
# word, the rest 0): only the family tells them apart.
V6_LOOKALIKE, V4_LOOKALIKE = "fd00:10::", "253.0.0.16"
LOOKALIKE_TO_VIP6 = frame(V6_LOOKALIKE, EMPTY_VIP6.addr, 40003, 80)


@dataclass(frozen=True)
class Case:
    description: str
    filter: Filter | None          # None: tracing off
    frames: tuple[bytes, ...]
    expected: tuple[tuple[str, str, str], ...]   # (kind, counter, tuple in) an event


CASES = [
    Case("no event while tracing is off", None, (TO_VIP, NOT_VIP), ()),
    Case("every packet while on without a filter", Filter(), (TO_VIP, NOT_VIP),
         (("drop", "drop_no_backend", f"{CLIENT}:40000 -> 10.10.7.1:80 tcp"),
          ("pass", "pass_not_vip", f"{CLIENT}:40001 -> 10.10.6.6:80 tcp"))),
    Case("a VIP filter lets only that VIP's packets through", Filter(vip=("10.10.7.1", 80, "tcp")),
         (NOT_VIP, TO_VIP), (("drop", "drop_no_backend", f"{CLIENT}:40000 -> 10.10.7.1:80 tcp"),)),
    Case("a VIP filter with another port matches nothing", Filter(vip=("10.10.7.1", 81, "tcp")),
         (NOT_VIP, TO_VIP), ()),
    Case("a client filter drops other clients' packets", Filter(client="10.10.1.200"),
         (TO_VIP, OTHER_CLIENT_TO_VIP, NOT_VIP),
         (("drop", "drop_no_backend", "10.10.1.200:40002 -> 10.10.7.1:80 tcp"),)),
    Case("a backend filter matches no dropped packet (none was sent to a backend)",
         Filter(backend=("10.10.2.11", 0)), (TO_VIP, NOT_VIP), ()),
    Case("IPv6 packets are traced with their bracketed tuple", Filter(), (TO_VIP6, NOT_VIP6),
         (("drop", "drop_no_backend", f"[{CLIENT6}]:40000 -> [fd00:10:7::1]:80 tcp"),
          ("pass", "pass_not_vip", f"[{CLIENT6}]:40001 -> [fd00:10:6::6]:80 tcp"))),
    Case("an IPv6 VIP filter lets only that VIP's packets through",
         Filter(vip=(EMPTY_VIP6.addr, 80, "tcp")), (NOT_VIP6, TO_VIP, TO_VIP6),
         (("drop", "drop_no_backend", f"[{CLIENT6}]:40000 -> [fd00:10:7::1]:80 tcp"),)),
    Case("an IPv6 client filter drops other clients' packets and every IPv4 one",
         Filter(client="fd00:10:1::200"), (TO_VIP6, OTHER_CLIENT_TO_VIP6, TO_VIP),
         (("drop", "drop_no_backend", "[fd00:10:1::200]:40002 -> [fd00:10:7::1]:80 tcp"),)),
    Case("an IPv4 filter matches no IPv6 packet, whatever its address words",
         Filter(client=V4_LOOKALIKE), (LOOKALIKE_TO_VIP6, NOT_VIP6), ()),
    Case("the same filter in IPv6 matches it", Filter(client=V6_LOOKALIKE), (LOOKALIKE_TO_VIP6,),
         (("drop", "drop_no_backend", "[fd00:10::]:40003 -> [fd00:10:7::1]:80 tcp"),)),
    Case("an IPv6 backend filter matches no dropped packet",
         Filter(backend=("fd00:10:2::11", 8080)), (TO_VIP6, NOT_VIP6), ()),
]


@pytest.fixture(scope="module")
def traced(lb_program: LoadedProgram, lb_instance: str) -> Iterator[tuple[TraceSwitch, RingReader, list[Event]]]:
    controller = Controller(lb_instance)
    controller.vip_add(EMPTY_VIP, force=True)
    controller.vip_add(EMPTY_VIP6, force=True)
    events: list[Event] = []
    maps = LbMaps(lb_program.pin_dir)
    reader = RingReader(os.path.join(lb_program.pin_dir, "trace_events"),
                        lambda raw: events.append(Event.decode(raw)))
    switch = TraceSwitch(maps["trace_ctl"])
    try:
        yield switch, reader, events
    finally:
        switch.off()
        reader.close()
        maps.close()
        controller.vip_del(EMPTY_VIP)
        controller.vip_del(EMPTY_VIP6)


def run_case(lb_program: LoadedProgram, traced, case: Case) -> list[Event]:
    switch, reader, events = traced
    reader.poll(0)
    events.clear()
    if case.filter is None:
        switch.off()
    else:
        switch.on(case.filter)
    try:
        for f in case.frames:
            libbpf.prog_test_run(lb_program.fd, f)
    finally:
        switch.off()
    reader.poll(0)
    return list(events)


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_trace_case(lb_program: LoadedProgram, traced, case: Case) -> None:
    events = run_case(lb_program, traced, case)
    assert [(e.kind, e.outcome, str(e.tuple_in)) for e in events] == list(case.expected)


def test_frames_carry_the_first_bytes_only_when_asked(lb_program: LoadedProgram, traced) -> None:
    plain = run_case(lb_program, traced, Case("", Filter(), (TO_VIP,), ()))
    assert [e.before for e in plain] == [b""]
    framed = run_case(lb_program, traced, Case("", Filter(frames=True), (TO_VIP, NOT_VIP), ()))
    assert [e.before for e in framed] == [TO_VIP[:SNAP_BYTES], NOT_VIP]
    assert framed[0].frame_len == len(TO_VIP)
    # Dropped and passed frames were not sent anywhere: nothing after.
    assert [e.after for e in framed] == [b"", b""]
