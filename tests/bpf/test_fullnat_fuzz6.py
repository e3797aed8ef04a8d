"""Full-NAT over IPv6 under hostile input: seeded random, mutated and noise IPv6 frames to
full-NAT VIPs in a one-arm namespace, replies to the ports the program claimed (and to ports
it did not), ICMPv6 errors quoting them both ways, extension headers, through
BPF_PROG_TEST_RUN. The oracle is test_fullnat_fuzz.py's, over test_fuzz6.py's reading of IPv6:
no XDP_ABORTED, nothing but VIP traffic and tracked replies rewritten, every rewrite whole with
its checksums as right as they came in, every frame counted once; a VIP packet leaves from the
SNAT address and a port of the range to an active backend, a claimed tuple never belongs to two
client flows, a reply goes back to its own client from its own VIP."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from test_fuzz6 import (
    AH,
    DSTOPTS,
    FRAGMENT,
    HOPOPTS,
    ICMPV6,
    ROUTING,
    TCP,
    UDP,
    Icmp6,
    Later6,
    Parsed6,
    build6,
    ext_chain,
    icmp6,
    mac_of6,
    read6,
    residual,
    tcp6,
    udp6,
)

from lbctl.bench import routed
from lbctl.bench.routed import Port, RoutedNetns
from lbctl.control import Controller
from lbctl.model import BackendSpec, VipSpec
from lbctl.netns import inside
from xdp import libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS, OUTCOMES
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")

SEED = int(os.environ.get("LBCTL_FUZZ_SEED", "20261202"))
FRAMES = int(os.environ.get("LBCTL_FULLNAT_FUZZ6_FRAMES", "30000"))

ARM, ARM_MAC, ARM_ADDR = "fz6", "02:00:06:1f:01:01", "fd00:62:1::1"
CLIENTS = ("fd00:62:1::100", "fd00:62:1::101", "fd00:62:1::102")
UNRESOLVED_CLIENT = "fd00:62:1::199"        # no neighbour entry: a reply to it passes (no route)
ROUTER = "fd00:62:1::fe"
TCP_VIP = Endpoint("fd00:62:9::1", 80, "tcp")
UDP_VIP = Endpoint("fd00:62:9::1", 53, "udp")
NARROW_VIP = Endpoint("fd00:62:9::2", 80, "tcp")     # four ports: exhaustion comes quickly
UNROUTED_VIP = Endpoint("fd00:62:9::3", 80, "tcp")   # no route to its backend: no source address
TCP_BACKENDS = (Endpoint("fd00:62:1::11", 8080, "tcp"), Endpoint("fd00:62:1::12", 8080, "tcp"))
UDP_BACKENDS = (Endpoint("fd00:62:1::13", 5353, "udp"),)
NARROW_BACKEND = Endpoint("fd00:62:1::14", 80, "tcp")
UNROUTED_BACKEND = Endpoint("2001:db8:ffff::1", 80, "tcp")
NARROW_PORTS = (7000, 7003)
DEFAULT_PORTS = (1024, 32767)
VIPS = {TCP_VIP: TCP_BACKENDS, UDP_VIP: UDP_BACKENDS, NARROW_VIP: (NARROW_BACKEND,),
        UNROUTED_VIP: (UNROUTED_BACKEND,)}
PORT_RANGE = {NARROW_VIP: NARROW_PORTS}
VIP_BY_KEY = {(v.addr, v.port, v.proto): v for v in VIPS}
ALL_BACKENDS = (*TCP_BACKENDS, *UDP_BACKENDS, NARROW_BACKEND)
PORTS = (Port(ARM, ARM_MAC, "10.62.1.1/24",
              {a: mac_of6(a) for a in (*CLIENTS, ROUTER, *(b.addr for b in ALL_BACKENDS))},
              cidr6=f"{ARM_ADDR}/64"),)
ACTIONS = {XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT}
NAMES = {TCP: "tcp", UDP: "udp"}


@pytest.fixture(scope="module")
def netns_ports() -> tuple[Port, ...]:
    return PORTS


@pytest.fixture(scope="module")
def routed_netns(netns_ports: Sequence[Port]) -> Iterator[RoutedNetns]:
    with routed.routed_netns(f"fs{os.urandom(4).hex()}", netns_ports) as built:
        yield built


@pytest.fixture
def fresh(controller: Controller, clean_dataplane: Callable[[], None]) -> None:
    config = {vip: VipSpec(vip, tuple(BackendSpec(b.addr, b.port) for b in backends),
                           forwarding="fullnat", snat_ports=PORT_RANGE.get(vip, DEFAULT_PORTS))
              for vip, backends in VIPS.items()}
    controller.change(lambda _config: config)
    clean_dataplane()


@dataclass(frozen=True)
class Flow:
    vip: Endpoint
    client: str
    client_port: int


class Source:
    """Frames to the VIPs, replies to the claims seen so far (and to unclaimed ports), ICMPv6
    errors quoting either direction of a flow, other traffic; each maybe mutated; and noise."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.claims: list[tuple[Endpoint, int, Flow]] = []     # backend, snat port, its flow

    def _l4(self, src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
        r = self.rng
        if proto == TCP:
            return tcp6(src, dst, sport, dport, r.choice((0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12)),
                        r.randbytes(r.choice((0, 0, 7, 64))))
        return udp6(src, dst, sport, dport, r.randbytes(r.choice((0, 5, 100))))

    def _frame(self, src: str, dst: str, proto: int, body: bytes) -> bytes:
        r = self.rng
        kinds = [] if r.random() < 0.85 else [r.choice((HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, AH))
                                              for _ in range(r.randint(1, 3))]
        first, chain = ext_chain(kinds, proto)
        return build6(mac_of6(src), ARM_MAC, src, dst, proto, body, ext=chain, first_nh=first,
                      hlim=r.choice((64, 64, 64, 255, 2, 1)))

    def to_vip(self) -> bytes:
        r = self.rng
        vip = r.choice((TCP_VIP, TCP_VIP, UDP_VIP, NARROW_VIP, UNROUTED_VIP))
        client = r.choice(CLIENTS)
        proto = TCP if vip.proto == "tcp" else UDP
        return self._frame(client, vip.addr, proto,
                           self._l4(client, vip.addr, proto, r.randrange(40000, 40048), vip.port))

    def reply(self) -> bytes:
        r = self.rng
        if not self.claims or r.random() < 0.1:
            backend, port = r.choice(ALL_BACKENDS), r.randrange(1024, 32768)   # not claimed
        else:
            backend, port, _ = r.choice(self.claims)
        proto = TCP if backend.proto == "tcp" else UDP
        return self._frame(backend.addr, ARM_ADDR, proto,
                           self._l4(backend.addr, ARM_ADDR, proto, backend.port, port))

    def icmp_error(self) -> bytes:
        """Packet too big / unreachable from a backend quoting SNAT -> backend, or from a router
        near the client quoting VIP -> client; sometimes quoting nothing tracked."""
        r = self.rng
        if self.claims and r.random() < 0.85:
            backend, port, flow = r.choice(self.claims)
            proto = TCP if backend.proto == "tcp" else UDP
            if r.random() < 0.5:
                quote = build6("00:00:00:00:00:00", "00:00:00:00:00:00", ARM_ADDR, backend.addr, proto,
                               self._l4(ARM_ADDR, backend.addr, proto, port, backend.port))[14:]
                src, dst = r.choice((backend.addr, ROUTER)), ARM_ADDR
            else:
                quote = build6("00:00:00:00:00:00", "00:00:00:00:00:00", flow.vip.addr, flow.client,
                               proto, self._l4(flow.vip.addr, flow.client, proto, flow.vip.port,
                                               flow.client_port))[14:]
                src, dst = ROUTER, flow.vip.addr
        else:
            quote, src, dst = r.randbytes(r.choice((8, 48, 60))), ROUTER, r.choice((ARM_ADDR, TCP_VIP.addr))
        quote = quote[:r.choice((len(quote), len(quote), 44, 48, 50))]
        body = icmp6(src, dst, r.choice((1, 2, 2, 3, 4)), 0, quote)
        return build6(mac_of6(src), ARM_MAC, src, dst, ICMPV6, body, hlim=r.choice((64, 64, 1)))

    def other(self) -> bytes:
        r = self.rng
        client = r.choice((*CLIENTS, UNRESOLVED_CLIENT))
        dst = r.choice((ARM_ADDR, "fd00:62:9::99", TCP_VIP.addr))
        proto = r.choice((TCP, UDP))
        return self._frame(client, dst, proto,
                           self._l4(client, dst, proto, r.randrange(1024, 65536), r.choice((22, 81, 8080))))

    def mutate(self, frame: bytes) -> bytes:
        r = self.rng
        f = bytearray(frame)
        for _ in range(r.randint(1, 2)):
            what = r.randrange(5)
            if what == 0:
                del f[r.randint(14, len(f)):]
            elif what == 1 and len(f) > 20:
                f[20] = r.choice((TCP, UDP, ICMPV6, HOPOPTS, FRAGMENT, 59))
            elif what == 2:
                f += r.randbytes(r.randint(1, 32))
            elif what == 3 and len(f) > 54:
                f[r.randrange(54, min(len(f), 90))] = r.randrange(256)
            elif len(f) > 14:
                i = r.randrange(14, len(f))
                f[i] ^= 1 << r.randrange(8)
        return bytes(f)

    def __iter__(self) -> Iterator[bytes]:
        makers = (self.to_vip, self.to_vip, self.reply, self.reply, self.icmp_error, self.other)
        while True:
            roll = self.rng.random()
            if roll < 0.7:
                yield self.rng.choice(makers)()
            elif roll < 0.95:
                yield self.mutate(self.rng.choice(makers)())
            else:
                f = bytearray(self.rng.randbytes(self.rng.randint(14, 120)))
                f[12:14] = b"\x86\xdd"
                yield bytes(f)


class Judge:
    def __init__(self, source: Source) -> None:
        self.source = source
        # (backend addr, backend port, snat port, proto) -> the client flow that holds it
        self.owner: dict[tuple[str, int, int, int], Flow] = {}
        self.started = time.monotonic()
        self.must: Counter[str] = Counter()
        self.forwarded = self.replied = self.icmp_translated = 0

    def _rewrite(self, frame: bytes, out: bytes, p: Parsed6, retval: int) -> Parsed6:
        """Both ends rewritten and nothing else: addresses, ports, the L4 checksum (its sum with
        the new pseudo-header unchanged), hop limit down by one when forwarded, MACs."""
        assert len(out) == len(frame), "a rewrite changed the frame's length"
        allowed = {*range(12), 21, *range(22, 54), *range(p.l4, p.l4 + 4), p.check_at, p.check_at + 1}
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} changed outside the rewrite"
        forwarded = retval in (XDP_TX, XDP_REDIRECT)
        assert out[21] == frame[21] - forwarded, "hop limit not lowered by exactly 1 when forwarded"
        if not forwarded:
            assert out[:12] == frame[:12], "passed to the kernel with MACs rewritten"
        check_in = int.from_bytes(frame[p.check_at:p.check_at + 2], "big")
        if not (p.proto == UDP and check_in == 0):
            assert residual(out, p.proto, p.l4, p.l4_len) == residual(frame, p.proto, p.l4, p.l4_len), \
                "L4 checksum (IPv6 pseudo-header) went wrong"
        new = read6(out)
        assert isinstance(new, Parsed6)
        return new

    def judge(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in ACTIONS, f"XDP action {retval} (XDP_ABORTED is 0)"
        reading = read6(frame)
        if isinstance(reading, str):
            assert retval == XDP_PASS and out == frame, f"{reading} frame not passed untouched"
            return
        if isinstance(reading, Icmp6):
            if out != frame or retval != XDP_PASS:
                assert reading.type_ in (1, 2, 3), f"ICMPv6 type {reading.type_} was rewritten"
                assert retval in (XDP_TX, XDP_PASS) and len(out) == len(frame)
                assert reading.hlim > 1, "an ICMPv6 error with hop limit <= 1 was rewritten"
                assert residual(out, ICMPV6, reading.l4, reading.l4_len) == \
                    residual(frame, ICMPV6, reading.l4, reading.l4_len), "ICMPv6 checksum went wrong"
                self.icmp_translated += 1
            return
        if isinstance(reading, Later6):
            # Full-NAT over IPv6 records no fragments (docs/modes.md): a later fragment has no
            # first fragment's entry to follow and goes to the kernel untouched.
            assert retval == XDP_PASS and out == frame, "a later IPv6 fragment was rewritten"
            self.must["pass_fragment"] += 1
            return
        p = reading
        vip = VIP_BY_KEY.get((p.dst, p.dport, NAMES[p.proto]))
        owner = self.owner.get((p.src, p.sport, p.dport, p.proto)) if p.dst == ARM_ADDR else None
        if vip is None and owner is None:
            assert retval == XDP_PASS and out == frame, "non-VIP IPv6 traffic was not passed untouched"
            self.must["pass_not_vip"] += 1
            return
        if p.hlim <= 1:
            assert retval == XDP_PASS and out == frame, "hop limit <= 1 was not passed untouched"
            self.must["pass_ttl"] += 1
            return
        if vip is not None:
            self._to_vip(frame, retval, out, p, vip)
        else:
            assert owner is not None
            self._reply(frame, retval, out, p, owner)

    def _to_vip(self, frame: bytes, retval: int, out: bytes, p: Parsed6, vip: Endpoint) -> None:
        if retval == XDP_DROP:
            assert vip in (NARROW_VIP, UNROUTED_VIP), f"{vip} dropped a packet"
            self.must["drop_snat_no_source" if vip == UNROUTED_VIP else "drop_snat_no_port"] += 1
            return
        assert retval == XDP_TX, f"one-arm: action {retval}, not XDP_TX"
        new = self._rewrite(frame, out, p, retval)
        backend = Endpoint(new.dst, new.dport, NAMES[p.proto])
        assert backend in VIPS[vip], f"{vip} sent to {backend}"
        low, high = PORT_RANGE.get(vip, DEFAULT_PORTS)
        assert new.src == ARM_ADDR and low <= new.sport <= high, f"source [{new.src}]:{new.sport}"
        claim = (backend.addr, backend.port, new.sport, p.proto)
        mine = Flow(vip, p.src, p.sport)
        held = self.owner.get(claim)
        # No flow ends by timeout within a run this short (the shortest, closing, is 15 s).
        if held is not None and held != mine:
            assert time.monotonic() - self.started > DEFAULT_LIMITS.tcp_closing_timeout_s, (
                f"{claim} claimed by {mine} while {held} holds it")
        self.owner[claim] = mine
        if len(self.source.claims) < 4096:
            self.source.claims.append((backend, new.sport, mine))
        self.must["tx"] += 1
        self.forwarded += 1

    def _reply(self, frame: bytes, retval: int, out: bytes, p: Parsed6, owner: Flow) -> None:
        if out == frame:
            assert retval == XDP_PASS, "a reply was neither rewritten nor passed"
            return            # a SYN-ACK on a closed flow's entry: pass_stale_reply
        assert retval in (XDP_TX, XDP_PASS)   # PASS: a client with no neighbour (pass_no_route)
        new = self._rewrite(frame, out, p, retval)
        assert (new.src, new.sport, new.dst, new.dport) == (
            owner.vip.addr, owner.vip.port, owner.client, owner.client_port), (
            f"reply sent as [{new.src}]:{new.sport} -> [{new.dst}]:{new.dport}, its flow is {owner}")
        self.must["tx" if retval == XDP_TX else "pass_no_route"] += 1
        self.replied += 1


def test_full_nat_ipv6_frames_never_abort_never_collide_and_never_half_rewrite(
        fresh: None, lb_program: LoadedProgram, routed_netns: Any, lb_maps: LbMaps) -> None:
    source = Source(random.Random(SEED))
    judge = Judge(source)
    ifindex = routed_netns.ifindex[ARM]
    sent_bytes = 0
    with inside(routed_netns.name):
        for n, frame in zip(range(FRAMES), source):
            result = libbpf.prog_test_run(lb_program.fd, frame, ingress_ifindex=ifindex)
            sent_bytes += len(frame)
            try:
                judge.judge(frame, result.retval, result.data_out)
            except AssertionError as exc:
                pytest.fail(f"frame {n} of seed {SEED}: {exc}\n  in  {frame.hex()}\n"
                            f"  out {result.data_out.hex()}\n  replay: LBCTL_FUZZ_SEED={SEED} "
                            f"LBCTL_FULLNAT_FUZZ6_FRAMES={n + 1}", pytrace=False)
    counters = lb_maps.global_counters()
    counted = Counter({name: c["packets"] for name, c in counters.items() if c["packets"]})
    print(f"seed {SEED}: {FRAMES} IPv6 frames, {judge.forwarded} to backends, {judge.replied} "
          f"replies back, {judge.icmp_translated} ICMPv6 errors translated, {len(judge.owner)} "
          f"claims; counted {dict(sorted(counted.items()))}")
    assert sum(counted.values()) == FRAMES
    assert sum(c["bytes"] for c in counters.values()) == sent_bytes
    for outcome, least in judge.must.items():
        assert counted[outcome] >= least, f"{outcome}: counted {counted[outcome]}, at least {least}"
    # The run reached the places that matter, or it proves little.
    for outcome in ("tx", "drop_snat_no_port", "drop_snat_no_source", "pass_ttl", "pass_malformed",
                    "pass_ext_header", "pass_fragment", "pass_not_vip"):
        assert counted[outcome] > FRAMES // 1000, f"too few {outcome}: {dict(counted)}"
    assert set(OUTCOMES) >= set(counted)
    assert judge.replied > FRAMES // 20 and judge.forwarded > FRAMES // 20
    assert judge.icmp_translated > FRAMES // 200, "too few ICMPv6 errors translated"
    assert len({port for (_, _, port, _) in judge.owner}) > 100, "too few distinct ports claimed"
