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
from collections.abc import Callable
from typing import Any

import pytest
from fullnat_fuzzing import SEED, Flow, FuzzNet, Judge, Source, run_fuzz
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

from lbctl.bench.routed import Port
from lbctl.control import Controller
from xdp.codec import Endpoint
from xdp.libbpf import XDP_PASS, XDP_TX
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")

FRAMES = int(os.environ.get("LBCTL_FULLNAT_FUZZ6_FRAMES", "30000"))

ARM, ARM_MAC, ARM_ADDR = "fz6", "02:00:06:1f:01:01", "fd00:62:1::1"
NETNS_PREFIX = "fs"
CLIENTS = ("fd00:62:1::100", "fd00:62:1::101", "fd00:62:1::102")
UNRESOLVED_CLIENT = "fd00:62:1::199"        # no neighbour entry: a reply to it passes (no route)
ROUTER = "fd00:62:1::fe"
TCP_VIP = Endpoint("fd00:62:9::1", 80, "tcp")
UDP_VIP = Endpoint("fd00:62:9::1", 53, "udp")
NARROW_VIP = Endpoint("fd00:62:9::2", 80, "tcp")     # four ports: exhaustion comes quickly
UNROUTED_VIP = Endpoint("fd00:62:9::3", 80, "tcp")   # no route to its backend: no source address
NET = FuzzNet(ARM_ADDR, TCP_VIP, UDP_VIP, NARROW_VIP, UNROUTED_VIP,
              (Endpoint("fd00:62:1::11", 8080, "tcp"), Endpoint("fd00:62:1::12", 8080, "tcp")),
              (Endpoint("fd00:62:1::13", 5353, "udp"),), Endpoint("fd00:62:1::14", 80, "tcp"),
              Endpoint("2001:db8:ffff::1", 80, "tcp"))
ALL_BACKENDS = NET.all_backends
PORTS = (Port(ARM, ARM_MAC, "10.62.1.1/24",
              {a: mac_of6(a) for a in (*CLIENTS, ROUTER, *(b.addr for b in ALL_BACKENDS))},
              cidr6=f"{ARM_ADDR}/64"),)


class Source6(Source):
    """Frames to the VIPs, replies to the claims seen so far (and to unclaimed ports), ICMPv6
    errors quoting either direction of a flow, other traffic; each maybe mutated; and noise."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.claims: list[tuple[Endpoint, int, Flow]] = []     # backend, snat port, its flow

    def claimed(self, backend: Endpoint, port: int, flow: Flow) -> None:
        if len(self.claims) < 4096:
            self.claims.append((backend, port, flow))

    def makers(self) -> tuple[Callable[[], bytes], ...]:
        return (self.to_vip, self.to_vip, self.reply, self.reply, self.icmp_error, self.other)

    def noise(self) -> bytes:
        f = bytearray(self.rng.randbytes(self.rng.randint(14, 120)))
        f[12:14] = b"\x86\xdd"
        return bytes(f)

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


class Judge6(Judge):
    HOP_AT = 21      # the IPv6 hop limit

    def __init__(self, net: FuzzNet, source: Source) -> None:
        super().__init__(net, source, Parsed6)
        self.icmp_translated = 0

    def read(self, frame: bytes) -> Parsed6 | Icmp6 | Later6 | str:
        return read6(frame)

    def rewrite(self, frame: bytes, out: bytes, p: Parsed6, retval: int, toward_backend: bool) -> Parsed6:
        """Both ends rewritten and nothing else: addresses, ports, the L4 checksum (its sum with
        the new pseudo-header unchanged), hop limit down by one when forwarded, MACs."""
        self.changed_only(frame, out, {*range(12), 21, *range(22, 54), *range(p.l4, p.l4 + 4),
                                       p.check_at, p.check_at + 1}, retval)
        check_in = int.from_bytes(frame[p.check_at:p.check_at + 2], "big")
        if not (p.proto == UDP and check_in == 0):
            assert residual(out, p.proto, p.l4, p.l4_len) == residual(frame, p.proto, p.l4, p.l4_len), \
                "L4 checksum (IPv6 pseudo-header) went wrong"
        new = read6(out)
        assert isinstance(new, Parsed6)
        return new

    def unparsed(self, frame: bytes, retval: int, out: bytes, reading: Icmp6 | Later6 | str) -> None:
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
        # Full-NAT over IPv6 records no fragments (docs/modes.md): a later fragment has no
        # first fragment's entry to follow and goes to the kernel untouched.
        assert retval == XDP_PASS and out == frame, "a later IPv6 fragment was rewritten"
        self.must["pass_fragment"] += 1


def test_full_nat_ipv6_frames_never_abort_never_collide_and_never_half_rewrite(
        controller: Controller, clean_dataplane: Callable[[], None], lb_program: LoadedProgram,
        routed_netns: Any, lb_maps: LbMaps) -> None:
    judge = Judge6(NET, Source6(random.Random(SEED)))
    run_fuzz(judge, FRAMES, "LBCTL_FULLNAT_FUZZ6_FRAMES", controller, clean_dataplane,
             lb_program, routed_netns, ARM, lb_maps,
             reached=("pass_ext_header", "pass_fragment", "pass_not_vip"))
    print(f"{judge.icmp_translated} ICMPv6 errors translated")
    assert judge.icmp_translated > FRAMES // 200, "too few ICMPv6 errors translated"
