"""The XDP program, packet by packet: each case is a sentence, a sequence of frames (each with
its ingress interface, expected XDP action, outcome counter and exact output bytes) and the
control-plane changes between them, run through BPF_PROG_TEST_RUN in a routed namespace."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Union

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, LLC, Dot1AD, Dot1Q, Dot3, Ether
from scapy.packet import Raw

from lbctl import planner
from lbctl.bench.routed import Port, mac_of
from lbctl.control import Controller
from lbctl.errors import ConfigError
from lbctl.maglev import MaglevBackend, build_ring
from lbctl.model import Config, parse_endpoint
from xdp import codec, libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS, OUTCOMES
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps"),
    pytest.mark.usefixtures("fresh_dataplane"),
]

# --- the routed namespace: a client arm and a backend arm ---

CLIENT_ARM = "lbc"
BACKEND_ARM = "lbb"
LOOPBACK = None  # a plain test run: the namespace's loopback is the ingress

CLIENT_ARM_MAC = "02:00:0a:0a:01:01"
BACKEND_ARM_MAC = "02:00:0a:0a:02:01"
CLIENT, CLIENT_MAC = "10.10.1.100", "02:00:0a:0a:01:64"
# A client on the backends' subnet: its traffic leaves by the interface it came in on (XDP_TX).
NEAR_CLIENT, NEAR_CLIENT_MAC = "10.10.2.50", "02:00:0a:0a:02:32"

WEB = Endpoint("10.10.9.1", 80, "tcp")
WEB_BACKEND = Endpoint("10.10.2.11", 8080, "tcp")      # the port differs from the VIP's
DNS = Endpoint("10.10.9.1", 53, "udp")
DNS_BACKEND = Endpoint("10.10.2.12", 5353, "udp")
EMPTY = Endpoint("10.10.9.2", 80, "tcp")                # a VIP without backends
POOL = Endpoint("10.10.9.3", 443, "tcp")
POOL_A = Endpoint("10.10.2.13", 443, "tcp")             # active at the start of each case
POOL_B = Endpoint("10.10.2.14", 443, "tcp")             # drain at the start of each case
TRIO = Endpoint("10.10.9.6", 80, "tcp")
TRIO_BACKENDS = (Endpoint("10.10.2.21", 80, "tcp"), Endpoint("10.10.2.22", 80, "tcp"),
                 Endpoint("10.10.2.23", 80, "tcp"))
UNROUTED = Endpoint("10.10.9.4", 80, "tcp")
UNROUTED_BACKEND = Endpoint("192.0.2.77", 80, "tcp")    # TEST-NET-1: no route in the namespace
UNRESOLVED = Endpoint("10.10.9.5", 80, "tcp")
UNRESOLVED_BACKEND = Endpoint("10.10.2.99", 80, "tcp")  # on the subnet, but no neighbour entry
QUIC = Endpoint("10.10.9.7", 443, "udp")
QUIC_A = Endpoint("10.10.2.15", 4433, "udp")            # active at the start of each case
QUIC_B = Endpoint("10.10.2.16", 4433, "udp")            # drain at the start of each case
JUMBO = Endpoint("10.10.9.8", 80, "tcp")
JUMBO_BACKEND = Endpoint("10.10.3.11", 80, "tcp")       # behind the 9000-byte-MTU arm
JUMBO_ARM = "lbj"
JUMBO_ARM_MAC = "02:00:0a:0a:03:01"
JUMBO_MTU = 9000
ROUTER, ROUTER_MAC = "10.10.1.254", "02:00:0a:0a:01:fe"  # a router on the client side
STICKY = Endpoint("10.10.9.9", 80, "tcp")               # --affinity client, TRIO's backends
OTHER_CLIENTS = tuple(f"10.10.1.{i}" for i in range(101, 121))
# --forwarding dsr: backends serve the VIP's own port and get the frame with new MACs only.
DSR = Endpoint("10.10.9.10", 80, "tcp")
DSR_A = Endpoint("10.10.2.31", 80, "tcp")               # active at the start of each case
DSR_B = Endpoint("10.10.2.32", 80, "tcp")               # drain at the start of each case
DSR_UDP = Endpoint("10.10.9.10", 53, "udp")
DSR_UDP_BACKEND = Endpoint("10.10.2.33", 53, "udp")
DSR_UNROUTED = Endpoint("10.10.9.11", 80, "tcp")        # its backend is UNROUTED_BACKEND
DSR_UNRESOLVED = Endpoint("10.10.9.12", 80, "tcp")      # its backend is UNRESOLVED_BACKEND
DSR_VIPS = {DSR: [DSR_A, DSR_B], DSR_UDP: [DSR_UDP_BACKEND],
            DSR_UNROUTED: [UNROUTED_BACKEND], DSR_UNRESOLVED: [UNRESOLVED_BACKEND]}



BACKEND_MACS = {b.addr: mac_of(b.addr) for b in
                (WEB_BACKEND, DNS_BACKEND, POOL_A, POOL_B, *TRIO_BACKENDS, QUIC_A, QUIC_B,
                 JUMBO_BACKEND, DSR_A, DSR_B, DSR_UDP_BACKEND)}



PORTS = (
    Port(CLIENT_ARM, CLIENT_ARM_MAC, "10.10.1.1/24",
         {CLIENT: CLIENT_MAC, **{c: mac_of(c) for c in OTHER_CLIENTS}}),
    Port(BACKEND_ARM, BACKEND_ARM_MAC, "10.10.2.1/24",
         {**{a: m for a, m in BACKEND_MACS.items() if a != JUMBO_BACKEND.addr},
          NEAR_CLIENT: NEAR_CLIENT_MAC}),
    Port(JUMBO_ARM, JUMBO_ARM_MAC, "10.10.3.1/24",
         {JUMBO_BACKEND.addr: BACKEND_MACS[JUMBO_BACKEND.addr]}, mtu=JUMBO_MTU),
)


# --- the configuration every case starts from ---

def _backend_name(backend: Endpoint) -> str:
    return f"{backend.addr}:{backend.port}"


@pytest.fixture(scope="module")
def baseline(controller: Controller, lb_maps: LbMaps) -> Config:
    """Adds the VIPs and backends through the controller; returns the configuration the maps
    then hold, which every case starts from."""
    for vip, backends in ((WEB, [WEB_BACKEND]), (DNS, [DNS_BACKEND]), (EMPTY, []),
                          (POOL, [POOL_A, POOL_B]), (TRIO, list(TRIO_BACKENDS)),
                          (UNROUTED, [UNROUTED_BACKEND]), (UNRESOLVED, [UNRESOLVED_BACKEND]),
                          (QUIC, [QUIC_A, QUIC_B]), (JUMBO, [JUMBO_BACKEND]),
                          (STICKY, list(TRIO_BACKENDS))):
        controller.vip_add(vip, affinity="client" if vip == STICKY else "flow")
        for backend in backends:
            controller.backend_add(vip, parse_endpoint(_backend_name(backend), vip.proto))
    controller.backend_set(POOL, POOL_B, weight=None, state="drain")
    controller.backend_set(QUIC, QUIC_B, weight=None, state="drain")
    for vip, backends in DSR_VIPS.items():
        controller.vip_add(vip, forwarding="dsr")
        controller.backend_add(vip, backends)
    controller.backend_set(DSR, DSR_B, weight=None, state="drain")
    return {vip: live.spec for vip, live in planner.read_live(lb_maps).items()}


# --- frames ---

def tcp_frame(src: str, dst: str, sport: int, dport: int, flags: str = "S", *,
              eth: tuple[str, str] = (CLIENT_MAC, CLIENT_ARM_MAC), ttl: int = 64,
              payload: bytes = b"", options: list[IPOption] | None = None,
              ip_flags: str = "") -> bytes:
    ip = IP(src=src, dst=dst, ttl=ttl, id=4242, options=options or [], flags=ip_flags)
    return bytes(Ether(src=eth[0], dst=eth[1]) / ip /
                 TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 1,
                     window=64240) / payload)


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes = b"query", *,
              eth: tuple[str, str] = (CLIENT_MAC, CLIENT_ARM_MAC), ttl: int = 64,
              chksum: int | None = None) -> bytes:
    return bytes(Ether(src=eth[0], dst=eth[1]) / IP(src=src, dst=dst, ttl=ttl, id=4242) /
                 UDP(sport=sport, dport=dport, chksum=chksum) / payload)


def to_vip(vip: Endpoint, sport: int = 40000, flags: str = "S", **kw: object) -> bytes:
    """A client's frame to a VIP, arriving on the client arm."""
    if vip.proto == "udp":
        return udp_frame(CLIENT, vip.addr, sport, vip.port, **kw)  # type: ignore[arg-type]
    return tcp_frame(CLIENT, vip.addr, sport, vip.port, flags, **kw)  # type: ignore[arg-type]


def from_backend(backend: Endpoint, client_port: int = 40000, flags: str = "SA",
                 client: str = CLIENT) -> bytes:
    """A backend's reply to a client, arriving on the backend arm."""
    eth = (BACKEND_MACS[backend.addr], BACKEND_ARM_MAC)
    if backend.proto == "udp":
        return udp_frame(backend.addr, client, backend.port, client_port, b"answer", eth=eth)
    return tcp_frame(backend.addr, client, backend.port, client_port, flags, eth=eth)


def rewritten(frame: bytes, *, eth: tuple[str, str] | None = None, src: Endpoint | None = None,
              dst: Endpoint | None = None, hops: int = 1) -> bytes:
    """The frame as it should leave: MACs from the FIB, address and port rewritten, TTL down by
    `hops`, every checksum computed afresh by scapy (a UDP checksum of 0 stays 0: none sent)."""
    pkt = Ether(frame)
    if eth is not None:
        pkt.src, pkt.dst = eth
    ip = pkt[IP]
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    if src is not None:
        ip.src, l4.sport = src.addr, src.port
    if dst is not None:
        ip.dst, l4.dport = dst.addr, dst.port
    ip.ttl -= hops
    del ip.chksum
    if not (UDP in pkt and pkt[UDP].chksum == 0):
        del l4.chksum
    return bytes(pkt)


def to_backend_arm(backend: Endpoint) -> tuple[str, str]:
    """(src, dst) MACs of a frame leaving the backend arm for this backend."""
    return BACKEND_ARM_MAC, BACKEND_MACS[backend.addr]


TO_CLIENT_ARM = (CLIENT_ARM_MAC, CLIENT_MAC)


