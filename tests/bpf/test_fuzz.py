"""Hostile input: 100,000 seeded random and mutated frames, and every header lie in turn, through
BPF_PROG_TEST_RUN. Each frame is judged against a Python reading of the documented policy
(docs/dataplane.md): no XDP_ABORTED, nothing but VIP traffic and tracked replies rewritten, every
rewrite whole with its checksums as right as they came in, and every frame counted once."""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from lbctl.bench.routed import Port, mac_of
from lbctl.control import Controller
from lbctl.model import BackendSpec, VipSpec
from lbctl.netns import inside
from xdp import frames, libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")

# LBCTL_FUZZ_SEED=<n> replays a run; LBCTL_FUZZ_FRAMES=<n> changes its length.
DEFAULT_SEED = 20240611
FUZZ_SEED = int(os.environ.get("LBCTL_FUZZ_SEED", str(DEFAULT_SEED)))
FUZZ_FRAMES = int(os.environ.get("LBCTL_FUZZ_FRAMES", "100000"))

# --- the namespace and the configuration (addresses of their own: no other module's) ---

CLIENT_ARM, CLIENT_ARM_MAC = "fzc", "02:00:0a:1e:01:01"
BACKEND_ARM, BACKEND_ARM_MAC = "fzb", "02:00:0a:1e:02:01"
CLIENTS = ("10.30.1.100", "10.30.1.101", "10.30.1.102", "10.30.1.103")
UNRESOLVED_CLIENT = "10.30.1.199"      # on the client subnet, no neighbour: pass_no_route
TCP_VIP = Endpoint("10.30.9.1", 80, "tcp")
UDP_VIP = Endpoint("10.30.9.1", 53, "udp")
EMPTY_VIP = Endpoint("10.30.9.2", 443, "tcp")
UNRESOLVED_VIP = Endpoint("10.30.9.3", 80, "tcp")
TCP_BACKENDS = (Endpoint("10.30.2.11", 8080, "tcp"), Endpoint("10.30.2.12", 8080, "tcp"),
                Endpoint("10.30.2.13", 8080, "tcp"))
DRAINING = TCP_BACKENDS[2]              # in the VIP, never in its ring: must never get a flow
UDP_BACKENDS = (Endpoint("10.30.2.21", 5353, "udp"), Endpoint("10.30.2.22", 5353, "udp"))
UNRESOLVED_BACKEND = Endpoint("10.30.2.99", 80, "tcp")
STICKY_VIP = Endpoint("10.30.9.4", 80, "tcp")         # --affinity client
STICKY_BACKENDS = (Endpoint("10.30.2.11", 8081, "tcp"), Endpoint("10.30.2.12", 8081, "tcp"))
# --forwarding dsr: the frame must leave with new MACs and not one other byte changed.
DSR_VIP = Endpoint("10.30.9.5", 80, "tcp")
DSR_UDP_VIP = Endpoint("10.30.9.5", 53, "udp")
DSR_UNRESOLVED_VIP = Endpoint("10.30.9.6", 80, "tcp")   # its backend has no MAC: drop_dsr_unreachable
DSR_BACKENDS = (Endpoint("10.30.2.31", 80, "tcp"), Endpoint("10.30.2.32", 80, "tcp"))
DSR_UDP_BACKENDS = (Endpoint("10.30.2.33", 53, "udp"),)
VIPS = {TCP_VIP: TCP_BACKENDS, UDP_VIP: UDP_BACKENDS, EMPTY_VIP: (),
        UNRESOLVED_VIP: (UNRESOLVED_BACKEND,), STICKY_VIP: STICKY_BACKENDS,
        DSR_VIP: DSR_BACKENDS, DSR_UDP_VIP: DSR_UDP_BACKENDS, DSR_UNRESOLVED_VIP: (UNRESOLVED_BACKEND,)}
AFFINITY = {STICKY_VIP: "client"}
DSR_VIPS = {DSR_VIP, DSR_UDP_VIP, DSR_UNRESOLVED_VIP}
DSR_BY_MAC = {bytes.fromhex(mac_of(b.addr).replace(":", "")): b.addr for b in (*DSR_BACKENDS, *DSR_UDP_BACKENDS)}
ACTIVE = {vip: tuple(b for b in backends if b != DRAINING) for vip, backends in VIPS.items()}




PORTS = (
    Port(CLIENT_ARM, CLIENT_ARM_MAC, "10.30.1.1/24", {c: mac_of(c) for c in CLIENTS}),
    Port(BACKEND_ARM, BACKEND_ARM_MAC, "10.30.2.1/24",
         {b.addr: mac_of(b.addr) for b in (*TCP_BACKENDS, *UDP_BACKENDS, *DSR_BACKENDS, *DSR_UDP_BACKENDS)}),
)
ARM_MACS = {bytes.fromhex(p.mac.replace(":", "")) for p in PORTS}


