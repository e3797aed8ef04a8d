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
from collections.abc import Callable
from typing import Any

import pytest
from fullnat_fuzzing import SEED, Flow, FuzzNet, Judge, Source, run_fuzz
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
from xdp import frames
from xdp.codec import Endpoint
from xdp.libbpf import XDP_PASS, XDP_TX
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")

FRAMES = int(os.environ.get("LBCTL_FULLNAT_FUZZ_FRAMES", "40000"))

ARM, ARM_MAC, ARM_ADDR = "fzn", "02:00:0a:1f:01:01", "10.31.1.1"
CLIENTS = ("10.31.1.100", "10.31.1.101", "10.31.1.102", "10.31.1.103")
TCP_VIP = Endpoint("10.31.9.1", 80, "tcp")
UDP_VIP = Endpoint("10.31.9.1", 53, "udp")
NARROW_VIP = Endpoint("10.31.9.2", 80, "tcp")       # four ports: exhaustion comes quickly
UNROUTED_VIP = Endpoint("10.31.9.3", 80, "tcp")     # no route to its backend: no source address
TCP_BACKENDS = (Endpoint("10.31.1.11", 8080, "tcp"), Endpoint("10.31.1.12", 8080, "tcp"))
NET = FuzzNet(ARM_ADDR, TCP_VIP, UDP_VIP, NARROW_VIP, UNROUTED_VIP, TCP_BACKENDS,
              (Endpoint("10.31.1.13", 5353, "udp"),), Endpoint("10.31.1.14", 80, "tcp"),
              Endpoint("192.0.2.1", 80, "tcp"))
ALL_BACKENDS = NET.all_backends
PORTS = (Port(ARM, ARM_MAC, f"{ARM_ADDR}/24",
              {a: mac_of(a) for a in (*CLIENTS, *(b.addr for b in ALL_BACKENDS))}),)


class Source4(Source):
    """Frames to the VIPs, replies to the claims seen so far (and to unclaimed ports), ICMP
    errors quoting them, later fragments, other traffic; each maybe mutated; and noise."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.claims: list[tuple[Endpoint, int]] = []   # (backend, snat port)

    def claimed(self, backend: Endpoint, port: int, flow: Flow) -> None:
        self.claims.append((backend, port))

    def makers(self) -> tuple[Callable[[], bytes], ...]:
        return (self.to_vip, self.to_vip, self.reply, self.reply, self.icmp_error,
                self.later_fragment, self.other)

    def noise(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(14, 120))

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


class Judge4(Judge):
    HOP_AT = 22      # the IPv4 TTL

    def read(self, frame: bytes) -> Parsed | LaterFragment | str:
        return read_frame(frame)

    def unparsed(self, frame: bytes, retval: int, out: bytes, reading: LaterFragment | str) -> None:
        if isinstance(reading, str):
            if reading == "pass_not_vip" and len(frame) > 23 and frame[23] == 1 and out != frame:
                self._judge_icmp(frame, retval, out)
                return
            assert retval == XDP_PASS and out == frame, f"{reading} frame not passed untouched"
            return
        if out == frame:
            assert retval == XDP_PASS
        else:
            self.changed_only(frame, out, {*range(12), 22, 24, 25, *range(26, 34)}, retval)
            assert ip_residual(out, reading) == ip_residual(frame, reading)

    def rewrite(self, frame: bytes, out: bytes, p: Parsed, retval: int, toward_backend: bool) -> Parsed:
        """Both ends rewritten and nothing else: addresses, ports, both checksums (as right as
        they came in), TTL down by one when forwarded, MACs."""
        addr_ports = {*range(26, 34), p.l4, p.l4 + 1, p.l4 + 2, p.l4 + 3}
        self.changed_only(frame, out, {*range(12), 22, 24, 25, *addr_ports, p.check_at, p.check_at + 1},
                          retval)
        assert ip_residual(out, p) == ip_residual(frame, p), "IP header checksum went wrong"
        (check_in,) = struct.unpack_from("!H", frame, p.check_at)
        if p.proto == UDP and check_in == 0:
            if toward_backend:
                assert struct.unpack_from("!H", out, p.check_at) == (0,), "UDP without checksum got one"
        else:
            assert l4_residual(out, p) == l4_residual(frame, p), "L4 checksum went wrong"
        new = read_frame(out)
        assert isinstance(new, Parsed)
        return new

    def _judge_icmp(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in (XDP_TX, XDP_PASS) and len(out) == len(frame), "a translated ICMP error went wrong"
        ihl = (frame[14] & 0x0F) * 4
        icmp = ETH_LEN + ihl
        assert frames.ones_sum(out[ETH_LEN:icmp]) == frames.ones_sum(frame[ETH_LEN:icmp])
        assert frames.ones_sum(out[icmp:]) == frames.ones_sum(frame[icmp:]), "ICMP checksum went wrong"
        self.must["tx" if retval == XDP_TX else "pass_no_route"] += 1


def test_full_nat_frames_never_abort_never_collide_and_never_half_rewrite(
        controller: Controller, clean_dataplane: Callable[[], None], lb_program: LoadedProgram,
        routed_netns: Any, lb_maps: LbMaps) -> None:
    judge = Judge4(NET, Source4(random.Random(SEED)), Parsed)
    run_fuzz(judge, FRAMES, "LBCTL_FULLNAT_FUZZ_FRAMES", controller, clean_dataplane,
             lb_program, routed_netns, ARM, lb_maps)