def dnat(frame: bytes, backend: Endpoint) -> bytes:
    """A client's frame to a VIP, as forwarded to backend."""
    return rewritten(frame, eth=to_backend_arm(backend), dst=backend)


def snat(frame: bytes, vip: Endpoint) -> bytes:
    """A backend's reply, as forwarded to the client from the VIP."""
    return rewritten(frame, eth=TO_CLIENT_ARM, src=vip)


# --- which backend a new flow gets: lb_maglev.h's hash and the planner's ring, in Python ---

_M32 = 0xFFFFFFFF


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _wire32(addr: str) -> int:
    """A __be32 address as the program loads it (little-endian host)."""
    return int.from_bytes(socket.inet_aton(addr), "little")


def _wire16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def expected_hash(src: str, dst: str, sport: int, dport: int, proto: int, affinity: str) -> int:
    h = _mix32(_wire32(src) ^ DEFAULT_LIMITS.hash_seed)
    if affinity == "client":
        return h
    h = _mix32(h ^ _wire32(dst))
    h = _mix32(h ^ ((_wire16(sport) << 16) | _wire16(dport)))
    return _mix32(h ^ proto)


@functools.cache
def _trio_ring() -> tuple[int, ...]:
    return tuple(build_ring([MaglevBackend(_backend_name(b), 1) for b in TRIO_BACKENDS],
                            DEFAULT_LIMITS.ring_size, 0))


def picked(vip: Endpoint, src: str, sport: int, affinity: str) -> Endpoint:
    """The backend TRIO's ring (which STICKY shares) gives a new TCP flow from src:sport."""
    h = expected_hash(src, vip.addr, sport, vip.port, 6, affinity)
    return TRIO_BACKENDS[_trio_ring()[h % DEFAULT_LIMITS.ring_size]]


def set_affinity(vip: Endpoint, affinity: str) -> Do:
    return Do(f"affinity {affinity}", lambda c: c.change(
        lambda config: {**config, vip: replace(config[vip], affinity=affinity)}))


# --- the table ---

@dataclass(frozen=True)
class Send:
    """One frame through the program and what must come out. `expected` None: unchanged."""

    frame: bytes
    ingress: str | None
    action: int
    outcome: str
    expected: bytes | None = None
    counted_bytes: int | None = None   # None: the whole frame (see the jumbo cases)

    @property
    def bytes_counted(self) -> int:
        return len(self.frame) if self.counted_bytes is None else self.counted_bytes


@dataclass(frozen=True)
class Do:
    """A control-plane change between frames."""

    what: str
    change: Callable[[Controller], object]


Step = Union[Send, Do]


@dataclass(frozen=True)
class Case:
    description: str
    steps: tuple[Step, ...] = field(default_factory=tuple)
    # Frames the kernel's test run refuses to build a socket buffer from (shorter than the
    # headers of their EtherType, or longer than a page): run through the XDP build only. The
    # tc build parses with the same code; on a real interface it sees such frames too.
    xdp_only: bool = False


def set_states(vip: Endpoint, **states: str) -> Do:
    """Sets POOL_A's and POOL_B's states (keywords a and b)."""
    backends = {"a": POOL_A, "b": POOL_B}

    def change(controller: Controller) -> None:
        # One at a time, bringing a backend in before another leaves, so the VIP never goes empty.
        for key in sorted(states, key=lambda k: states[k] != "active"):
            controller.backend_set(vip, backends[key], weight=None, state=states[key])
    return Do(f"set {states}", change)


def passes(frame: bytes, outcome: str, ingress: str | None = CLIENT_ARM) -> Send:
    return Send(frame, ingress, XDP_PASS, outcome)


SYN_TO_WEB = to_vip(WEB)
ACK_TO_WEB = to_vip(WEB, flags="A")
SYN_TO_POOL = to_vip(POOL, sport=41000)
SYN_FROM_NEAR_CLIENT = tcp_frame(NEAR_CLIENT, WEB.addr, 40000, WEB.port,
                                 eth=(NEAR_CLIENT_MAC, BACKEND_ARM_MAC))
SYN_WITH_TCP_OPTIONS = bytes(
    Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) / IP(src=CLIENT, dst=WEB.addr, id=4242) /
    TCP(sport=40000, dport=WEB.port, flags="S", seq=1000,
        options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7), ("NOP", None)]))
OPTIONS_4 = [IPOption(b"\x94\x04\x00\x00")]  # router alert: IHL 6
OPTIONS_40 = [IPOption(b"\x94\x04\x00\x00"), IPOption(b"\x01" * 35 + b"\x00")]  # IHL 15, the most
DNS_QUERY = to_vip(DNS, sport=33000)
DNS_QUERY_NO_CHECKSUM = udp_frame(CLIENT, DNS.addr, 33001, DNS.port, chksum=0)


def _udp_query_whose_rewrite_sums_to_zero() -> bytes:
    """A query whose checksum after DNAT to DNS_BACKEND computes to 0, which UDP must send as
    0xffff (0 means "no checksum"). Found by adding the rewritten checksum into a payload word:
    the one's-complement sum then becomes 0xffff, whose complement is 0."""
    probe = udp_frame(CLIENT, DNS.addr, 33002, DNS.port, b"\x00\x00zero")
    checksum = Ether(dnat(probe, DNS_BACKEND))[UDP].chksum
    query = udp_frame(CLIENT, DNS.addr, 33002, DNS.port, checksum.to_bytes(2, "big") + b"zero")
    assert Ether(dnat(query, DNS_BACKEND))[UDP].chksum == 0xFFFF
    return query


DNS_QUERY_SUMMING_TO_ZERO = _udp_query_whose_rewrite_sums_to_zero()


def _truncations(frame: bytes, lengths: range, ingress: str = CLIENT_ARM) -> tuple[Send, ...]:
    return tuple(passes(frame[:n], "pass_malformed", ingress) for n in lengths)


def _with_ip_total_length(frame: bytes, tot_len: int) -> bytes:
    """The frame with the IPv4 total length replaced and the header checksum redone."""
    pkt = Ether(frame)
    pkt[IP].len = tot_len
    del pkt[IP].chksum
    raw = bytes(pkt)
    return raw if len(raw) >= len(frame) else raw + frame[len(raw):]


def _with_udp_length(frame: bytes, udp_len: int) -> bytes:
    pkt = Ether(frame)
    pkt[UDP].len = udp_len
    del pkt[UDP].chksum
    return bytes(pkt)


def _raw_ip(version_ihl: int) -> bytes:
    """A VIP SYN whose first IP byte is version_ihl (the checksum is irrelevant: never read)."""
    frame = bytearray(SYN_TO_WEB)
    frame[14] = version_ihl
    return bytes(frame)


def set_state(vip: Endpoint, backend: Endpoint, state: str) -> Do:
    return Do(f"set {backend} {state}",
              lambda c: c.backend_set(vip, backend, weight=None, state=state))


def _with_tcp_data_offset(frame: bytes, words: int) -> bytes:
    """A TCP frame (no IP options) whose data offset says `words` 32-bit words; the checksum
    is left as it was: the program must reject the frame before it could matter."""
    out = bytearray(frame)
    out[14 + 20 + 12] = (words << 4) | (out[14 + 20 + 12] & 0x0F)
    return bytes(out)


def _reply(backend: Endpoint, flags: str, client_port: int = 40000, client: str = CLIENT,
           **kw: Any) -> bytes:
    """A backend's TCP segment to a client, arriving on the backend arm (tcp_frame keywords:
    ttl, options)."""
    return tcp_frame(backend.addr, client, backend.port, client_port, flags,
                     eth=(BACKEND_MACS[backend.addr], BACKEND_ARM_MAC), **kw)


def _to_jumbo_arm(frame: bytes) -> bytes:
    return rewritten(frame, eth=(JUMBO_ARM_MAC, BACKEND_MACS[JUMBO_BACKEND.addr]),
                     dst=JUMBO_BACKEND)


def _client_ip(dst: str, payload: object, *, eth_dst: str = CLIENT_ARM_MAC, **ip: Any) -> bytes:
    """A frame from the client with any IP payload and IP header fields."""
    return bytes(Ether(src=CLIENT_MAC, dst=eth_dst) / IP(src=CLIENT, dst=dst, **ip) / payload)


def _ihl_4_with_plausible_tcp() -> bytes:
    """IHL 4 puts the TCP header 4 bytes early: its data offset is then the high nibble of the
    real header's ack field, here 5, so only the IHL check can tell this frame is a lie."""
    frame = bytearray(bytes(Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) /
                            IP(src=CLIENT, dst=WEB.addr, id=4242) /
                            TCP(sport=40000, dport=WEB.port, flags="A", ack=0x50000000)))
    frame[14] = 0x44
    return bytes(frame)


IHL_4_WITH_PLAUSIBLE_TCP = _ihl_4_with_plausible_tcp()

# The largest frame a single-buffer XDP program sees whole in a test run is a page less the
# head- and tailroom: 3520 bytes on x86-64. The rest of a longer frame is in fragments.
JUMBO_LINEAR_BYTES = 3520
JUMBO_3K = to_vip(JUMBO, flags="PA", payload=bytes(3400))           # 3454 bytes: seen whole
JUMBO_9K = to_vip(JUMBO, flags="PA", payload=bytes(9000 - 40))      # 9014 bytes: it is not
# A router on the client side says a VIP reply was too big for its next link (PMTU discovery).
FRAG_NEEDED_FOR_VIP_REPLY = bytes(
    Ether(src=ROUTER_MAC, dst=CLIENT_ARM_MAC) / IP(src=ROUTER, dst=WEB.addr) /
    ICMP(type=3, code=4, nexthopmtu=1400) /
    IP(src=WEB.addr, dst=CLIENT, ttl=3) / TCP(sport=WEB.port, dport=40000, flags="A"))
PORT_UNREACHABLE_FROM_BACKEND = bytes(
    Ether(src=BACKEND_MACS[DNS_BACKEND.addr], dst=BACKEND_ARM_MAC) /
    IP(src=DNS_BACKEND.addr, dst=CLIENT) / ICMP(type=3, code=3) /
    IP(src=CLIENT, dst=DNS_BACKEND.addr) / UDP(sport=33000, dport=DNS_BACKEND.port) / b"query")
