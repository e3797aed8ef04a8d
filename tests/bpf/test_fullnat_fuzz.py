"""Full-NAT under hostile input: seeded random, mutated and noise frames to full-NAT VIPs in a
one-arm namespace, replies to the ports the program claimed (and to ports it did not), ICMP
errors quoting them, fragments, through BPF_PROG_TEST_RUN. The oracle is test_fuzz.py's: no
XDP_ABORTED, nothing but VIP traffic and tracked replies rewritten, every rewrite whole with its
checksums as right as they came in, every frame counted once; and for full-NAT: a VIP packet
leaves from the SNAT address and a port of the range to an active backend, a claimed tuple
never belongs to two client flows, a reply goes back to its own client from its own VIP."""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_fuzz import (
    ETH_LEN,
    TCP,
    TCP_FLAG_CHOICES,
    TTL_CHOICES,
    UDP,
    LaterFragment,
    Parsed,
    build,
    ip_residual,
    l4_residual,
    read_frame,
)

from lbctl.bench.routed import Port, mac_of
from lbctl.control import Controller
from lbctl.model import BackendSpec, VipSpec
from lbctl.netns import inside
from xdp import frames, libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS, OUTCOMES
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")

SEED = int(os.environ.get("LBCTL_FUZZ_SEED", "20261202"))
FRAMES = int(os.environ.get("LBCTL_FULLNAT_FUZZ_FRAMES", "40000"))

ARM, ARM_MAC, ARM_ADDR = "fzn", "02:00:0a:1f:01:01", "10.31.1.1"
CLIENTS = ("10.31.1.100", "10.31.1.101", "10.31.1.102", "10.31.1.103")
TCP_VIP = Endpoint("10.31.9.1", 80, "tcp")
UDP_VIP = Endpoint("10.31.9.1", 53, "udp")
NARROW_VIP = Endpoint("10.31.9.2", 80, "tcp")       # four ports: exhaustion comes quickly
UNROUTED_VIP = Endpoint("10.31.9.3", 80, "tcp")     # no route to its backend: no source address
TCP_BACKENDS = (Endpoint("10.31.1.11", 8080, "tcp"), Endpoint("10.31.1.12", 8080, "tcp"))
UDP_BACKENDS = (Endpoint("10.31.1.13", 5353, "udp"),)
NARROW_BACKEND = Endpoint("10.31.1.14", 80, "tcp")
UNROUTED_BACKEND = Endpoint("192.0.2.1", 80, "tcp")
NARROW_PORTS = (7000, 7003)
VIPS = {TCP_VIP: TCP_BACKENDS, UDP_VIP: UDP_BACKENDS, NARROW_VIP: (NARROW_BACKEND,),
        UNROUTED_VIP: (UNROUTED_BACKEND,)}
PORT_RANGE = {NARROW_VIP: NARROW_PORTS}
DEFAULT_PORTS = (1024, 32767)
VIP_BY_KEY = {(v.addr, v.port, v.proto): v for v in VIPS}
ALL_BACKENDS = (*TCP_BACKENDS, *UDP_BACKENDS, NARROW_BACKEND)
PORTS = (Port(ARM, ARM_MAC, f"{ARM_ADDR}/24",
              {a: mac_of(a) for a in (*CLIENTS, *(b.addr for b in ALL_BACKENDS))}),)
ACTIONS = {XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT}


@pytest.fixture(scope="module")
def netns_ports() -> tuple[Port, ...]:
    return PORTS


@pytest.fixture
def fresh(controller: Controller, clean_dataplane: Callable[[], None]) -> None:
    config = {vip: VipSpec(vip, tuple(BackendSpec(b.addr, b.port) for b in backends),
                           forwarding="fullnat", snat_ports=PORT_RANGE.get(vip, DEFAULT_PORTS))
              for vip, backends in VIPS.items()}
    controller.change(lambda _config: config)
    clean_dataplane()