@pytest.fixture(scope="module")
def fuzz_config(controller: Controller) -> None:
    """Replaces whatever configuration the shared instance holds with this module's."""
    config = {vip: VipSpec(vip, tuple(BackendSpec(b.addr, b.port,
                                                  state="drain" if b == DRAINING else "active")
                                      for b in backends), AFFINITY.get(vip, "flow"),
                          "dsr" if vip in DSR_VIPS else "nat")
              for vip, backends in VIPS.items()}
    controller.change(lambda _config: config)


@pytest.fixture
def fresh(fuzz_config: None, clean_dataplane: Callable[[], None]) -> None:
    clean_dataplane()




# --- checksums and the reference reading of a frame ---

ETH_LEN = 14
TCP, UDP = 6, 17


@dataclass(frozen=True)
class Parsed:
    """An IPv4 TCP/UDP frame the program must act on, and where its fields lie."""

    ihl_bytes: int
    tot_len: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    ttl: int
    check_at: int        # offset of the L4 checksum
    l4_len: int          # bytes the L4 checksum covers (TCP: to the IP end; UDP: its length)
    ip_id: int
    more_fragments: bool  # a first fragment: the program records it for the later ones

    @property
    def l4(self) -> int:
        return ETH_LEN + self.ihl_bytes

    @property
    def proto_name(self) -> str:
        return "tcp" if self.proto == TCP else "udp"


@dataclass(frozen=True)
class LaterFragment:
    """A TCP/UDP fragment with an offset: no L4 header, it follows its datagram's first."""

    ihl_bytes: int
    key: tuple[str, str, int, int]   # src, dst, IP id, proto: the program's frags key
    ttl: int