# What each becomes: the quote names the other side of the balancer, checksums all fresh.
FRAG_NEEDED_TO_BACKEND = bytes(
    Ether(src=BACKEND_ARM_MAC, dst=BACKEND_MACS[WEB_BACKEND.addr]) /
    IP(src=ROUTER, dst=WEB_BACKEND.addr, ttl=63) / ICMP(type=3, code=4, nexthopmtu=1400) /
    IP(src=WEB_BACKEND.addr, dst=CLIENT, ttl=3) /
    TCP(sport=WEB_BACKEND.port, dport=40000, flags="A"))
PORT_UNREACHABLE_FROM_VIP = bytes(
    Ether(src=CLIENT_ARM_MAC, dst=CLIENT_MAC) /
    IP(src=DNS.addr, dst=CLIENT, ttl=63) / ICMP(type=3, code=3) /
    IP(src=CLIENT, dst=DNS.addr) / UDP(sport=33000, dport=DNS.port) / b"query")
# A router near the backends reports a forwarded packet expired: its own address stays.
TIME_EXCEEDED_FROM_ROUTER = bytes(
    Ether(src=BACKEND_MACS[DNS_BACKEND.addr], dst=BACKEND_ARM_MAC) /
    IP(src="10.10.2.250", dst=CLIENT) / ICMP(type=11, code=0) /
    IP(src=CLIENT, dst=DNS_BACKEND.addr, ttl=1) / UDP(sport=33000, dport=DNS_BACKEND.port) /
    b"query")
TIME_EXCEEDED_TO_CLIENT = bytes(
    Ether(src=CLIENT_ARM_MAC, dst=CLIENT_MAC) /
    IP(src="10.10.2.250", dst=CLIENT, ttl=63) / ICMP(type=11, code=0) /
    IP(src=CLIENT, dst=DNS.addr, ttl=1) / UDP(sport=33000, dport=DNS.port) / b"query")


# --- fragmented datagrams: built whole, then cut by scapy as a 1500-byte-MTU link would ---

DATAGRAM_ID = 7777


def datagram(src: str, dst: str, sport: int, dport: int, proto: str, payload: bytes, *,
             eth: tuple[str, str] = (CLIENT_MAC, CLIENT_ARM_MAC), ip_id: int = DATAGRAM_ID,
             ttl: int = 64) -> bytes:
    """One whole (unfragmented) frame, however long; `split` cuts it."""
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else \
        TCP(sport=sport, dport=dport, flags="PA", seq=1000, ack=1, window=64240)
    return bytes(Ether(src=eth[0], dst=eth[1]) / IP(src=src, dst=dst, ttl=ttl, id=ip_id) / l4 /
                 payload)


def split(frame: bytes) -> list[bytes]:
    """The frame's datagram as IPv4 fragments of up to 1480 payload bytes, each behind the
    frame's Ethernet header: the first carries the L4 header, checksummed over the whole."""
    pkt = Ether(frame)
    return [bytes(Ether(src=pkt.src, dst=pkt.dst) / piece)
            for piece in fragment(pkt[IP], fragsize=1480)]


def with_ttl(frame: bytes, ttl: int) -> bytes:
    pkt = Ether(frame)
    pkt[IP].ttl = ttl
    del pkt[IP].chksum
    return bytes(pkt)


BIG_QUERY = datagram(CLIENT, DNS.addr, 33000, DNS.port, "udp", bytes(range(256)) * 12)
BIG_QUERY_IN = split(BIG_QUERY)                                   # 1500 + 1500 + 106 bytes
BIG_QUERY_OUT = split(dnat(BIG_QUERY, DNS_BACKEND))
BIG_ANSWER = datagram(DNS_BACKEND.addr, CLIENT, DNS_BACKEND.port, 33000, "udp", b"a" * 4000,
                      eth=(BACKEND_MACS[DNS_BACKEND.addr], BACKEND_ARM_MAC))
BIG_ANSWER_IN = split(BIG_ANSWER)
BIG_ANSWER_OUT = split(snat(BIG_ANSWER, DNS))
BIG_SEGMENT = datagram(CLIENT, WEB.addr, 40000, WEB.port, "tcp", b"t" * 2000)
BIG_SEGMENT_IN = split(BIG_SEGMENT)
BIG_SEGMENT_OUT = split(dnat(BIG_SEGMENT, WEB_BACKEND))
assert len(BIG_QUERY_IN) == 3 and len(BIG_ANSWER_IN) == 3 and len(BIG_SEGMENT_IN) == 2


def forwarded(frames: list[bytes], expected: list[bytes], ingress: str = CLIENT_ARM) -> tuple[Send, ...]:
    return tuple(Send(f, ingress, XDP_REDIRECT, "redirect", e) for f, e in zip(frames, expected))


def from_client(client: str, vip: Endpoint, sport: int, flags: str = "S") -> bytes:
    """A TCP frame to a VIP from one of the client arm's other clients."""
    return tcp_frame(client, vip.addr, sport, vip.port, flags, eth=(mac_of(client), CLIENT_ARM_MAC))


def _sticky_cases() -> list[Case]:
    mine = picked(STICKY, CLIENT, 0, "client")
    other = next(c for c in OTHER_CLIENTS if picked(STICKY, c, 0, "client") != mine)
    theirs = picked(STICKY, other, 0, "client")
    # A port whose 5-tuple hash picks another backend than the client's address does.
    moved = next(p for p in range(41000, 42000) if picked(STICKY, CLIENT, p, "flow") != mine)
    spread = next(p for p in range(41000, 42000)
                  if picked(TRIO, CLIENT, p, "flow") != picked(TRIO, CLIENT, 40000, "flow"))
    return [
        Case("client affinity: a client's connections from any port go to the backend of its address", tuple(
            Send(to_vip(STICKY, sport), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(STICKY, sport), mine)) for sport in (40000, 40001, 51234, 65535))),
        Case("client affinity: another client gets the backend of its own address", (
            Send(to_vip(STICKY), CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(to_vip(STICKY), mine)),
            Send(from_client(other, STICKY, 40000), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(from_client(other, STICKY, 40000), theirs)),
            Send(from_client(other, STICKY, 50000), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(from_client(other, STICKY, 50000), theirs)),
        )),
        Case("client affinity: the backend's reply is reverse-NATed from the VIP", (
            Send(to_vip(STICKY), CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(to_vip(STICKY), mine)),
            Send(from_backend(mine), BACKEND_ARM, XDP_REDIRECT, "redirect",
                 snat(from_backend(mine), STICKY)),
        )),
        Case("flow affinity (the default) picks by the 5-tuple: one client's ports spread", (
            Send(to_vip(TRIO), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(TRIO), picked(TRIO, CLIENT, 40000, "flow"))),
            Send(to_vip(TRIO, spread), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(TRIO, spread), picked(TRIO, CLIENT, spread, "flow"))),
        )),
        Case("an affinity change picks new flows its way; a tracked flow keeps its backend", (
            Send(to_vip(STICKY, moved), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(STICKY, moved), mine)),
            set_affinity(STICKY, "flow"),
            Send(to_vip(STICKY, moved, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(STICKY, moved, "A"), mine)),
            Send(to_vip(STICKY, moved + 1000), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(STICKY, moved + 1000), picked(STICKY, CLIENT, moved + 1000, "flow"))),
            set_affinity(STICKY, "client"),
            Send(to_vip(STICKY, moved + 2000), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(STICKY, moved + 2000), mine)),
        )),
        Case("a client-affinity VIP's ports and protocol still count: another port is not a VIP", (
            passes(tcp_frame(CLIENT, STICKY.addr, 40000, 81), "pass_not_vip"),
            passes(udp_frame(CLIENT, STICKY.addr, 40000, STICKY.port), "pass_not_vip"),
        )),
    ]