class Source:
    """Frames to the VIPs, replies to the claims seen so far (and to unclaimed ports), ICMP
    errors quoting them, other traffic; each maybe mutated; and noise."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.claims: list[tuple[Endpoint, int]] = []   # (backend, snat port)

    def to_vip(self) -> bytes:
        r = self.rng
        vip = r.choice((TCP_VIP, TCP_VIP, UDP_VIP, NARROW_VIP, UNROUTED_VIP))
        client = r.choice(CLIENTS)
        proto = TCP if vip.proto == "tcp" else UDP
        frag: dict[str, Any] = {}
        if r.random() < 0.05:
            frag = {"frag": 0x2000, "ip_id": r.choice((100, 101)),
                    "udp_len": 8 + 16 + 2000 if proto == UDP else None}
        return build(mac_of(client), ARM_MAC, client, vip.addr, proto, r.randrange(40000, 40048),
                     vip.port, tcp_flags=r.choice(TCP_FLAG_CHOICES), payload=r.randbytes(16),
                     ttl=r.choice(TTL_CHOICES), udp_checksum=r.random() < 0.9, **frag)

    def reply(self) -> bytes:
        r = self.rng
        if not self.claims or r.random() < 0.1:
            backend, port = r.choice(ALL_BACKENDS), r.randrange(1024, 32768)   # not claimed
        else:
            backend, port = r.choice(self.claims)
        proto = TCP if backend.proto == "tcp" else UDP
        frag: dict[str, Any] = {}
        if r.random() < 0.05:
            frag = {"frag": 0x2000, "ip_id": r.choice((200, 201)),
                    "udp_len": 8 + 8 + 2000 if proto == UDP else None}
        return build(mac_of(backend.addr), ARM_MAC, backend.addr, ARM_ADDR, proto, backend.port, port,
                     tcp_flags=r.choice(TCP_FLAG_CHOICES), payload=r.randbytes(8),
                     ttl=r.choice(TTL_CHOICES), **frag)

    def later_fragment(self) -> bytes:
        r = self.rng
        if r.random() < 0.5:
            src, dst, ip_id = r.choice(CLIENTS), TCP_VIP.addr, r.choice((100, 101))
        else:
            src, dst, ip_id = r.choice(ALL_BACKENDS).addr, ARM_ADDR, r.choice((200, 201))
        ip = frames.ipv4_packet(src, dst, r.choice((TCP, UDP)), r.randbytes(64), ident=ip_id,
                                frag=r.choice((0x0010, 0x2010, 0x00B9)), ttl=r.choice(TTL_CHOICES))
        return frames.ethernet_frame(mac_of(src), ARM_MAC, ip)

    def icmp_error(self) -> bytes:
        """Fragmentation needed from a backend about a packet the balancer sent it."""
        r = self.rng
        backend, port = r.choice(self.claims) if self.claims else (TCP_BACKENDS[0], 1024)
        proto = TCP if backend.proto == "tcp" else UDP
        quoted = build("00:00:00:00:00:00", "00:00:00:00:00:00", ARM_ADDR, backend.addr, proto,
                       port, backend.port, tcp_flags=0x10)[ETH_LEN:ETH_LEN + 28]
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted
        icmp = icmp[:2] + struct.pack("!H", frames.internet_checksum(icmp)) + icmp[4:]
        return frames.ethernet_frame(mac_of(backend.addr), ARM_MAC,
                                     frames.ipv4_packet(backend.addr, ARM_ADDR, 1, icmp))

    def other(self) -> bytes:
        r = self.rng
        client = r.choice(CLIENTS)
        return build(mac_of(client), ARM_MAC, client, r.choice((ARM_ADDR, "10.31.9.9", TCP_VIP.addr)),
                     r.choice((TCP, UDP)), r.randrange(1024, 65536), r.choice((22, 81, 8080)))

    def mutate(self, frame: bytes) -> bytes:
        r = self.rng
        out = bytearray(frame)
        for _ in range(r.randint(1, 2)):
            what = r.randrange(4)
            if what == 0:
                del out[r.randint(14, len(out)):]
            elif what == 1 and len(out) > 14:
                out[r.randrange(14, min(len(out), 60))] = r.randrange(256)
            elif what == 2:
                out += r.randbytes(r.randint(1, 32))
            elif len(out) > 14:
                i = r.randrange(len(out))
                out[i] ^= 1 << r.randrange(8)
        return bytes(out)

    def __iter__(self) -> Iterator[bytes]:
        makers = (self.to_vip, self.to_vip, self.reply, self.reply, self.icmp_error,
                  self.later_fragment, self.other)
        while True:
            roll = self.rng.random()
            if roll < 0.7:
                yield self.rng.choice(makers)()
            elif roll < 0.95:
                yield self.mutate(self.rng.choice(makers)())
            else:
                yield self.rng.randbytes(self.rng.randint(14, 120))


class Judge:
    def __init__(self, source: Source) -> None:
        self.source = source
        # (backend addr, backend port, snat port, proto) -> (vip, client, client port)
        self.owner: dict[tuple[str, int, int, int], tuple[Endpoint, str, int]] = {}
        self.started = time.monotonic()
        self.must: Counter[str] = Counter()
        self.may = 0              # frames whose outcome depends on state the oracle does not model
        self.forwarded = self.replied = 0

    def _changed_only(self, frame: bytes, out: bytes, allowed: set[int], retval: int) -> None:
        assert len(out) == len(frame), "a rewrite changed the frame's length"
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} changed outside the rewrite"
        # XDP_PASS of a rewritten packet (no neighbour): the kernel routes it, MACs and TTL its own.
        forwarded = retval in (XDP_TX, XDP_REDIRECT)
        assert out[22] == frame[22] - forwarded, "TTL not lowered by exactly 1 when forwarded"
        if not forwarded:
            assert out[:12] == frame[:12], "passed to the kernel with MACs rewritten"

    def judge(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in ACTIONS, f"XDP action {retval} (XDP_ABORTED is 0)"
        reading = read_frame(frame)
        if isinstance(reading, str):
            if reading == "pass_not_vip" and len(frame) > 23 and frame[23] == 1 and out != frame:
                self._judge_icmp(frame, retval, out)
                return
            assert retval == XDP_PASS and out == frame, f"{reading} frame not passed untouched"
            self.may += 1
            return
        if isinstance(reading, LaterFragment):
            if out == frame:
                assert retval == XDP_PASS
            else:
                self._changed_only(frame, out, {*range(12), 22, 24, 25, *range(26, 34)}, retval)
                assert ip_residual(out, reading) == ip_residual(frame, reading)
            self.may += 1
            return
        p = reading
        vip = VIP_BY_KEY.get((p.dst, p.dport, p.proto_name))
        claim = (p.src, p.sport, p.dport, p.proto)
        owner = self.owner.get(claim) if p.dst == ARM_ADDR else None
        if vip is None and owner is None:
            assert retval == XDP_PASS and out == frame, "non-VIP traffic was not passed untouched"
            self.must["pass_not_vip"] += 1
            return
        if p.ttl <= 1:
            assert retval == XDP_PASS and out == frame, "TTL <= 1 was not passed untouched"
            self.must["pass_ttl"] += 1
            return
        if vip is not None:
            self._judge_to_vip(frame, retval, out, p, vip)
        else:
            assert owner is not None
            self._judge_reply(frame, retval, out, p, owner)

    def _judge_to_vip(self, frame: bytes, retval: int, out: bytes, p: Parsed, vip: Endpoint) -> None:
        if retval == XDP_DROP:
            assert vip in (NARROW_VIP, UNROUTED_VIP), f"{vip} dropped a packet"
            self.must["drop_snat_no_source" if vip == UNROUTED_VIP else "drop_snat_no_port"] += 1
            return
        assert retval == XDP_TX, f"one-arm: action {retval}, not XDP_TX"
        addr_ports = {*range(26, 34), p.l4, p.l4 + 1, p.l4 + 2, p.l4 + 3}
        self._changed_only(frame, out, {*range(12), 22, 24, 25, *addr_ports, p.check_at, p.check_at + 1},
                           retval)
        assert ip_residual(out, p) == ip_residual(frame, p), "IP header checksum went wrong"
        (check_in,) = struct.unpack_from("!H", frame, p.check_at)
        if p.proto == UDP and check_in == 0:
            assert struct.unpack_from("!H", out, p.check_at) == (0,), "UDP without checksum got one"
        else:
            assert l4_residual(out, p) == l4_residual(frame, p), "L4 checksum went wrong"
        new = read_frame(out)
        assert isinstance(new, Parsed)
        backend = Endpoint(new.dst, new.dport, p.proto_name)
        assert backend in VIPS[vip], f"{vip} sent to {backend}"
        low, high = PORT_RANGE.get(vip, DEFAULT_PORTS)
        assert new.src == ARM_ADDR and low <= new.sport <= high, f"source {new.src}:{new.sport}"
        claim = (backend.addr, backend.port, new.sport, p.proto)
        mine = (vip, p.src, p.sport)
        held = self.owner.get(claim)
        # No flow ends by timeout within a run this short (the shortest, closing, is 15 s).
        if held is not None and held != mine:
            assert time.monotonic() - self.started > DEFAULT_LIMITS.tcp_closing_timeout_s, (
                f"{claim} claimed by {mine} while {held} holds it")
        self.owner[claim] = mine
        self.source.claims.append((backend, new.sport))
        self.must["tx"] += 1
        self.forwarded += 1

    def _judge_reply(self, frame: bytes, retval: int, out: bytes, p: Parsed,
                     owner: tuple[Endpoint, str, int]) -> None:
        if out == frame:
            assert retval == XDP_PASS, "a reply was neither rewritten nor passed"
            self.may += 1        # a SYN-ACK on a closed flow's entry: pass_stale_reply
            return
        # A client the namespace has no neighbour for (a mutated source): pass_no_route.
        assert retval in (XDP_TX, XDP_PASS)
        addr_ports = {*range(26, 34), p.l4, p.l4 + 1, p.l4 + 2, p.l4 + 3}
        self._changed_only(frame, out, {*range(12), 22, 24, 25, *addr_ports, p.check_at, p.check_at + 1},
                           retval)
        assert ip_residual(out, p) == ip_residual(frame, p), "IP header checksum went wrong"
        (check_in,) = struct.unpack_from("!H", frame, p.check_at)
        if not (p.proto == UDP and check_in == 0):
            assert l4_residual(out, p) == l4_residual(frame, p), "L4 checksum went wrong"
        new = read_frame(out)
        assert isinstance(new, Parsed)
        vip, client, client_port = owner
        assert (new.src, new.sport, new.dst, new.dport) == (vip.addr, vip.port, client, client_port), (
            f"reply sent as {new.src}:{new.sport} -> {new.dst}:{new.dport}, its flow is {owner}")
        self.must["tx" if retval == XDP_TX else "pass_no_route"] += 1
        self.replied += 1

    def _judge_icmp(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in (XDP_TX, XDP_PASS) and len(out) == len(frame), "a translated ICMP error went wrong"
        ihl = (frame[14] & 0x0F) * 4
        icmp = ETH_LEN + ihl
        assert frames.ones_sum(out[ETH_LEN:icmp]) == frames.ones_sum(frame[ETH_LEN:icmp])
        assert frames.ones_sum(out[icmp:]) == frames.ones_sum(frame[icmp:]), "ICMP checksum went wrong"
        self.must["tx" if retval == XDP_TX else "pass_no_route"] += 1


def test_full_nat_frames_never_abort_never_collide_and_never_half_rewrite(
        fresh: None, lb_program: LoadedProgram, routed_netns: Any, lb_maps: LbMaps) -> None:
    rng = random.Random(SEED)
    source = Source(rng)
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
                            f"LBCTL_FULLNAT_FUZZ_FRAMES={n + 1}", pytrace=False)
    counters = lb_maps.global_counters()
    counted = Counter({name: c["packets"] for name, c in counters.items() if c["packets"]})
    print(f"seed {SEED}: {FRAMES} frames, {judge.forwarded} to backends, {judge.replied} replies "
          f"back, {len(judge.owner)} claims; counted {dict(sorted(counted.items()))}")
    assert sum(counted.values()) == FRAMES
    assert sum(c["bytes"] for c in counters.values()) == sent_bytes
    for outcome, least in judge.must.items():
        assert counted[outcome] >= least, f"{outcome}: counted {counted[outcome]}, at least {least}"
    # The run reached the places that matter, or it proves little.
    for outcome in ("tx", "drop_snat_no_port", "drop_snat_no_source", "pass_ttl", "pass_malformed"):
        assert counted[outcome] > FRAMES // 1000, f"too few {outcome}: {dict(counted)}"
    assert set(OUTCOMES) >= set(counted)
    assert judge.replied > FRAMES // 20 and judge.forwarded > FRAMES // 20
    assert len({port for (_, _, port, _) in judge.owner}) > 100, "too few distinct ports claimed"