def _addr(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


# An IPv6 frame: this module's configuration has no IPv6 VIP, so it must pass untouched, counted
# by the IPv6 policy's outcome (tests/bpf/test_fuzz6.py reads that policy frame by frame).
IPV6 = "ipv6"
IPV6_OUTCOMES = ("pass_not_vip", "pass_malformed", "pass_ext_header", "pass_fragment")


def read_frame(frame: bytes) -> str | Parsed | LaterFragment:
    """The policy of lb_parse, in Python: the outcome of a frame the program must pass
    untouched, or the frame's fields. Same order of checks as the C, for the same counts."""
    if frame[12:14] == b"\x86\xdd":
        return IPV6
    if frame[12:14] != b"\x08\x00":
        return "pass_not_ipv4"
    if len(frame) < ETH_LEN + 20:
        return "pass_malformed"
    version_ihl, _tos, tot_len, ip_id, frag, ttl, proto = struct.unpack_from("!BBHHHBB", frame, 14)
    ihl_bytes = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or ihl_bytes < 20:
        return "pass_malformed"
    if tot_len < ihl_bytes or ETH_LEN + tot_len > len(frame):
        return "pass_malformed"
    if proto not in (TCP, UDP):
        return "pass_not_vip"
    if frag & 0x1FFF:
        return LaterFragment(ihl_bytes, (_addr(frame[26:30]), _addr(frame[30:34]), ip_id, proto),
                             ttl)
    more_fragments = bool(frag & 0x2000)
    l4 = ETH_LEN + ihl_bytes
    payload_len = tot_len - ihl_bytes
    if proto == TCP:
        if l4 + 20 > len(frame):
            return "pass_malformed"
        data_offset = (frame[l4 + 12] >> 4) * 4
        if data_offset < 20 or data_offset > payload_len:
            return "pass_malformed"
        check_at, l4_len = l4 + 16, payload_len
    else:
        if l4 + 8 > len(frame):
            return "pass_malformed"
        (udp_len,) = struct.unpack_from("!H", frame, l4 + 4)
        # A first fragment's UDP length covers the whole datagram, beyond this packet.
        if udp_len < 8 or (udp_len > payload_len and not more_fragments):
            return "pass_malformed"
        check_at, l4_len = l4 + 6, udp_len
    sport, dport = struct.unpack_from("!HH", frame, l4)
    return Parsed(ihl_bytes, tot_len, proto, _addr(frame[26:30]), _addr(frame[30:34]),
                  sport, dport, ttl, check_at, l4_len, ip_id, more_fragments)


def ip_residual(frame: bytes, p: Parsed | LaterFragment) -> int:
    return frames.ones_sum(frame[ETH_LEN:ETH_LEN + p.ihl_bytes])


def l4_residual(frame: bytes, p: Parsed) -> int:
    # The frame's own addresses: `p` was read from the frame before its rewrite.
    pseudo = frame[26:34] + struct.pack("!BBH", 0, p.proto, p.l4_len)
    return frames.ones_sum(pseudo + frame[p.l4:p.l4 + p.l4_len])


# --- frames, built by hand (scapy takes ~1 ms a frame; 100,000 of them would take minutes) ---

def build(src_mac: str, dst_mac: str, src: str, dst: str, proto: int, sport: int, dport: int,
          *, tcp_flags: int = 0x02, payload: bytes = b"", ttl: int = 64, ip_options: bytes = b"",
          tcp_options: bytes = b"", frag: int = 0, udp_checksum: bool = True, ip_id: int = 4242,
          udp_len: int | None = None) -> bytes:
    """Ethernet + IPv4 + TCP or UDP with every length and checksum right (`udp_len`: a first
    fragment's, the whole datagram's, checksummed as if the datagram were this packet)."""
    if proto == TCP:
        return frames.tcp_frame(src_mac, dst_mac, src, dst, sport, dport, flags=tcp_flags,
                                seq=0x1000, ack=0x2000, tcp_options=tcp_options, payload=payload,
                                ttl=ttl, ident=ip_id, frag=frag, ip_options=ip_options)
    return frames.udp_frame(src_mac, dst_mac, src, dst, sport, dport, payload,
                            checksum=udp_checksum, length=udp_len, ttl=ttl, ident=ip_id,
                            frag=frag, ip_options=ip_options)


TCP_FLAG_CHOICES = (0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x01, 0x00, 0x3F)
IP_OPTION_CHOICES = (b"", b"", b"", b"\x94\x04\x00\x00", b"\x01\x01\x01\x00",
                     b"\x01" * 39 + b"\x00")
TCP_OPTION_CHOICES = (b"", b"", b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07\x00\x00")
TTL_CHOICES = (64, 64, 64, 255, 2, 1, 0)
NON_VIP_DESTINATIONS = ("10.30.1.1", "10.30.2.1", "10.30.9.1", "10.30.9.2", "10.30.9.4",
                        "255.255.255.255", "10.30.1.255", "224.0.0.251", "8.8.8.8",
                        TCP_BACKENDS[0].addr)
# Fragments share a few IP ids, so later fragments often belong to a first one seen before.
FRAG_IDS = (4242, 4243, 4244)
LATER_FRAG_BITS = (0x2010, 0x0010, 0x3FFF, 0x00B9, 0x20B9)   # offsets, with or without MF


T = TypeVar("T")


def mixed(rng: random.Random, makers: Sequence[Callable[[], T]], mutate: Callable[[T], T],
          noise: Callable[[], T], made: float, mutated: float) -> Iterator[T]:
    """Endless fuzz input, one roll of `rng` each: below `made` a frame from one of `makers`,
    below `mutated` one mutated, else noise (so a seed replays the same frames)."""
    while True:
        roll = rng.random()
        if roll < made:
            yield rng.choice(makers)()
        elif roll < mutated:
            yield mutate(rng.choice(makers)())
        else:
            yield noise()


@dataclass
class Sample:
    frame: bytes
    ingress: str


class FrameSource:
    """Seeded frames: realistic ones to VIPs and from backends (whose replies match flows the
    program really tracks), other traffic, then mutations of any of them, and pure noise."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.replies: list[tuple[Endpoint, str, int, int]] = []  # backend, client, port, proto

    def remember_reply(self, backend: Endpoint, client: str, client_port: int, proto: int) -> None:
        if len(self.replies) < 4096:
            self.replies.append((backend, client, client_port, proto))

    def _client(self) -> str:
        return self.rng.choice(CLIENTS) if self.rng.random() < 0.95 else UNRESOLVED_CLIENT

    def _fragment_bits(self, proto: int, payload: bytes) -> dict[str, Any]:
        """build() keywords for a first fragment (MF, and a UDP length of the whole datagram)
        or a later one, of a datagram with a shared IP id (mostly)."""
        r = self.rng
        ip_id = r.choice(FRAG_IDS) if r.random() < 0.9 else r.randrange(65536)
        if r.random() < 0.4:
            udp_len = 8 + len(payload) + r.randrange(8, 3000) if proto == UDP else None
            return {"frag": 0x2000, "ip_id": ip_id, "udp_len": udp_len}
        return {"frag": r.choice(LATER_FRAG_BITS), "ip_id": ip_id}

    def fragment(self) -> Sample:
        """A first or later fragment of a datagram to a VIP."""
        r = self.rng
        vip = r.choice((TCP_VIP, UDP_VIP, DSR_VIP, DSR_UDP_VIP))
        client = self._client()
        proto = TCP if vip.proto == "tcp" else UDP
        payload = r.randbytes(r.choice((0, 16, 64)))
        frame = build(mac_of(client), CLIENT_ARM_MAC, client, vip.addr, proto,
                      r.randrange(40000, 40064), vip.port, tcp_flags=r.choice(TCP_FLAG_CHOICES),
                      payload=payload, ttl=r.choice(TTL_CHOICES),
                      **self._fragment_bits(proto, payload))
        return Sample(frame, CLIENT_ARM)

    def to_vip(self) -> Sample:
        r = self.rng
        vip = r.choice((TCP_VIP, TCP_VIP, UDP_VIP, EMPTY_VIP, UNRESOLVED_VIP, STICKY_VIP, DSR_VIP,
                        DSR_UDP_VIP, DSR_UNRESOLVED_VIP))
        client = self._client()
        proto = TCP if vip.proto == "tcp" else UDP
        frame = build(mac_of(client), CLIENT_ARM_MAC, client, vip.addr, proto,
                      r.randrange(40000, 40064), vip.port, tcp_flags=r.choice(TCP_FLAG_CHOICES),
                      payload=r.randbytes(r.choice((0, 0, 1, 17, 64, 300))),
                      ttl=r.choice(TTL_CHOICES), ip_options=r.choice(IP_OPTION_CHOICES),
                      tcp_options=r.choice(TCP_OPTION_CHOICES), udp_checksum=r.random() < 0.9)
        return Sample(frame, CLIENT_ARM if r.random() < 0.9 else BACKEND_ARM)

    def reply(self) -> Sample:
        r = self.rng
        if not self.replies:
            return self.to_vip()
        backend, client, client_port, proto = r.choice(self.replies)
        payload = r.randbytes(r.choice((0, 5, 100)))
        fragmented = self._fragment_bits(proto, payload) if r.random() < 0.15 else {}
        frame = build(mac_of(backend.addr), BACKEND_ARM_MAC, backend.addr, client, proto,
                      backend.port, client_port, tcp_flags=r.choice(TCP_FLAG_CHOICES),
                      payload=payload, ttl=r.choice(TTL_CHOICES),
                      ip_options=r.choice(IP_OPTION_CHOICES), udp_checksum=r.random() < 0.9,
                      **fragmented)
        return Sample(frame, BACKEND_ARM if r.random() < 0.9 else CLIENT_ARM)

    def other(self) -> Sample:
        r = self.rng
        kind = r.randrange(6)
        client = self._client()
        eth = bytes.fromhex(CLIENT_ARM_MAC.replace(":", "") + mac_of(client).replace(":", ""))
        if kind == 0:     # TCP or UDP to something that is not a VIP
            proto = r.choice((TCP, UDP))
            frame = build(mac_of(client), CLIENT_ARM_MAC, client,
                          r.choice(NON_VIP_DESTINATIONS), proto, r.randrange(1024, 65536),
                          r.choice((22, 53, 80, 81, 443, 8080, 5353)),
                          tcp_flags=r.choice(TCP_FLAG_CHOICES), ttl=r.choice(TTL_CHOICES))
        elif kind == 1:   # a fragment, first or later
            return self.fragment()
        elif kind == 2:   # ICMP, SCTP, GRE to a VIP address (no ports: not ours)
            ip = frames.ipv4_packet(client, TCP_VIP.addr, r.choice((1, 47, 132)), bytes(8),
                                    ident=1)
            frame = eth + b"\x08\x00" + ip
        elif kind == 3:   # ARP
            frame = eth + b"\x08\x06" + bytes(28)
        elif kind == 4:   # IPv6
            frame = eth + b"\x86\xdd" + b"\x60" + bytes(39) + bytes(20)
        else:             # VLAN-tagged IPv4 to a VIP
            inner = build(mac_of(client), CLIENT_ARM_MAC, client, TCP_VIP.addr, TCP, 40000, 80)
            frame = inner[:12] + b"\x81\x00\x00\x07" + inner[12:]
        return Sample(frame, CLIENT_ARM)

    def mutate(self, sample: Sample) -> Sample:
        r = self.rng
        frame = bytearray(sample.frame)
        ihl_bytes = (frame[14] & 0x0F) * 4 if len(frame) > 14 else 20
        l4 = ETH_LEN + max(ihl_bytes, 20)
        for _ in range(r.randint(1, 3)):
            what = r.randrange(9)
            if what == 0 and len(frame) > 14:      # IHL anything, version mostly 4
                frame[14] = (0x40 if r.random() < 0.8 else r.randrange(16) << 4) | r.randrange(16)
            elif what == 1 and len(frame) > 17:    # IPv4 total length
                struct.pack_into("!H", frame, 16, r.choice(
                    (0, 19, 20, len(frame) - 14 - 1, len(frame) - 14 + 1, r.randrange(65536))))
            elif what == 2 and len(frame) > l4 + 12:   # TCP data offset (or whatever lies there)
                frame[l4 + 12] = (r.randrange(16) << 4) | (frame[l4 + 12] & 0x0F)
            elif what == 3 and len(frame) > l4 + 5:    # UDP length
                struct.pack_into("!H", frame, l4 + 4, r.choice((0, 7, 8, r.randrange(65536))))
            elif what == 4 and len(frame) > 23:        # fragment bits, protocol
                frame[20] ^= r.choice((0x20, 0x40, 0x80, 0x01))
                if r.random() < 0.3:
                    frame[23] = r.choice((TCP, UDP, 1, 0, 255))
            elif what == 5:                            # truncate, never below Ethernet
                del frame[r.randint(14, len(frame)):]
            elif what == 6:                            # trailing bytes (Ethernet padding)
                frame += r.randbytes(r.randint(1, 64))
            elif what == 7 and len(frame) > 14:        # a random byte in the headers
                frame[r.randrange(14, min(len(frame), 80))] = r.randrange(256)
            elif len(frame) > 14:                      # a bit flip anywhere
                i = r.randrange(len(frame))
                frame[i] ^= 1 << r.randrange(8)
        return Sample(bytes(frame), sample.ingress)

    def noise(self) -> Sample:
        r = self.rng
        frame = bytearray(r.randbytes(r.randint(14, 160)))
        if r.random() < 0.7:
            frame[12:14] = b"\x08\x00"
            if len(frame) > 14 and r.random() < 0.7:
                frame[14] = 0x45
        return Sample(bytes(frame), r.choice((CLIENT_ARM, BACKEND_ARM)))

    def __iter__(self) -> Iterator[Sample]:
        return mixed(self.rng, (self.to_vip, self.reply, self.other), self.mutate, self.noise,
                     made=0.50, mutated=0.90)


# --- judging one frame ---

VIP_BY_KEY = {(v.addr, v.port, v.proto): v for v in VIPS}
ACTIONS = {XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT}


Outcomes = frozenset  # the outcomes one frame may count as: one, or a few when it cannot be known


class Judge:
    """Checks each frame's verdict and output against the policy, keeps the replies the program
    now tracks, and tallies the outcome(s) each frame may count as."""

    def __init__(self, source: FrameSource) -> None:
        self.source = source
        self.tracked: dict[tuple[str, str, int, int, int], Endpoint] = {}  # reply key -> VIP
        # Reply keys the program may have forgotten: it deletes an entry it finds stale (a
        # timeout ran out during the run), and a later client packet may or may not restore it.
        self.maybe_forgotten: set[tuple[str, str, int, int, int]] = set()
        self.expected: Counter[frozenset[str]] = Counter()
        self.rewritten = 0
        # frags, as the program must hold it: (src, dst, IP id, proto) of a forwarded first
        # fragment -> (new address, rewrite_dst, when); a later record of the key replaces it.
        # ("l2" for a DSR datagram: later fragments go to that backend's MAC unchanged)
        self.frags: dict[tuple[str, str, int, int], tuple[str, bool | str, float]] = {}
        self.fragments_followed = 0
        # Client-affinity VIPs: (client, VIP) -> the one backend every flow of that client gets.
        self.sticky: dict[tuple[str, Endpoint], Endpoint] = {}
        self.sticky_checked = 0
        self.dsr_forwarded = 0

    def count(self, *outcomes: str) -> None:
        self.expected[Outcomes(outcomes)] += 1

    def judge(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in ACTIONS, f"XDP action {retval} (XDP_ABORTED is 0)"
        reading = read_frame(frame)
        if reading == IPV6:
            assert retval == XDP_PASS and out == frame, "an IPv6 frame not passed untouched"
            self.count(*IPV6_OUTCOMES)
            return
        if isinstance(reading, str):
            assert retval == XDP_PASS and out == frame, f"{reading} frame not passed untouched"
            self.count(reading)
            return
        if isinstance(reading, LaterFragment):
            self._judge_later_fragment(frame, retval, out, reading)
            return
        p = reading
        vip = VIP_BY_KEY.get((p.dst, p.dport, p.proto_name))
        reply_key = (p.src, p.dst, p.sport, p.dport, p.proto)
        reply_to = self.tracked.get(reply_key)
        if vip is None and reply_to is None:
            assert retval == XDP_PASS and out == frame, "non-VIP traffic was not passed untouched"
            self.count("pass_not_vip")
            return
        if vip in DSR_VIPS:
            self._judge_dsr(frame, retval, out, p, vip)
            return
        if p.ttl <= 1:
            assert retval == XDP_PASS and out == frame, "TTL <= 1 was not passed untouched"
            if reply_key in self.maybe_forgotten:
                self.count("pass_ttl", "pass_not_vip")
            else:
                self.count("pass_ttl")
            return
        if retval == XDP_DROP:
            assert vip is not None and not ACTIVE[vip], f"dropped, but {vip} has backends"
            self.count("drop_no_backend")
            return
        if vip is not None:
            assert out != frame, "VIP traffic passed without a rewrite"
            backend = self._check_rewrite(frame, out, p, retval, dst=True)
            assert backend in ACTIVE[vip], f"{vip} forwarded to {backend}, not an active backend"
            if AFFINITY.get(vip) == "client":
                first = self.sticky.setdefault((p.src, vip), backend)
                self.sticky_checked += 1
                assert backend == first, f"client {p.src} of {vip} sent to {backend}, before to {first}"
            key = (backend.addr, p.src, backend.port, p.sport, p.proto)
            if key not in self.tracked:
                self.tracked[key] = vip
                self.source.remember_reply(backend, p.src, p.sport, p.proto)
            if p.more_fragments:
                self.frags[(p.src, p.dst, p.ip_id, p.proto)] = (backend.addr, True, time.monotonic())
        elif out == frame:
            # A tracked reply whose entry the program found stale (and forgot) just now, or
            # had forgotten before.
            assert retval == XDP_PASS, "a tracked reply was neither NATed nor passed"
            self.maybe_forgotten.add(reply_key)
            self.count("pass_stale_reply", "pass_not_vip")
            return
        else:
            vip_as_source = self._check_rewrite(frame, out, p, retval, dst=False)
            assert vip_as_source == reply_to, f"reply NATed to {vip_as_source}, not {reply_to}"
            if p.more_fragments:
                self.frags[(p.src, p.dst, p.ip_id, p.proto)] = (
                    vip_as_source.addr, False, time.monotonic())
        self.rewritten += 1
        self.count({XDP_TX: "tx", XDP_REDIRECT: "redirect", XDP_PASS: "pass_no_route"}[retval])

    def _judge_dsr(self, frame: bytes, retval: int, out: bytes, p: Parsed, vip: Endpoint) -> None:
        """DSR: whatever the TTL, the frame goes to an active backend's MAC from an arm's MAC,
        every byte after the MACs as it came; or, with no MAC for the backend, it is dropped."""
        if retval == XDP_DROP:
            if ACTIVE[vip] and vip != DSR_UNRESOLVED_VIP:
                raise AssertionError(f"DSR frame to {vip} dropped, but its backends resolve")
            self.count("drop_dsr_unreachable" if ACTIVE[vip] else "drop_no_backend")
            if p.more_fragments and ACTIVE[vip]:
                # Recorded before the send failed: its later fragments meet the same end.
                self.frags[(p.src, p.dst, p.ip_id, p.proto)] = ("", "l2", time.monotonic())
            return
        assert retval in (XDP_TX, XDP_REDIRECT), f"DSR frame to {vip}: XDP action {retval}"
        assert len(out) == len(frame) and out[12:] == frame[12:], "DSR changed bytes past the MACs"
        assert out[6:12] in ARM_MACS, "DSR sent with a source MAC not of an arm"
        backend = DSR_BY_MAC.get(out[:6])
        assert backend in {b.addr for b in ACTIVE[vip]}, f"DSR frame to {vip} sent to MAC {out[:6].hex()}"
        # What comes back from a DSR backend never matches a tracked reply: it must pass.
        self.source.remember_reply(Endpoint(backend, vip.port, vip.proto), p.src, p.sport, p.proto)
        if p.more_fragments:
            self.frags[(p.src, p.dst, p.ip_id, p.proto)] = (backend, "l2", time.monotonic())
        self.rewritten += 1
        self.dsr_forwarded += 1
        self.count({XDP_TX: "tx", XDP_REDIRECT: "redirect"}[retval])

    def _judge_later_fragment(self, frame: bytes, retval: int, out: bytes,
                              f: LaterFragment) -> None:
        """Where its datagram's first fragment went (address only), or to the kernel."""
        entry = self.frags.get(f.key)
        age_s = time.monotonic() - entry[2] if entry else 0.0
        timeout_s = DEFAULT_LIMITS.frag_timeout_s
        if entry is None or age_s > timeout_s + 1:
            assert retval == XDP_PASS and out == frame, "an unmatched fragment was not passed untouched"
            self.count("pass_fragment")
            return
        if out == frame and age_s > timeout_s - 1:   # the program's clock may read it stale
            if retval == XDP_DROP and entry[1] == "l2" and not entry[0]:
                # Or not stale yet: an unreachable DSR backend's fragment is dropped.
                self.count("drop_dsr_unreachable")
                return
            assert retval == XDP_PASS, "a fragment was neither forwarded nor passed"
            self.count("pass_fragment", "pass_ttl")
            return
        if entry[1] == "l2" and not entry[0]:
            assert retval == XDP_DROP, "a fragment of an unreachable DSR backend's datagram was not dropped"
            self.count("drop_dsr_unreachable")
            return
        if entry[1] == "l2":
            assert retval in (XDP_TX, XDP_REDIRECT), "a DSR fragment was not forwarded"
            assert out[12:] == frame[12:] and DSR_BY_MAC.get(out[:6]) == entry[0], (
                "a DSR fragment did not follow its first fragment at L2, unchanged")
            self.rewritten += 1
            self.fragments_followed += 1
            self.count({XDP_TX: "tx", XDP_REDIRECT: "redirect"}[retval])
            return
        if f.ttl <= 1:
            assert retval == XDP_PASS and out == frame, "a fragment with TTL <= 1 was not passed untouched"
            self.count("pass_ttl")
            return
        new_addr, rewrite_dst, _when = entry
        assert len(out) == len(frame), "a fragment's rewrite changed its length"
        addr_at = 30 if rewrite_dst else 26
        allowed = {*range(12), 22, 24, 25, *range(addr_at, addr_at + 4)}
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} of a fragment changed"
        assert _addr(out[addr_at:addr_at + 4]) == new_addr, (
            f"a fragment went to {_addr(out[addr_at:addr_at + 4])}, its first to {new_addr}")
        forwarded = retval in (XDP_TX, XDP_REDIRECT)
        assert retval != XDP_DROP, "a fragment was dropped"
        assert out[22] == frame[22] - (1 if forwarded else 0), "TTL not lowered by exactly 1"
        if forwarded:
            assert out[6:12] in ARM_MACS, "forwarded with a source MAC not of an arm"
        else:
            assert out[:12] == frame[:12], "passed to the kernel with MACs rewritten"
        assert ip_residual(out, f) == ip_residual(frame, f), "IP header checksum went wrong"
        self.rewritten += 1
        self.fragments_followed += 1
        self.count({XDP_TX: "tx", XDP_REDIRECT: "redirect", XDP_PASS: "pass_no_route"}[retval])

    def _check_rewrite(self, frame: bytes, out: bytes, p: Parsed, retval: int, dst: bool) -> Endpoint:
        """A whole rewrite: one address and port, checksums, TTL and MACs; nothing else."""
        assert len(out) == len(frame), "a rewrite changed the frame's length"
        addr_at, port_at = (30, p.l4 + 2) if dst else (26, p.l4)
        allowed = {*range(12), 22, 24, 25, *range(addr_at, addr_at + 4), port_at, port_at + 1,
                   p.check_at, p.check_at + 1}
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} changed outside the rewrite"
        forwarded = retval in (XDP_TX, XDP_REDIRECT)
        assert out[22] == frame[22] - (1 if forwarded else 0), "TTL not lowered by exactly 1"
        if forwarded:
            assert out[6:12] in ARM_MACS, "forwarded with a source MAC not of an arm"
        else:
            assert out[:12] == frame[:12], "passed to the kernel with MACs rewritten"
        # Incremental updates keep each checksum exactly as right (or wrong) as it came in.
        assert ip_residual(out, p) == ip_residual(frame, p), "IP header checksum went wrong"
        (check_in,) = struct.unpack_from("!H", frame, p.check_at)
        (check_out,) = struct.unpack_from("!H", out, p.check_at)
        if p.proto == UDP and check_in == 0:
            assert check_out == 0, "a UDP datagram without checksum got one"
        else:
            assert l4_residual(out, p) == l4_residual(frame, p), "L4 checksum went wrong"
            assert p.proto == TCP or check_out != 0, "UDP checksum 0 sent for a computed 0"
        new = read_frame(out)
        assert isinstance(new, Parsed)
        return Endpoint(new.dst, new.dport, p.proto_name) if dst else \
            Endpoint(new.src, new.sport, p.proto_name)

    def check_counts(self, counted: Counter[str]) -> None:
        """Each outcome counted at least the frames that must count there, at most those plus
        the frames that may; and every frame counted once."""
        assert sum(counted.values()) == sum(self.expected.values()), (
            f"{sum(counted.values())} counted for {sum(self.expected.values())} frames")
        for outcome in set(counted) | {o for group in self.expected for o in group}:
            least = sum(n for group, n in self.expected.items() if group == {outcome})
            most = sum(n for group, n in self.expected.items() if outcome in group)
            assert least <= counted[outcome] <= most, (
                f"{outcome}: counted {counted[outcome]}, expected {least}-{most}")

    def must(self, outcome: str) -> int:
        return self.expected[Outcomes((outcome,))]