CASES: list[Case] = [
    Case("VIP TCP SYN is rewritten to a backend", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
    )),
    Case("the same flow again goes to the same backend", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        Send(ACK_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ACK_TO_WEB, WEB_BACKEND)),
    )),
    Case("VIP TCP with payload is rewritten with its checksum over the payload", (
        Send(to_vip(WEB, flags="PA", payload=b"GET / HTTP/1.0\r\n\r\n"), CLIENT_ARM, XDP_REDIRECT,
             "redirect", dnat(to_vip(WEB, flags="PA", payload=b"GET / HTTP/1.0\r\n\r\n"),
                              WEB_BACKEND)),
    )),
    Case("a reply from the backend is rewritten to come from VIP:port", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        Send(from_backend(WEB_BACKEND), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(WEB_BACKEND), WEB)),
    )),
    Case("a backend's packet with no tracked flow passes unchanged", (
        passes(from_backend(WEB_BACKEND), "pass_not_vip", BACKEND_ARM),
    )),
    Case("a flow whose backend is out of its ingress interface is sent back out of it (XDP_TX)", (
        Send(SYN_FROM_NEAR_CLIENT, BACKEND_ARM, XDP_TX, "tx",
             dnat(SYN_FROM_NEAR_CLIENT, WEB_BACKEND)),
    )),
    Case("UDP to a VIP is rewritten to a backend and the reply comes from the VIP", (
        Send(DNS_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DNS_QUERY, DNS_BACKEND)),
        Send(from_backend(DNS_BACKEND, 33000), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(DNS_BACKEND, 33000), DNS)),
    )),
    Case("UDP without a checksum (0) is rewritten and keeps checksum 0", (
        Send(DNS_QUERY_NO_CHECKSUM, CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(DNS_QUERY_NO_CHECKSUM, DNS_BACKEND)),
    )),
    Case("UDP whose rewritten checksum computes to 0 is sent as 0xffff", (
        Send(DNS_QUERY_SUMMING_TO_ZERO, CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(DNS_QUERY_SUMMING_TO_ZERO, DNS_BACKEND)),
    )),
    Case("TCP to the VIP address on another port is not a VIP and passes unchanged", (
        passes(tcp_frame(CLIENT, WEB.addr, 40000, 81), "pass_not_vip"),
    )),
    Case("UDP to a TCP VIP's port is not a VIP and passes unchanged", (
        passes(udp_frame(CLIENT, WEB.addr, 40000, WEB.port), "pass_not_vip"),
    )),
    Case("non-VIP TCP passes unchanged", (
        passes(tcp_frame(CLIENT, "10.10.1.1", 40000, 22), "pass_not_vip"),
    )),
    Case("ICMP to a VIP address passes unchanged", (
        passes(bytes(Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) / IP(src=CLIENT, dst=WEB.addr)
                     / ICMP()), "pass_not_vip"),
    )),
    Case("ARP passes unchanged", (
        passes(bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") /
                     ARP(hwsrc=CLIENT_MAC, psrc=CLIENT, pdst=WEB.addr)), "pass_not_ipv4"),
    )),
    Case("IPv6 TCP to no VIP passes unchanged", (
        passes(bytes(Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) /
                     IPv6(src="fd00::100", dst="fd00::1") / TCP(sport=40000, dport=80)),
               "pass_not_vip"),
    )),
    Case("VLAN-tagged IPv4 to a VIP passes unchanged", (
        passes(bytes(Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) / Dot1Q(vlan=7) /
                     IP(src=CLIENT, dst=WEB.addr) / TCP(sport=40000, dport=80)), "pass_not_ipv4"),
    )),
    Case("a bare Ethernet header with the IPv4 type passes unchanged",
         _truncations(SYN_TO_WEB, range(14, 15)), xdp_only=True),
    Case("a VIP SYN truncated anywhere inside the IP header passes unchanged",
         _truncations(SYN_TO_WEB, range(15, 34)), xdp_only=True),
    Case("a VIP SYN truncated anywhere inside the TCP header passes unchanged",
         _truncations(SYN_TO_WEB, range(34, 54))),
    Case("a VIP SYN with options truncated inside its options passes unchanged",
         _truncations(to_vip(WEB, options=OPTIONS_40), range(34, 74))),
    Case("a VIP UDP query truncated inside the UDP header or payload passes unchanged",
         _truncations(DNS_QUERY, range(34, len(DNS_QUERY)))),
    Case("IPv4 whose total length is shorter than its header passes unchanged", (
        passes(_with_ip_total_length(SYN_TO_WEB, 19), "pass_malformed"),
    )),
    Case("TCP whose header runs past the IP total length passes unchanged", (
        # 20 bytes of TCP inside the frame, but the IP length leaves room for 10 only.
        passes(_with_ip_total_length(SYN_TO_WEB, 30), "pass_malformed"),
    )),
    Case("UDP whose length is below its header passes unchanged", (
        passes(_with_udp_length(DNS_QUERY, 7), "pass_malformed"),
    )),
    Case("UDP whose length runs past the IP total length passes unchanged", (
        passes(_with_udp_length(DNS_QUERY, len(DNS_QUERY) - 14 - 20 + 1), "pass_malformed"),
    )),
    Case("IPv4 with IHL below 5 passes unchanged", (
        passes(_raw_ip(0x44), "pass_malformed"),
    )),
    Case("an IPv6 version nibble in an IPv4 frame passes unchanged", (
        passes(_raw_ip(0x65), "pass_malformed"),
    )),
    Case("a fragmented UDP datagram to a VIP is DNATed: its later fragments follow the first", (
        *forwarded(BIG_QUERY_IN, BIG_QUERY_OUT),
    )),
    Case("a fragmented TCP segment to a VIP is DNATed, first fragment and the rest", (
        *forwarded(BIG_SEGMENT_IN, BIG_SEGMENT_OUT),
    )),
    Case("a later fragment whose first fragment was not seen passes unchanged", (
        passes(BIG_QUERY_IN[1], "pass_fragment"),
        passes(bytes(Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) /
                     IP(src=CLIENT, dst=WEB.addr, frag=185, proto=6) / Raw(b"x" * 20)),
               "pass_fragment"),
    )),
    Case("fragments arriving before their first pass unchanged; those after it are DNATed", (
        passes(BIG_QUERY_IN[2], "pass_fragment"),
        *forwarded(BIG_QUERY_IN[:2], BIG_QUERY_OUT[:2]),
    )),
    Case("a later fragment of another datagram (another IP id) does not follow a first", (
        Send(BIG_QUERY_IN[0], CLIENT_ARM, XDP_REDIRECT, "redirect", BIG_QUERY_OUT[0]),
        passes(split(datagram(CLIENT, DNS.addr, 33000, DNS.port, "udp", bytes(range(256)) * 12,
                              ip_id=DATAGRAM_ID + 1))[1], "pass_fragment"),
    )),
    Case("a later fragment with TTL 1 passes unchanged for the kernel's ICMP error", (
        Send(BIG_QUERY_IN[0], CLIENT_ARM, XDP_REDIRECT, "redirect", BIG_QUERY_OUT[0]),
        passes(with_ttl(BIG_QUERY_IN[1], 1), "pass_ttl"),
    )),
    Case("a first fragment with TTL 1 passes unchanged, and its later fragments after it", (
        passes(with_ttl(BIG_QUERY_IN[0], 1), "pass_ttl"),
        passes(BIG_QUERY_IN[1], "pass_fragment"),
    )),
    Case("a first fragment to a VIP without backends is dropped; its later fragments pass", (
        Send(split(datagram(CLIENT, EMPTY.addr, 40000, EMPTY.port, "tcp", bytes(2000)))[0],
             CLIENT_ARM, XDP_DROP, "drop_no_backend", b""),
        passes(split(datagram(CLIENT, EMPTY.addr, 40000, EMPTY.port, "tcp", bytes(2000)))[1],
               "pass_fragment"),
    )),
    Case("VIP with no backends is dropped", (
        Send(to_vip(EMPTY), CLIENT_ARM, XDP_DROP, "drop_no_backend", b""),
    )),
    Case("TTL 1 to the VIP passes unchanged for the kernel's ICMP error", (
        passes(to_vip(WEB, ttl=1), "pass_ttl"),
    )),
    Case("TTL 0 to the VIP passes unchanged", (
        passes(to_vip(WEB, ttl=0), "pass_ttl"),
    )),
    Case("TTL 2 to the VIP is rewritten and leaves with TTL 1", (
        Send(to_vip(WEB, ttl=2), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(WEB, ttl=2), WEB_BACKEND)),
    )),
    Case("IPv4 with a 4-byte option to a VIP is rewritten correctly", (
        Send(to_vip(WEB, options=OPTIONS_4), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(WEB, options=OPTIONS_4), WEB_BACKEND)),
    )),
    Case("IPv4 with 40 bytes of options to a VIP is rewritten correctly", (
        Send(to_vip(WEB, options=OPTIONS_40), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(WEB, options=OPTIONS_40), WEB_BACKEND)),
    )),
    Case("TCP with options to a VIP is rewritten correctly", (
        Send(SYN_WITH_TCP_OPTIONS, CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(SYN_WITH_TCP_OPTIONS, WEB_BACKEND)),
    )),
    Case("a packet too big for the backend link goes to the kernel rewritten (it may fragment)", (
        Send(to_vip(WEB, flags="PA", payload=bytes(1600)), CLIENT_ARM, XDP_PASS, "pass_no_route",
             rewritten(to_vip(WEB, flags="PA", payload=bytes(1600)), dst=WEB_BACKEND, hops=0)),
    )),
    Case("Ethernet padding after a short VIP packet is kept as it was", (
        Send(SYN_TO_WEB + bytes(6), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(SYN_TO_WEB + bytes(6), WEB_BACKEND)),
    )),
    Case("a FIN then a new SYN on the same tuple re-picks the backend", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_A)),
        Send(to_vip(POOL, 41000, "FA"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "FA"), POOL_A)),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_B)),
    )),
    Case("a retransmitted SYN stays with its backend after the ring changes", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
    )),
    Case("a backend set to drain keeps its flows but takes no new ones", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_A)),
        Send(to_vip(POOL, 41001), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41001), POOL_B)),
    )),
    Case("a backend set to down loses its flows to a live backend", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="down", b="active"),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_B)),
    )),
    Case("after backend_del no new flow picks the deleted backend; its flows finish", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, b="active"),
        Do("delete backend a", lambda c: c.backend_del(POOL, POOL_A)),
        Send(to_vip(POOL, 41001), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41001), POOL_B)),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_A)),
    )),
    Case("after vip_del the VIP's tracked flow and its backend's replies pass unchanged", (
        # Tracked flows are looked up before the VIP: deleting the VIP must end them too.
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        Send(from_backend(WEB_BACKEND), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(WEB_BACKEND), WEB)),
        Do("delete the VIP", lambda c: c.vip_del(WEB)),
        passes(ACK_TO_WEB, "pass_not_vip"),
        passes(from_backend(WEB_BACKEND, flags="A"), "pass_not_vip", BACKEND_ARM),
    )),
    Case("a backend without a resolved neighbour gets the rewritten packet via the kernel", (
        Send(to_vip(UNRESOLVED), CLIENT_ARM, XDP_PASS, "pass_no_route",
             rewritten(to_vip(UNRESOLVED), dst=UNRESOLVED_BACKEND, hops=0)),
    )),

    # --- TCP state: SYN on a tracked tuple, FIN and RST from either side ---
    Case("a SYN for an established tuple keeps its backend (only a closing flow re-picks)", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
    )),
    Case("a client's RST closes the flow and the next SYN on the tuple re-picks the backend", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(to_vip(POOL, 41000, "R"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "R"), POOL_A)),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_B)),
    )),
    Case("a backend's RST closes the flow for the client too: its next SYN re-picks", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(from_backend(POOL_A, 41000, "R"), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(POOL_A, 41000, "R"), POOL)),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_B)),
    )),
    Case("a backend's FIN closes the flow for the client too: its next SYN re-picks", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(from_backend(POOL_A, 41000, "FA"), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(POOL_A, 41000, "FA"), POOL)),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_B)),
    )),
    Case("after a FIN the last ACKs still reach the backend and its reply still comes back", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        Send(to_vip(POOL, 41000, "FA"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "FA"), POOL_A)),
        set_states(POOL, a="drain", b="active"),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_A)),
        Send(from_backend(POOL_A, 41000, "A"), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(POOL_A, 41000, "A"), POOL)),
    )),
    Case("a stray RST to a VIP with no tracked flow goes to the backend the ring picks", (
        Send(to_vip(WEB, flags="R"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(WEB, flags="R"), WEB_BACKEND)),
    )),
    # --- UDP flows ---
    Case("a second UDP datagram on a tracked tuple keeps its backend after the ring changes", (
        Send(to_vip(QUIC, 50000), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(QUIC, 50000), QUIC_A)),
        set_state(QUIC, QUIC_B, "active"),
        set_state(QUIC, QUIC_A, "drain"),
        Send(to_vip(QUIC, 50000), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(QUIC, 50000), QUIC_A)),
        Send(to_vip(QUIC, 50001), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(QUIC, 50001), QUIC_B)),
    )),
    Case("a UDP reply without a checksum (0) is reverse-NATed and keeps checksum 0", (
        Send(DNS_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DNS_QUERY, DNS_BACKEND)),
        Send(udp_frame(DNS_BACKEND.addr, CLIENT, DNS_BACKEND.port, 33000, b"answer", chksum=0,
                       eth=(BACKEND_MACS[DNS_BACKEND.addr], BACKEND_ARM_MAC)),
             BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(udp_frame(DNS_BACKEND.addr, CLIENT, DNS_BACKEND.port, 33000, b"answer",
                            chksum=0, eth=(BACKEND_MACS[DNS_BACKEND.addr], BACKEND_ARM_MAC)),
                  DNS)),
    )),
    # --- replies ---
    Case("a reply from the backend's address but another port passes unchanged", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        passes(_reply(Endpoint(WEB_BACKEND.addr, 8081, "tcp"), "SA"), "pass_not_vip",
               BACKEND_ARM),
    )),
    Case("a reply carrying IP options is reverse-NATed with both checksums right", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        Send(_reply(WEB_BACKEND, "SA", options=OPTIONS_4), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(_reply(WEB_BACKEND, "SA", options=OPTIONS_4), WEB)),
    )),
    Case("a reply with TTL 1 passes unchanged for the kernel's ICMP error", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        passes(_reply(WEB_BACKEND, "SA", ttl=1), "pass_ttl", BACKEND_ARM),
    )),
    Case("a reply to a client on the backends' side goes back out of its arm (XDP_TX)", (
        Send(SYN_FROM_NEAR_CLIENT, BACKEND_ARM, XDP_TX, "tx",
             dnat(SYN_FROM_NEAR_CLIENT, WEB_BACKEND)),
        Send(_reply(WEB_BACKEND, "SA", client=NEAR_CLIENT), BACKEND_ARM, XDP_TX, "tx",
             rewritten(_reply(WEB_BACKEND, "SA", client=NEAR_CLIENT),
                       eth=(BACKEND_ARM_MAC, NEAR_CLIENT_MAC), src=WEB)),
    )),
    # --- backend states and empty VIPs ---
    Case("a VIP whose backends all drain keeps its flows and drops new ones", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="drain"),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(POOL, 41000, "A"), POOL_A)),
        Send(to_vip(POOL, 41001), CLIENT_ARM, XDP_DROP, "drop_no_backend", b""),
    )),
    Case("a flow whose backend goes down with no other active backend is dropped", (
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
        set_states(POOL, a="down"),
        Send(to_vip(POOL, 41000, "A"), CLIENT_ARM, XDP_DROP, "drop_no_backend", b""),
    )),
    Case("TTL 1 to a VIP without backends passes for the kernel's ICMP error, not dropped", (
        passes(to_vip(EMPTY, ttl=1), "pass_ttl"),
    )),
    # --- traffic that is not for a VIP ---
    Case("non-VIP UDP passes unchanged", (
        passes(udp_frame(CLIENT, "10.10.1.1", 40000, 53), "pass_not_vip"),
    )),
    Case("UDP to a VIP address on another port passes unchanged", (
        passes(udp_frame(CLIENT, DNS.addr, 40000, 54), "pass_not_vip"),
    )),
    Case("SCTP to a VIP address passes unchanged", (
        passes(_client_ip(WEB.addr, Raw(bytes(12)), proto=132), "pass_not_vip"),
    )),
    Case("a non-VIP packet with TTL 1 passes as not-VIP traffic: only ours is TTL-checked", (
        passes(tcp_frame(CLIENT, "10.10.1.1", 40000, 22, ttl=1), "pass_not_vip"),
    )),
    # --- ICMP ---
    Case("an ICMP echo reply from a backend to a client passes unchanged", (
        passes(bytes(Ether(src=BACKEND_MACS[WEB_BACKEND.addr], dst=BACKEND_ARM_MAC) /
                     IP(src=WEB_BACKEND.addr, dst=CLIENT) / ICMP(type=0)),
               "pass_not_vip", BACKEND_ARM),
    )),
    Case("an ICMP fragmentation-needed for a VIP reply goes to its backend, quoting the backend", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        Send(FRAG_NEEDED_FOR_VIP_REPLY, CLIENT_ARM, XDP_REDIRECT, "redirect",
             FRAG_NEEDED_TO_BACKEND),
    )),
    Case("an ICMP port-unreachable from a backend reaches the client from the VIP, quoting it", (
        Send(DNS_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DNS_QUERY, DNS_BACKEND)),
        Send(PORT_UNREACHABLE_FROM_BACKEND, BACKEND_ARM, XDP_REDIRECT, "redirect",
             PORT_UNREACHABLE_FROM_VIP),
    )),
    Case("an ICMP time-exceeded from a router past the balancer keeps its sender, quotes the VIP", (
        Send(DNS_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DNS_QUERY, DNS_BACKEND)),
        Send(TIME_EXCEEDED_FROM_ROUTER, BACKEND_ARM, XDP_REDIRECT, "redirect",
             TIME_EXCEEDED_TO_CLIENT),
    )),
    Case("an ICMP error quoting an untracked flow passes unchanged", (
        passes(PORT_UNREACHABLE_FROM_BACKEND, "pass_not_vip", BACKEND_ARM),
        passes(FRAG_NEEDED_FOR_VIP_REPLY, "pass_not_vip"),
    )),
    Case("an ICMP error whose quote is cut inside the ports passes unchanged", (
        Send(DNS_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DNS_QUERY, DNS_BACKEND)),
        passes(bytes(Ether(src=BACKEND_MACS[DNS_BACKEND.addr], dst=BACKEND_ARM_MAC) /
                     IP(src=DNS_BACKEND.addr, dst=CLIENT) / ICMP(type=3, code=3) /
                     Raw(PORT_UNREACHABLE_FROM_BACKEND[14 + 20 + 8:][:20 + 6])),
               "pass_not_vip", BACKEND_ARM),
    )),
    # --- fragments, flags and options ---
    Case("a VIP SYN with Don't Fragment set is balanced: DF is not a fragment", (
        Send(to_vip(WEB, ip_flags="DF"), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(WEB, ip_flags="DF"), WEB_BACKEND)),
    )),
    Case("a middle fragment (MF and an offset) with no first fragment seen passes unchanged", (
        passes(_client_ip(WEB.addr, Raw(b"x" * 24), flags="MF", frag=100, proto=6),
               "pass_fragment"),
    )),
    Case("a backend's fragmented UDP reply is SNATed to come from the VIP, every fragment", (
        Send(DNS_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DNS_QUERY, DNS_BACKEND)),
        *forwarded(BIG_ANSWER_IN, BIG_ANSWER_OUT, BACKEND_ARM),
    )),
    Case("a backend's fragmented UDP with no tracked flow passes unchanged, every fragment", (
        passes(BIG_ANSWER_IN[0], "pass_not_vip", BACKEND_ARM),
        passes(BIG_ANSWER_IN[1], "pass_fragment", BACKEND_ARM),
    )),
    Case("an ICMP fragment to a VIP address counts as not-VIP traffic, not as a fragment", (
        passes(_client_ip(WEB.addr, ICMP() / bytes(32), flags="MF"), "pass_not_vip"),
    )),
    # --- broadcast, multicast and other link layers ---
    Case("UDP to the limited broadcast address passes unchanged", (
        passes(_client_ip("255.255.255.255", UDP(sport=68, dport=67) / bytes(8),
                          eth_dst="ff:ff:ff:ff:ff:ff"), "pass_not_vip"),
    )),
    Case("UDP to the client subnet's broadcast address passes unchanged", (
        passes(_client_ip("10.10.1.255", UDP(sport=137, dport=137) / bytes(8),
                          eth_dst="ff:ff:ff:ff:ff:ff"), "pass_not_vip"),
    )),
    Case("multicast UDP (mDNS) passes unchanged", (
        passes(_client_ip("224.0.0.251", UDP(sport=5353, dport=5353) / bytes(8),
                          eth_dst="01:00:5e:00:00:fb", ttl=255), "pass_not_vip"),
    )),
    Case("a VIP SYN sent to the broadcast MAC is balanced like any other: MACs are not checked", (
        Send(to_vip(WEB, eth=(CLIENT_MAC, "ff:ff:ff:ff:ff:ff")), CLIENT_ARM, XDP_REDIRECT,
             "redirect", dnat(to_vip(WEB, eth=(CLIENT_MAC, "ff:ff:ff:ff:ff:ff")), WEB_BACKEND)),
    )),
    Case("a double-tagged (802.1ad) frame to a VIP passes unchanged", (
        passes(bytes(Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) / Dot1AD(vlan=5) / Dot1Q(vlan=7) /
                     IP(src=CLIENT, dst=WEB.addr) / TCP(sport=40000, dport=80)),
               "pass_not_ipv4"),
    )),
    Case("an 802.3 frame with a length field (LLC) passes unchanged", (
        passes(bytes(Dot3(src=CLIENT_MAC, dst="01:80:c2:00:00:00") / LLC() / bytes(38)),
               "pass_not_ipv4"),
    )),
    # --- jumbo frames ---
    Case("a 3.5 KB jumbo frame to a VIP leaves by a 9000-byte-MTU backend link", (
        Send(JUMBO_3K, CLIENT_ARM, XDP_REDIRECT, "redirect", _to_jumbo_arm(JUMBO_3K)),
    )),
    Case("a 9000-byte jumbo frame, longer than a single-buffer program sees, passes unchanged", (
        Send(JUMBO_9K, CLIENT_ARM, XDP_PASS, "pass_malformed",
             counted_bytes=JUMBO_LINEAR_BYTES),
    ), xdp_only=True),
    # --- headers that lie: never rewritten, never tracked ---
    Case("IPv4 whose total length runs past the frame passes unchanged", (
        passes(_with_ip_total_length(SYN_TO_WEB, 1000), "pass_malformed"),
    )),
    Case("IPv4 with IHL 0 passes unchanged", (
        passes(_raw_ip(0x40), "pass_malformed"),
    )),
    Case("IPv4 with IHL 4, where a TCP header misread 4 bytes early looks valid, passes unchanged", (
        passes(IHL_4_WITH_PLAUSIBLE_TCP, "pass_malformed"),
    )),
    Case("IPv4 with IHL 15 but no options (header longer than the packet) passes unchanged", (
        passes(_raw_ip(0x4F), "pass_malformed"),
    )),
    Case("IPv4 whose IHL runs into the TCP header passes unchanged", (
        passes(_raw_ip(0x47), "pass_malformed"),
    )),
    Case("TCP with data offset 0 passes unchanged", (
        passes(_with_tcp_data_offset(SYN_TO_WEB, 0), "pass_malformed"),
    )),
    Case("TCP with data offset 4 passes unchanged", (
        passes(_with_tcp_data_offset(SYN_TO_WEB, 4), "pass_malformed"),
    )),
    Case("TCP whose data offset runs past the packet passes unchanged", (
        passes(_with_tcp_data_offset(SYN_TO_WEB, 15), "pass_malformed"),
    )),
    Case("a malformed VIP SYN creates no flow: the next valid SYN is balanced afresh", (
        passes(_with_tcp_data_offset(SYN_TO_POOL, 4), "pass_malformed"),
        set_states(POOL, a="drain", b="active"),
        Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_B)),
    )),
    Case("a reply with a lying data offset passes unchanged; the flow's next reply is NATed", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        passes(_with_tcp_data_offset(from_backend(WEB_BACKEND), 4), "pass_malformed",
               BACKEND_ARM),
        Send(from_backend(WEB_BACKEND), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(WEB_BACKEND), WEB)),
    )),
    Case("a reply truncated anywhere inside its TCP header passes unchanged", (
        Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
        *_truncations(from_backend(WEB_BACKEND), range(34, 54), BACKEND_ARM),
    )),
]
CASES += _sticky_cases()


# --- L2 DSR: the frame goes on with new MACs and nothing else changed ---

def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def l2_to(frame: bytes, backend: Endpoint, arm_mac: str = BACKEND_ARM_MAC) -> bytes:
    """The frame as DSR sends it to `backend`: destination MAC the backend's, source MAC the
    egress arm's, every byte after the Ethernet addresses (IP, TTL, checksums, L4) as it came."""
    return _mac(BACKEND_MACS[backend.addr]) + _mac(arm_mac) + frame[12:]


def set_forwarding(vip: Endpoint, forwarding: str) -> Do:
    return Do(f"forwarding {forwarding}", lambda c: c.change(
        lambda config: {**config, vip: replace(config[vip], forwarding=forwarding)}))


def set_dsr_states(a: str, b: str) -> Do:
    def change(controller: Controller) -> None:
        for backend, state in sorted(((DSR_A, a), (DSR_B, b)), key=lambda x: x[1] != "active"):
            controller.backend_set(DSR, backend, weight=None, state=state)
    return Do(f"DSR a={a} b={b}", change)


SYN_TO_DSR = to_vip(DSR)
DSR_QUERY = to_vip(DSR_UDP, sport=33000)
FRAG_NEEDED_FOR_DSR_REPLY = bytes(
    Ether(src=ROUTER_MAC, dst=CLIENT_ARM_MAC) / IP(src=ROUTER, dst=DSR.addr) /
    ICMP(type=3, code=4, nexthopmtu=1400) /
    IP(src=DSR.addr, dst=CLIENT, ttl=3) / TCP(sport=DSR.port, dport=40000, flags="A"))