def _counts(maps: LbMaps) -> tuple[Counter[str], int]:
    counters = maps.global_counters()
    return (Counter({name: c["packets"] for name, c in counters.items() if c["packets"]}),
            sum(c["bytes"] for c in counters.values()))


def test_random_and_mutated_frames_never_abort_and_never_half_rewrite(
        fresh: None, lb_program: LoadedProgram, routed_netns: Any, lb_maps: LbMaps) -> None:
    rng = random.Random(FUZZ_SEED)
    source = FrameSource(rng)
    judge = Judge(source)
    ifindex = routed_netns.ifindex
    started = time.monotonic()
    sent_bytes = 0
    with inside(routed_netns.name):
        for n, sample in zip(range(FUZZ_FRAMES), source):
            result = libbpf.prog_test_run(lb_program.fd, sample.frame,
                                          ingress_ifindex=ifindex[sample.ingress])
            sent_bytes += len(sample.frame)
            try:
                judge.judge(sample.frame, result.retval, result.data_out)
            except AssertionError as exc:
                pytest.fail(f"frame {n} of seed {FUZZ_SEED}: {exc}\n"
                            f"  ingress {sample.ingress}, XDP action {result.retval}\n"
                            f"  in  {sample.frame.hex()}\n  out {result.data_out.hex()}\n"
                            f"  replay: LBCTL_FUZZ_SEED={FUZZ_SEED} LBCTL_FUZZ_FRAMES={n + 1} "
                            f"pytest tests/bpf/test_fuzz.py", pytrace=False)
    elapsed_s = time.monotonic() - started

    counted, counted_bytes = _counts(lb_maps)
    # Shown with the failure (or with -s): what the run covered, for the record.
    print(f"seed {FUZZ_SEED}: {FUZZ_FRAMES} frames in {elapsed_s:.1f} s, "
          f"{judge.rewritten} rewritten ({judge.fragments_followed} later fragments); counted {dict(sorted(counted.items()))}")
    judge.check_counts(counted)
    assert counted_bytes == sent_bytes
    # The run must have reached the interesting places, or it proves little.
    for outcome in ("pass_malformed", "pass_fragment", "pass_not_ipv4", "pass_not_vip",
                    "pass_ttl", "redirect", "tx", "pass_no_route", "drop_no_backend"):
        assert judge.must(outcome) > FUZZ_FRAMES // 1000, f"too few {outcome}: {dict(counted)}"
    assert judge.rewritten > FUZZ_FRAMES // 10
    assert judge.fragments_followed > FUZZ_FRAMES // 1000, "too few fragments followed their first"
    assert judge.sticky_checked > FUZZ_FRAMES // 100, "too few frames to the client-affinity VIP"
    assert judge.dsr_forwarded > FUZZ_FRAMES // 100, "too few frames forwarded to DSR backends"
    assert judge.must("drop_dsr_unreachable") > FUZZ_FRAMES // 1000, "too few unreachable DSR frames"
    assert len(set(judge.sticky.values())) == len(STICKY_BACKENDS), "clients did not spread"