BIG_DSR_QUERY = datagram(CLIENT, DSR_UDP.addr, 33000, DSR_UDP.port, "udp", bytes(range(256)) * 12)


def _trio_first() -> Endpoint:
    return picked(TRIO, CLIENT, 40000, "flow")


def _dsr_cases() -> list[Case]:
    trio = _trio_first()
    syn_trio, ack_trio = to_vip(TRIO), to_vip(TRIO, flags="A")
    new_port = 40123
    return [
        Case("a SYN to a DSR VIP leaves by the backend arm with only its MACs changed", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
        )),
        Case("a DSR flow keeps its backend when the ring moves to another one", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
            set_dsr_states(a="drain", b="active"),
            Send(to_vip(DSR, flags="A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(to_vip(DSR, flags="A"), DSR_A)),
            Send(to_vip(DSR, 40001), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(to_vip(DSR, 40001), DSR_B)),
        )),
        Case("a client's FIN closes a DSR flow: its port's next SYN is picked afresh", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
            set_dsr_states(a="drain", b="active"),
            Send(to_vip(DSR, flags="FA"), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(to_vip(DSR, flags="FA"), DSR_A)),
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_B)),
        )),
        Case("a client's RST closes a DSR flow: its port's next SYN is picked afresh", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
            set_dsr_states(a="drain", b="active"),
            Send(to_vip(DSR, flags="R"), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(to_vip(DSR, flags="R"), DSR_A)),
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_B)),
        )),
        Case("a DSR frame with TTL 1 goes on unchanged: DSR is no routing hop", (
            Send(to_vip(DSR, ttl=1), CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(to_vip(DSR, ttl=1), DSR_A)),
        )),
        Case("a DSR SYN with TCP options leaves byte for byte after the MACs", (
            Send(tcp_frame(CLIENT, DSR.addr, 40000, 80, options=OPTIONS_4), CLIENT_ARM, XDP_REDIRECT,
                 "redirect", l2_to(tcp_frame(CLIENT, DSR.addr, 40000, 80, options=OPTIONS_4), DSR_A)),
        )),
        Case("a DSR UDP datagram leaves with only its MACs changed", (
            Send(DSR_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(DSR_QUERY, DSR_UDP_BACKEND)),
        )),
        Case("a DSR client on the backends' subnet is sent back out of its arm (XDP_TX)", (
            Send(tcp_frame(NEAR_CLIENT, DSR.addr, 40000, 80, eth=(NEAR_CLIENT_MAC, BACKEND_ARM_MAC)),
                 BACKEND_ARM, XDP_TX, "tx",
                 l2_to(tcp_frame(NEAR_CLIENT, DSR.addr, 40000, 80, eth=(NEAR_CLIENT_MAC, BACKEND_ARM_MAC)),
                       DSR_A)),
        )),
        Case("a fragmented DSR datagram goes to one backend at L2, every fragment unchanged", (
            *forwarded(split(BIG_DSR_QUERY), [l2_to(f, DSR_UDP_BACKEND) for f in split(BIG_DSR_QUERY)]),
        )),
        Case("an ICMP fragmentation-needed quoting a DSR reply goes to its backend unchanged", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
            Send(FRAG_NEEDED_FOR_DSR_REPLY, CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(FRAG_NEEDED_FOR_DSR_REPLY, DSR_A)),
        )),
        Case("a backend's reply from a DSR VIP that does pass the balancer is not touched", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
            passes(tcp_frame(DSR.addr, CLIENT, 80, 40000, "SA", eth=(BACKEND_MACS[DSR_A.addr], BACKEND_ARM_MAC)),
                   "pass_not_vip", BACKEND_ARM),
            passes(tcp_frame(DSR_A.addr, CLIENT, 80, 40000, "SA", eth=(BACKEND_MACS[DSR_A.addr], BACKEND_ARM_MAC)),
                   "pass_not_vip", BACKEND_ARM),
        )),
        Case("TCP to a DSR VIP's address on another port passes unchanged", (
            passes(tcp_frame(CLIENT, DSR.addr, 40000, 22), "pass_not_vip"),
        )),
        Case("a DSR backend without a route is dropped: the VIP's packet is never routed back out", (
            Send(to_vip(DSR_UNROUTED), CLIENT_ARM, XDP_DROP, "drop_dsr_unreachable", b""),
        )),
        Case("a DSR backend whose MAC is unresolved is dropped, counted as unreachable", (
            Send(to_vip(DSR_UNRESOLVED), CLIENT_ARM, XDP_DROP, "drop_dsr_unreachable", b""),
        )),
        Case("a DSR VIP with all backends drained keeps its flows and drops new ones", (
            Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)),
            set_dsr_states(a="drain", b="drain"),
            Send(to_vip(DSR, flags="A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(to_vip(DSR, flags="A"), DSR_A)),
            Send(to_vip(DSR, 40001), CLIENT_ARM, XDP_DROP, "drop_no_backend", b""),
        )),
        Case("a VIP switched from nat to dsr keeps its NAT flow NATed both ways; new flows go at L2", (
            Send(syn_trio, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(syn_trio, trio)),
            set_forwarding(TRIO, "dsr"),
            Send(ack_trio, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ack_trio, trio)),
            Send(from_backend(trio, flags="A"), BACKEND_ARM, XDP_REDIRECT, "redirect",
                 snat(from_backend(trio, flags="A"), TRIO)),
            Send(to_vip(TRIO, new_port), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 l2_to(to_vip(TRIO, new_port), picked(TRIO, CLIENT, new_port, "flow"))),
        )),
        Case("TTL 1 on an ended DSR flow of a VIP now NAT passes for the kernel's ICMP error", (
            set_forwarding(TRIO, "dsr"),
            Send(to_vip(TRIO, flags="R"), CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(to_vip(TRIO, flags="R"), trio)),
            set_forwarding(TRIO, "nat"),
            passes(to_vip(TRIO, ttl=1), "pass_ttl"),
        )),
        Case("a VIP switched from dsr to nat keeps its DSR flow at L2; new flows are NATed", (
            set_forwarding(TRIO, "dsr"),
            Send(syn_trio, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(syn_trio, trio)),
            set_forwarding(TRIO, "nat"),
            Send(ack_trio, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(ack_trio, trio)),
            Send(to_vip(TRIO, new_port), CLIENT_ARM, XDP_REDIRECT, "redirect",
                 dnat(to_vip(TRIO, new_port), picked(TRIO, CLIENT, new_port, "flow"))),
        )),
    ]


CASES += _dsr_cases()


def _describe(frame: bytes) -> str:
    return str(Ether(frame).show(dump=True)) if len(frame) >= 14 else frame.hex()


def assert_frame(out: bytes, expected: bytes) -> None:
    assert out == expected, (
        f"output differs from the expected frame\n--- got {out.hex()}\n{_describe(out)}"
        f"\n--- expected {expected.hex()}\n{_describe(expected)}")


def send(step: Send, run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps,
         verdict: Callable[[int], int] = lambda action: action) -> None:
    """Runs one frame; checks action, output bytes and that exactly one outcome counted it.
    verdict: the build's code for the step's XDP action (the tc build's differ)."""
    before = lb_maps.global_counters()
    retval, out = run(step.frame, step.ingress)
    after = lb_maps.global_counters()
    assert retval == verdict(step.action), f"action {retval}, expected {verdict(step.action)}"
    if step.action != XDP_DROP:
        assert_frame(out, step.frame if step.expected is None else step.expected)
    counted = {name: (after[name]["packets"] - before[name]["packets"],
                      after[name]["bytes"] - before[name]["bytes"])
               for name in OUTCOMES if after[name] != before[name]}
    assert counted == {step.outcome: (1, step.bytes_counted)}


# The program's two builds (bpf_programs/lb_ctx.h), each run by conftest's build_run.
BUILDS = ("xdp", "tc")


@pytest.mark.parametrize(
    ("build_run", "case"),
    [pytest.param(build, case, id=f"{build}-{case.description}")
     for case in CASES for build in BUILDS if build == "xdp" or not case.xdp_only],
    indirect=["build_run"])
def test_dataplane(case: Case, build_run: tuple[Callable[..., tuple[int, bytes]], Callable[[int], int]],
                   lb_maps: LbMaps, controller: Controller) -> None:
    """Every case, through the XDP build and through the tc build."""
    run, verdict = build_run
    for step in case.steps:
        if isinstance(step, Do):
            step.change(controller)
        else:
            send(step, run, lb_maps, verdict)


# --- behaviours beyond one table row ---

def test_unknown_route_passes_the_rewritten_packet_with_loopback_as_ingress(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps) -> None:
    frame = to_vip(UNROUTED)
    retval, out = run(frame, LOOPBACK)
    assert retval == XDP_PASS
    # Rewritten for the kernel to route: MACs and TTL are left to it.
    assert_frame(out, rewritten(frame, dst=UNROUTED_BACKEND, hops=0))
    assert {n: c["packets"] for n, c in lb_maps.global_counters().items() if c["packets"]} == {
        "pass_no_route": 1}


def test_every_frame_counts_in_exactly_one_outcome(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps) -> None:
    frames = [step for case in CASES for step in case.steps if isinstance(step, Send)]
    for step in frames:
        run(step.frame, step.ingress)
    counters = lb_maps.global_counters()
    assert sum(c["packets"] for c in counters.values()) == len(frames)
    assert sum(c["bytes"] for c in counters.values()) == sum(s.bytes_counted for s in frames)


def test_vip_without_backends_counts_the_drop_on_the_vip(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    for sport in (40000, 40001, 40002):
        assert run(to_vip(EMPTY, sport), CLIENT_ARM)[0] == XDP_DROP
    by_vip = {row["vip"]: row for row in controller.vips()}
    assert by_vip[str(EMPTY)]["drops"] == 3
    assert by_vip[str(EMPTY)]["packets"] == 0


def test_backend_counters_count_packets_and_new_flows(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    run(SYN_TO_WEB, CLIENT_ARM)
    run(ACK_TO_WEB, CLIENT_ARM)
    run(to_vip(WEB, 40001), CLIENT_ARM)
    run(from_backend(WEB_BACKEND), BACKEND_ARM)
    row = next(r for r in controller.backends(WEB) if r["backend"] == _backend_name(WEB_BACKEND))
    assert (row["packets"], row["new_flows"]) == (4, 2)
    vip_row = next(r for r in controller.vips() if r["vip"] == str(WEB))
    assert (vip_row["packets"], vip_row["new_flows"]) == (4, 2)


def _trio_backend(out: bytes) -> Endpoint:
    pkt = Ether(out)
    return Endpoint(pkt[IP].dst, pkt[TCP].dport, "tcp")


def test_flows_spread_over_backends_and_each_stays_on_its_own(
        run: Callable[..., tuple[int, bytes]]) -> None:
    picked: dict[int, Endpoint] = {}
    for sport in range(42000, 42030):
        retval, out = run(to_vip(TRIO, sport), CLIENT_ARM)
        assert retval == XDP_REDIRECT
        picked[sport] = _trio_backend(out)
        assert_frame(out, dnat(to_vip(TRIO, sport), picked[sport]))
    assert set(picked.values()) == set(TRIO_BACKENDS)
    for sport, backend in picked.items():
        _, out = run(to_vip(TRIO, sport, "A"), CLIENT_ARM)
        assert _trio_backend(out) == backend


def test_deleted_backend_gets_no_new_flows_while_its_flows_finish(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    gone = TRIO_BACKENDS[0]
    before = {sport: _trio_backend(run(to_vip(TRIO, sport), CLIENT_ARM)[1])
              for sport in range(43000, 43030)}
    assert gone in before.values()  # otherwise the deletion could not show
    controller.backend_del(TRIO, gone)

    for sport in range(44000, 44060):
        retval, out = run(to_vip(TRIO, sport), CLIENT_ARM)
        assert retval == XDP_REDIRECT
        assert _trio_backend(out) in TRIO_BACKENDS[1:]
    for sport, backend in before.items():
        assert _trio_backend(run(to_vip(TRIO, sport, "A"), CLIENT_ARM)[1]) == backend


def test_client_affinity_keeps_a_client_on_one_backend_over_100_ports_and_spreads_clients(
        run: Callable[..., tuple[int, bytes]]) -> None:
    ports = {_trio_backend(run(to_vip(STICKY, sport), CLIENT_ARM)[1]) for sport in range(45000, 45100)}
    assert len(ports) == 1
    flows = {_trio_backend(run(to_vip(TRIO, sport), CLIENT_ARM)[1]) for sport in range(45000, 45100)}
    assert flows == set(TRIO_BACKENDS)     # the same ports on a flow-affinity VIP spread
    clients = {}
    for client in OTHER_CLIENTS:
        retval, out = run(from_client(client, STICKY, 45000), CLIENT_ARM)
        assert retval == XDP_REDIRECT
        clients[client] = _trio_backend(out)
        for sport in (45001, 60000):
            assert _trio_backend(run(from_client(client, STICKY, sport), CLIENT_ARM)[1]) == clients[client]
    assert set(clients.values()) == set(TRIO_BACKENDS)


# --- time: entries are aged by rewriting their timestamps, not by waiting ---

NS_PER_S = 1_000_000_000


def _flow_key(vip: Endpoint, sport: int) -> bytes:
    return codec.encode_flow_key(CLIENT, sport, vip.addr, vip.port, vip.proto)


def _reply_key(backend: Endpoint, client_port: int) -> bytes:
    return codec.encode_flow_key(backend.addr, backend.port, CLIENT, client_port, backend.proto)


def age(program: LoadedProgram, map_name: str, key: bytes, last_seen_s: int = 0,
        created_s: int = 0) -> None:
    """Moves an entry's timestamps that many seconds into the past (bpf_ktime_get_ns counts
    from boot, and a stamp ahead of the clock is age 0, so they cannot go below 0)."""
    with libbpf.MapHandle.open(os.path.join(program.pin_dir, map_name)) as table:
        raw = table.lookup(key)
        assert raw is not None, f"no {map_name} entry to age"
        entry = codec.NatEntry.from_buffer_copy(raw)
        for stamp, by_s in (("last_seen_ns", last_seen_s), ("created_ns", created_s)):
            value = getattr(entry, stamp) - by_s * NS_PER_S
            if value < 0:
                pytest.skip(f"the kernel clock reads less than {by_s} s since boot: a "
                            f"{map_name} entry cannot be made {by_s} s old yet")
            setattr(entry, stamp, value)
        table.update(key, bytes(entry))


def has_entry(program: LoadedProgram, map_name: str, key: bytes) -> bool:
    with libbpf.MapHandle.open(os.path.join(program.pin_dir, map_name)) as table:
        return table.lookup(key) is not None


def test_an_idle_flow_past_its_timeout_is_picked_afresh(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, controller: Controller,
        lb_program: LoadedProgram) -> None:
    # A half-open flow: the shortest timeout, so the clock need not have run for 15 minutes.
    send(Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
         run, lb_maps)
    set_states(POOL, a="drain", b="active").change(controller)
    age(lb_program, "flows", _flow_key(POOL, 41000),
        last_seen_s=DEFAULT_LIMITS.tcp_syn_timeout_s - 2)
    send(Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_A)),
         run, lb_maps)  # not yet idle long enough: the drained backend keeps it
    age(lb_program, "flows", _flow_key(POOL, 41000),
        last_seen_s=DEFAULT_LIMITS.tcp_syn_timeout_s + 1)
    send(Send(SYN_TO_POOL, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_POOL, POOL_B)),
         run, lb_maps)


def test_a_reply_on_an_expired_entry_passes_unchanged_and_is_forgotten(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps,
        lb_program: LoadedProgram) -> None:
    run(SYN_TO_WEB, CLIENT_ARM)
    key = _reply_key(WEB_BACKEND, 40000)
    age(lb_program, "rnat", key, last_seen_s=DEFAULT_LIMITS.tcp_syn_timeout_s + 1)
    send(passes(from_backend(WEB_BACKEND), "pass_stale_reply", BACKEND_ARM), run, lb_maps)
    assert not has_entry(lb_program, "rnat", key)
    send(passes(from_backend(WEB_BACKEND), "pass_not_vip", BACKEND_ARM), run, lb_maps)


def test_a_syn_ack_long_after_the_syn_is_not_reverse_natted(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps,
        lb_program: LoadedProgram) -> None:
    """A direct client->backend connection reusing a tracked tuple must not come back from the
    VIP; a later packet of a live flow (plain ACK) still does."""
    run(SYN_TO_WEB, CLIENT_ARM)
    key = _reply_key(WEB_BACKEND, 40000)
    age(lb_program, "rnat", key, created_s=DEFAULT_LIMITS.tcp_syn_timeout_s + 1)
    ack = from_backend(WEB_BACKEND, flags="A")
    send(Send(ack, BACKEND_ARM, XDP_REDIRECT, "redirect", snat(ack, WEB)), run, lb_maps)
    send(passes(from_backend(WEB_BACKEND), "pass_stale_reply", BACKEND_ARM), run, lb_maps)


def test_an_evicted_reply_entry_is_restored_by_the_clients_next_state_change(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps,
        lb_program: LoadedProgram) -> None:
    run(SYN_TO_WEB, CLIENT_ARM)
    key = _reply_key(WEB_BACKEND, 40000)
    with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "rnat")) as rnat:
        assert rnat.delete(key)
    send(passes(from_backend(WEB_BACKEND), "pass_not_vip", BACKEND_ARM), run, lb_maps)
    run(ACK_TO_WEB, CLIENT_ARM)  # syn -> established: the flow is written back, with its reply
    reply = from_backend(WEB_BACKEND, flags="A")
    send(Send(reply, BACKEND_ARM, XDP_REDIRECT, "redirect", snat(reply, WEB)), run, lb_maps)