# --- headers that lie, one by one ---

LIAR_PORT = 40000


def _lies(backend: Endpoint) -> Iterator[tuple[str, bytes, str]]:
    """(what, frame, ingress): every IHL, IPv4 total lengths around each boundary, every TCP data
    offset and UDP lengths around each boundary, on a VIP SYN, a VIP datagram and an ACK from
    `backend` to the client of a tracked flow."""
    client = CLIENTS[0]
    syn = build(mac_of(client), CLIENT_ARM_MAC, client, TCP_VIP.addr, TCP, LIAR_PORT + 1,
                TCP_VIP.port)
    query = build(mac_of(client), CLIENT_ARM_MAC, client, UDP_VIP.addr, UDP, LIAR_PORT,
                  UDP_VIP.port, payload=b"query")
    reply = build(mac_of(backend.addr), BACKEND_ARM_MAC, backend.addr, client, TCP,
                  backend.port, LIAR_PORT, tcp_flags=0x10)
    for name, frame, ingress in (("VIP SYN", syn, CLIENT_ARM), ("VIP datagram", query, CLIENT_ARM),
                                 ("reply", reply, BACKEND_ARM)):
        ip_len = len(frame) - ETH_LEN
        for ihl in range(16):
            lie = bytearray(frame)
            lie[14] = 0x40 | ihl
            yield f"{name} with IHL {ihl}", bytes(lie), ingress
        for tot_len in (0, 1, 19, 20, 21, 39, ip_len - 1, ip_len + 1, ip_len + 100, 0xFFFF):
            lie = bytearray(frame)
            struct.pack_into("!H", lie, 16, tot_len)
            yield f"{name} with total length {tot_len}", bytes(lie), ingress
        if frame[23] == TCP:
            lie = bytearray(frame)
            lie[14], lie[42] = 0x44, 0x50  # read 4 bytes early, the ack's top byte is offset 5
            yield f"{name} with IHL 4 and a TCP header that looks valid 4 bytes early", \
                bytes(lie), ingress
            for words in range(16):
                lie = bytearray(frame)
                lie[46] = (words << 4) | (lie[46] & 0x0F)
                yield f"{name} with TCP data offset {words}", bytes(lie), ingress
        else:
            for udp_len in (0, 1, 7, 8, ip_len - 20 - 1, ip_len - 20 + 1, 0xFFFF):
                lie = bytearray(frame)
                struct.pack_into("!H", lie, 38, udp_len)
                yield f"{name} with UDP length {udp_len}", bytes(lie), ingress