def test_the_flow_table_follows_the_connection_state(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    def state() -> list[tuple[str, int, str, int, str]]:
        return [(f["client"], f["client_port"], f["backend"], f["backend_port"], f["state"])
                for f in controller.flows()]

    run(SYN_TO_WEB, CLIENT_ARM)
    assert state() == [(CLIENT, 40000, WEB_BACKEND.addr, WEB_BACKEND.port, "syn")]
    run(ACK_TO_WEB, CLIENT_ARM)
    assert state() == [(CLIENT, 40000, WEB_BACKEND.addr, WEB_BACKEND.port, "established")]
    run(to_vip(WEB, flags="FA"), CLIENT_ARM)
    assert state() == [(CLIENT, 40000, WEB_BACKEND.addr, WEB_BACKEND.port, "closing")]
    run(DNS_QUERY, CLIENT_ARM)
    assert (CLIENT, 33000, DNS_BACKEND.addr, DNS_BACKEND.port, "udp") in state()


@pytest.mark.parametrize("build_run", BUILDS, indirect=True)
def test_a_reused_client_port_gets_its_closed_flows_entries_rewritten_in_place(
        build_run: tuple[Callable[..., tuple[int, bytes]], Callable[[int], int]],
        controller: Controller, lb_maps: LbMaps) -> None:
    """The client's next connection from the same port finds its last one's entries (closing):
    both are written over (lb_flow_create), so the flow starts anew and the backend's SYN-ACK,
    which the old reply entry would have judged stale, is reverse-NATed."""
    run, verdict = build_run
    for frame in (SYN_TO_WEB, ACK_TO_WEB, to_vip(WEB, flags="FA")):
        run(frame, CLIENT_ARM)
    [closed] = controller.flows()
    assert closed["state"] == "closing"
    send(Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
         run, lb_maps, verdict)
    [again] = controller.flows()
    assert again["state"] == "syn"
    syn_ack = from_backend(WEB_BACKEND, flags="SA")
    send(Send(syn_ack, BACKEND_ARM, XDP_REDIRECT, "redirect", snat(syn_ack, WEB)), run, lb_maps, verdict)
    assert lb_maps.live_flow_count() == 1


# --- the next-hop cache: a tracked flow reuses its FIB result until its next refresh ---

def _neigh(netns: str, *args: str) -> None:
    import subprocess

    subprocess.run(["ip", "-n", netns, "neigh", *args], check=True, capture_output=True)


def test_a_tracked_flow_reuses_its_next_hop_until_the_refresh_looks_again(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, lb_program: LoadedProgram,
        routed_netns: Any) -> None:
    send(Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
         run, lb_maps)
    # The first hit looks the route up and caches it in the flow entry.
    send(Send(ACK_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ACK_TO_WEB, WEB_BACKEND)),
         run, lb_maps)
    with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "flows")) as table:
        entry = codec.NatEntry.from_buffer_copy(table.lookup(_flow_key(WEB, 40000)))
    assert entry.nh_ifindex == routed_netns.ifindex[BACKEND_ARM]
    assert bytes(entry.nh_dmac) == bytes.fromhex(BACKEND_MACS[WEB_BACKEND.addr].replace(":", ""))

    mac = BACKEND_MACS[WEB_BACKEND.addr]
    _neigh(routed_netns.name, "del", WEB_BACKEND.addr, "dev", BACKEND_ARM)
    try:
        # The neighbour is gone, but within the refresh interval the cached next hop serves.
        send(Send(ACK_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ACK_TO_WEB, WEB_BACKEND)),
             run, lb_maps)
        # Once the entry is due for its refresh, the FIB is asked again and finds no neighbour:
        # the rewritten packet goes to the kernel, and the stale cache is dropped.
        age(lb_program, "flows", _flow_key(WEB, 40000), last_seen_s=2)
        retval, _ = run(ACK_TO_WEB, CLIENT_ARM)
        assert retval == XDP_PASS
        with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "flows")) as table:
            assert codec.NatEntry.from_buffer_copy(table.lookup(_flow_key(WEB, 40000))).nh_ifindex == 0
    finally:
        _neigh(routed_netns.name, "replace", WEB_BACKEND.addr, "lladdr", mac, "dev", BACKEND_ARM,
               "nud", "permanent")
    send(Send(ACK_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ACK_TO_WEB, WEB_BACKEND)),
         run, lb_maps)


def test_a_packet_larger_than_the_cached_clearance_asks_the_fib_again(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, lb_program: LoadedProgram) -> None:
    run(SYN_TO_WEB, CLIENT_ARM)
    run(ACK_TO_WEB, CLIENT_ARM)           # caches the next hop, cleared for a 40-byte packet
    big = to_vip(WEB, flags="A", payload=b"x" * 1600)   # 1640 > the 1500-byte MTU of the arm
    retval, _ = run(big, CLIENT_ARM)
    assert retval == XDP_PASS              # the FIB's MTU check, not the cache, decided
    with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "flows")) as table:
        entry = codec.NatEntry.from_buffer_copy(table.lookup(_flow_key(WEB, 40000)))
    assert entry.nh_ifindex == 0


def test_a_syn_ack_on_a_closed_flows_reverse_entry_passes_unchanged(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, lb_program: LoadedProgram) -> None:
    """A direct client->backend connection from the port a VIP connection just closed on must
    get its SYN-ACK as the backend sent it, however young the closed entry is."""
    run(SYN_TO_WEB, CLIENT_ARM)
    fin = to_vip(WEB, flags="FA")
    send(Send(fin, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(fin, WEB_BACKEND)), run, lb_maps)
    send(passes(from_backend(WEB_BACKEND), "pass_stale_reply", BACKEND_ARM), run, lb_maps)
    assert not has_entry(lb_program, "rnat", _reply_key(WEB_BACKEND, 40000))
    # A new SYN through the VIP on the same tuple re-creates the entry, and its SYN-ACK is NATed.
    send(Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)),
         run, lb_maps)
    syn_ack = from_backend(WEB_BACKEND)
    send(Send(syn_ack, BACKEND_ARM, XDP_REDIRECT, "redirect", snat(syn_ack, WEB)), run, lb_maps)


def test_a_later_fragment_past_the_fragment_timeout_passes_unchanged(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, lb_program: LoadedProgram) -> None:
    send(Send(BIG_QUERY_IN[0], CLIENT_ARM, XDP_REDIRECT, "redirect", BIG_QUERY_OUT[0]),
         run, lb_maps)
    key = codec.encode_frag_key(CLIENT, DNS.addr, DATAGRAM_ID, "udp")
    timeout_s = DEFAULT_LIMITS.frag_timeout_s
    with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "frags")) as table:
        raw = table.lookup(key)
        assert raw is not None, "the first fragment left no frags entry"
        entry = codec.FragEntry.from_buffer_copy(raw)
        assert entry.rewrite_dst == 1
        first_seen_ns = entry.seen_ns
        for age_s, step in ((timeout_s - 2, Send(BIG_QUERY_IN[1], CLIENT_ARM, XDP_REDIRECT,
                                                 "redirect", BIG_QUERY_OUT[1])),
                            (timeout_s + 1, passes(BIG_QUERY_IN[2], "pass_fragment"))):
            if first_seen_ns < age_s * NS_PER_S:
                pytest.skip(f"the kernel clock reads less than {age_s} s since boot")
            entry.seen_ns = first_seen_ns - age_s * NS_PER_S
            table.update(key, bytes(entry))
            send(step, run, lb_maps)


# --- DSR beyond one table row ---

def test_a_dsr_backend_on_another_port_never_reaches_the_program(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, controller: Controller) -> None:
    before = planner.read_live(lb_maps)
    with pytest.raises(ConfigError, match=r"backend 10.10.2.34:8080 of DSR VIP 10.10.9.10:80: its port "
                                          r"differs from the VIP's \(80\)"):
        controller.backend_add(DSR, Endpoint("10.10.2.34", 8080, "tcp"))
    # WEB's backend listens on 8080: switching WEB to DSR is refused the same way.
    with pytest.raises(ConfigError, match="of DSR VIP 10.10.9.1:80"):
        set_forwarding(WEB, "dsr").change(controller)
    assert planner.read_live(lb_maps) == before
    send(Send(SYN_TO_WEB, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN_TO_WEB, WEB_BACKEND)), run, lb_maps)
    send(Send(SYN_TO_DSR, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_to(SYN_TO_DSR, DSR_A)), run, lb_maps)


def test_a_dsr_flow_is_tracked_one_way_and_listed_as_dsr(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, controller: Controller,
        lb_program: LoadedProgram) -> None:
    run(SYN_TO_DSR, CLIENT_ARM)
    run(SYN_TO_WEB, CLIENT_ARM)
    assert has_entry(lb_program, "flows", _flow_key(DSR, 40000))
    assert not has_entry(lb_program, "rnat", _reply_key(DSR_A, 40000))   # no reverse NAT to keep
    assert has_entry(lb_program, "rnat", _reply_key(WEB_BACKEND, 40000))
    modes = {(f["vip"], f["vip_port"]): f["forwarding"] for f in controller.flows()}
    assert modes == {(DSR.addr, DSR.port): "dsr", (WEB.addr, WEB.port): "nat"}


def test_an_idle_dsr_flow_past_its_timeout_is_picked_afresh(
        run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps, controller: Controller,
        lb_program: LoadedProgram) -> None:
    """A DSR flow sees only the client's side: an established one whose client goes silent
    ends by the idle timeout alone (no reply keeps it alive)."""
    run(SYN_TO_DSR, CLIENT_ARM)
    run(to_vip(DSR, flags="A"), CLIENT_ARM)        # established
    set_dsr_states(a="drain", b="active").change(controller)
    age(lb_program, "flows", _flow_key(DSR, 40000),
        last_seen_s=DEFAULT_LIMITS.tcp_established_timeout_s - 2)
    send(Send(to_vip(DSR, flags="A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
              l2_to(to_vip(DSR, flags="A"), DSR_A)), run, lb_maps)
    age(lb_program, "flows", _flow_key(DSR, 40000),
        last_seen_s=DEFAULT_LIMITS.tcp_established_timeout_s + 1)
    send(Send(to_vip(DSR, flags="A"), CLIENT_ARM, XDP_REDIRECT, "redirect",
              l2_to(to_vip(DSR, flags="A"), DSR_B)), run, lb_maps)