def test_headers_that_lie_are_passed_untouched_counted_and_never_tracked(
        fresh: None, lb_program: LoadedProgram, routed_netns: Any, lb_maps: LbMaps,
        controller: Controller) -> None:
    client = CLIENTS[0]
    judge = Judge(FrameSource(random.Random(0)))
    ifindex = routed_netns.ifindex
    with inside(routed_netns.name):
        # A real flow first, so the replies that lie belong to a tracked one.
        syn = build(mac_of(client), CLIENT_ARM_MAC, client, TCP_VIP.addr, TCP, LIAR_PORT,
                    TCP_VIP.port)
        result = libbpf.prog_test_run(lb_program.fd, syn, ingress_ifindex=ifindex[CLIENT_ARM])
        judge.judge(syn, result.retval, result.data_out)
        (backend,) = {b for b in TCP_BACKENDS if (b.addr, client, b.port, LIAR_PORT, TCP)
                      in judge.tracked}
        malformed = 0
        for what, frame, ingress in _lies(backend):
            if read_frame(frame) != "pass_malformed":
                continue  # the frame's own value, or a lie the policy accepts (padding)
            malformed += 1
            result = libbpf.prog_test_run(lb_program.fd, frame, ingress_ifindex=ifindex[ingress])
            try:
                judge.judge(frame, result.retval, result.data_out)
            except AssertionError as exc:
                pytest.fail(f"{what}: {exc}\n  in  {frame.hex()}\n  out "
                            f"{result.data_out.hex()}", pytrace=False)
    assert malformed > 60, "the lies did not reach the malformed checks"
    assert _counts(lb_maps)[0] == Counter({"pass_malformed": malformed, "redirect": 1})
    # Only the real SYN's flow, still half-open: no lying ACK moved it to established.
    assert [(f["client_port"], f["backend"], f["state"]) for f in controller.flows()] == [
        (LIAR_PORT, backend.addr, "syn")]
