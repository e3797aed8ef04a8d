"""The XDP program's IPv6 path (NAT66), packet by packet: each case is a sentence, frames with
their ingress, expected XDP action, outcome counter and exact output bytes, run through
BPF_PROG_TEST_RUN in a routed namespace with IPv6 addresses and neighbours."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lbctl import planner
from lbctl.bench.routed import Port
from lbctl.control import Controller
from lbctl.model import Config, parse_endpoint
from xdp import codec, libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import OUTCOMES
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps"),
    pytest.mark.usefixtures("fresh_dataplane"),
]
NETNS_PREFIX = "v6"      # this stream's namespaces

CLIENT_ARM, BACKEND_ARM = "v6c", "v6b"
CLIENT_ARM_MAC, BACKEND_ARM_MAC = "02:00:06:01:00:01", "02:00:06:02:00:01"
CLIENT, CLIENT_MAC = "fd00:6:1::100", "02:00:06:01:01:00"
ROUTER, ROUTER_MAC = "fd00:6:1::fe", "02:00:06:01:00:fe"     # a router on the client side

WEB = Endpoint("fd00:6:9::1", 80, "tcp")
WEB_BACKEND = Endpoint("fd00:6:2::11", 8080, "tcp")           # the port differs from the VIP's
DNS = Endpoint("fd00:6:9::1", 53, "udp")
DNS_BACKEND = Endpoint("fd00:6:2::12", 5353, "udp")
PAIR = Endpoint("fd00:6:9::2", 80, "tcp")
PAIR_BACKENDS = (Endpoint("fd00:6:2::21", 80, "tcp"), Endpoint("fd00:6:2::22", 80, "tcp"))
EMPTY = Endpoint("fd00:6:9::3", 80, "tcp")
DSR = Endpoint("fd00:6:9::4", 80, "tcp")                       # L2 DSR, PAIR_BACKENDS[0]
DSR_DNS = Endpoint("fd00:6:9::5", 53, "udp")                   # L2 DSR over UDP
DSR_DNS_BACKEND = Endpoint("fd00:6:2::22", 53, "udp")          # PAIR_BACKENDS[1]'s host
NOT_A_VIP = "fd00:6:9::99"

BACKEND_MACS = {b.addr: f"02:00:06:02:00:{i + 0x10:02x}"
                for i, b in enumerate((WEB_BACKEND, DNS_BACKEND, *PAIR_BACKENDS))}

PORTS = (
    Port(CLIENT_ARM, CLIENT_ARM_MAC, "10.66.1.1/24", {CLIENT: CLIENT_MAC, ROUTER: ROUTER_MAC},
         cidr6="fd00:6:1::1/64"),
    Port(BACKEND_ARM, BACKEND_ARM_MAC, "10.66.2.1/24", dict(BACKEND_MACS), cidr6="fd00:6:2::1/64"),
)


@pytest.fixture(scope="module")
def baseline(controller: Controller, lb_maps: LbMaps) -> Config:
    for vip, backends in ((WEB, [WEB_BACKEND]), (DNS, [DNS_BACKEND]), (PAIR, list(PAIR_BACKENDS)),
                          (EMPTY, []), (DSR, [PAIR_BACKENDS[0]]), (DSR_DNS, [DSR_DNS_BACKEND])):
        controller.vip_add(vip, forwarding="dsr" if vip in (DSR, DSR_DNS) else "nat")
        for backend in backends:
            controller.backend_add(vip, parse_endpoint(str(backend), vip.proto))
    return {vip: live.spec for vip, live in planner.read_live(lb_maps).items()}


# --- frames ---

def client_frame(dst: str, l4: Packet, *, src: str = CLIENT, hlim: int = 64,
                 ext: Packet | None = None, eth: tuple[str, str] = (CLIENT_MAC, CLIENT_ARM_MAC)) -> bytes:
    ip = IPv6(src=src, dst=dst, hlim=hlim)
    if ext is not None:
        ip = ip / ext
    return bytes(Ether(src=eth[0], dst=eth[1]) / ip / l4)


def to_vip(vip: Endpoint, sport: int = 40000, flags: str = "S", **kw: object) -> bytes:
    if vip.proto == "udp":
        return client_frame(vip.addr, UDP(sport=sport, dport=vip.port) / b"query", **kw)  # type: ignore[arg-type]
    return client_frame(vip.addr, TCP(sport=sport, dport=vip.port, flags=flags, seq=1000,
                                      ack=0 if flags == "S" else 1, window=64240), **kw)  # type: ignore[arg-type]


def from_backend(backend: Endpoint, client_port: int = 40000, flags: str = "SA") -> bytes:
    eth = (BACKEND_MACS[backend.addr], BACKEND_ARM_MAC)
    if backend.proto == "udp":
        l4: Packet = UDP(sport=backend.port, dport=client_port) / b"answer"
    else:
        l4 = TCP(sport=backend.port, dport=client_port, flags=flags, seq=5000, ack=1001, window=64240)
    return bytes(Ether(src=eth[0], dst=eth[1]) / IPv6(src=backend.addr, dst=CLIENT) / l4)


def rewritten(frame: bytes, eth: tuple[str, str], src: Endpoint | None = None,
              dst: Endpoint | None = None) -> bytes:
    """The frame as it should leave: MACs from the FIB, address and port rewritten, hop limit
    down by one, the L4 checksum computed afresh by scapy over the IPv6 pseudo-header."""
    pkt = Ether(frame)
    pkt.src, pkt.dst = eth
    ip = pkt[IPv6]
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    if src is not None:
        ip.src, l4.sport = src.addr, src.port
    if dst is not None:
        ip.dst, l4.dport = dst.addr, dst.port
    ip.hlim -= 1
    del l4.chksum
    return bytes(pkt)


def to_backend_arm(backend: Endpoint) -> tuple[str, str]:
    return BACKEND_ARM_MAC, BACKEND_MACS[backend.addr]


TO_CLIENT_ARM = (CLIENT_ARM_MAC, CLIENT_MAC)


def dnat(frame: bytes, backend: Endpoint) -> bytes:
    return rewritten(frame, to_backend_arm(backend), dst=backend)


def snat(frame: bytes, vip: Endpoint) -> bytes:
    return rewritten(frame, TO_CLIENT_ARM, src=vip)


# --- the table ---

@dataclass(frozen=True)
class Send:
    frame: bytes
    ingress: str
    action: int
    outcome: str
    expected: bytes | None = None


def passes(frame: bytes, outcome: str, ingress: str = CLIENT_ARM) -> Send:
    return Send(frame, ingress, XDP_PASS, outcome)


def send(step: Send, run: Callable[..., tuple[int, bytes]], lb_maps: LbMaps,
         verdict: Callable[[int], int] = lambda action: action) -> None:
    before = lb_maps.global_counters()
    retval, out = run(step.frame, step.ingress)
    after = lb_maps.global_counters()
    counted = {name: after[name]["packets"] - before[name]["packets"]
               for name in OUTCOMES if after[name] != before[name]}
    assert retval == verdict(step.action), f"action {retval}, expected {verdict(step.action)} ({counted})"
    if step.action != XDP_DROP:
        expected = step.frame if step.expected is None else step.expected
        assert out == expected, (f"output differs\n--- got\n{Ether(out).show(dump=True)}"
                                 f"\n--- expected\n{Ether(expected).show(dump=True)}")
    assert counted == {step.outcome: 1}


SYN = to_vip(WEB)
ACK = to_vip(WEB, flags="A")
QUERY = to_vip(DNS, sport=33000)
# Extension headers the program walks before the ports, and what it leaves to the kernel.
HOP_BY_HOP_SYN = to_vip(WEB, ext=IPv6ExtHdrHopByHop())
DEST_OPTS_SYN = to_vip(WEB, ext=IPv6ExtHdrDestOpt())
FINAL_ROUTING_SYN = to_vip(WEB, ext=IPv6ExtHdrRouting(addresses=[], segleft=0))
WAYPOINT_ROUTING_SYN = to_vip(WEB, ext=IPv6ExtHdrRouting(addresses=[CLIENT], segleft=1))
FIVE_HEADERS_SYN = to_vip(WEB, ext=IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                          IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt())
ICMP_FRAGMENT_TO_VIP = client_frame(DNS.addr, ICMPv6EchoRequest(id=1, seq=1),
                                    ext=IPv6ExtHdrFragment(id=8, m=1))
# Neighbour discovery and router traffic, addressed to the balancer's own arm.
NEIGHBOUR_SOLICITATION = bytes(
    Ether(src=CLIENT_MAC, dst="33:33:ff:00:00:01") /
    IPv6(src=CLIENT, dst="ff02::1:ff00:1", hlim=255) /
    ICMPv6ND_NS(tgt="fd00:6:1::1") / ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC))
NEIGHBOUR_SOLICITATION_FOR_VIP = bytes(
    Ether(src=CLIENT_MAC, dst="33:33:ff:00:00:01") /
    IPv6(src=CLIENT, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=WEB.addr))
NEIGHBOUR_ADVERTISEMENT = bytes(
    Ether(src=CLIENT_MAC, dst=CLIENT_ARM_MAC) / IPv6(src=CLIENT, dst="fd00:6:1::1", hlim=255) /
    ICMPv6ND_NA(tgt=CLIENT, R=0, S=1, O=1))
ROUTER_ADVERTISEMENT = bytes(
    Ether(src=ROUTER_MAC, dst="33:33:00:00:00:01") /
    IPv6(src="fe80::fe", dst="ff02::1", hlim=255) / ICMPv6ND_RA())
PING_TO_VIP = client_frame(WEB.addr, ICMPv6EchoRequest(id=1, seq=1))
# Path MTU discovery: a router near the client says the VIP's reply was too big; the backend
# says the client's query had no listener.
TOO_BIG_FOR_VIP_REPLY = bytes(
    Ether(src=ROUTER_MAC, dst=CLIENT_ARM_MAC) / IPv6(src=ROUTER, dst=WEB.addr) /
    ICMPv6PacketTooBig(mtu=1280) /
    IPv6(src=WEB.addr, dst=CLIENT, hlim=3) / TCP(sport=WEB.port, dport=40000, flags="A"))
TOO_BIG_TO_BACKEND = bytes(
    Ether(src=BACKEND_ARM_MAC, dst=BACKEND_MACS[WEB_BACKEND.addr]) /
    IPv6(src=ROUTER, dst=WEB_BACKEND.addr, hlim=63) / ICMPv6PacketTooBig(mtu=1280) /
    IPv6(src=WEB_BACKEND.addr, dst=CLIENT, hlim=3) /
    TCP(sport=WEB_BACKEND.port, dport=40000, flags="A"))
PORT_UNREACHABLE_FROM_BACKEND = bytes(
    Ether(src=BACKEND_MACS[DNS_BACKEND.addr], dst=BACKEND_ARM_MAC) /
    IPv6(src=DNS_BACKEND.addr, dst=CLIENT) / ICMPv6DestUnreach(code=4) /
    IPv6(src=CLIENT, dst=DNS_BACKEND.addr) / UDP(sport=33000, dport=DNS_BACKEND.port) / b"query")
PORT_UNREACHABLE_FROM_VIP = bytes(
    Ether(src=CLIENT_ARM_MAC, dst=CLIENT_MAC) / IPv6(src=DNS.addr, dst=CLIENT, hlim=63) /
    ICMPv6DestUnreach(code=4) /
    IPv6(src=CLIENT, dst=DNS.addr) / UDP(sport=33000, dport=DNS.port) / b"query")
HOP_LIMIT_EXCEEDED_FROM_ROUTER = bytes(
    Ether(src=BACKEND_MACS[WEB_BACKEND.addr], dst=BACKEND_ARM_MAC) /
    IPv6(src="fd00:6:2::fe", dst=CLIENT) / ICMPv6TimeExceeded() /
    IPv6(src=CLIENT, dst=WEB_BACKEND.addr, hlim=1) /
    TCP(sport=40000, dport=WEB_BACKEND.port, flags="S"))
HOP_LIMIT_EXCEEDED_TO_CLIENT = bytes(
    Ether(src=CLIENT_ARM_MAC, dst=CLIENT_MAC) /
    IPv6(src="fd00:6:2::fe", dst=CLIENT, hlim=63) / ICMPv6TimeExceeded() /
    IPv6(src=CLIENT, dst=WEB.addr, hlim=1) / TCP(sport=40000, dport=WEB.port, flags="S"))


def _truncated(frame: bytes, length: int) -> bytes:
    return frame[:length]


def _with_payload_length(frame: bytes, length: int) -> bytes:
    out = bytearray(frame)
    out[18:20] = length.to_bytes(2, "big")
    return bytes(out)


def l2_only(frame: bytes, backend: Endpoint) -> bytes:
    """A DSR frame as it leaves: new MACs toward the backend, every other byte as it came."""
    src, dst = to_backend_arm(backend)
    return frames_mac(dst) + frames_mac(src) + frame[12:]


def frames_mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


# --- fragments: a UDP datagram of FRAGMENTED_BYTES split as a sending kernel splits it ---

FRAGMENTED_BYTES = 3000
FRAGMENT_DATA = 1232            # per fragment: what fits IPv6's minimum MTU (a multiple of 8)


def fragments(src: str, sport: int, dst: str, dport: int, frag_id: int, *, hlim: int = 64,
              eth: tuple[str, str] = (CLIENT_MAC, CLIENT_ARM_MAC), size: int = FRAGMENTED_BYTES,
              hop_by_hop: bool = False) -> list[bytes]:
    """One UDP datagram (checksum over the whole of it) in fragments: the first carries the UDP
    header, the later ones only data. The same call with the rewritten addresses and ports is
    what the balancer must send for each fragment."""
    payload = bytes(i % 251 for i in range(size))
    datagram = bytes(IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)[40:]
    out = []
    for offset in range(0, len(datagram), FRAGMENT_DATA):
        chunk = datagram[offset:offset + FRAGMENT_DATA]
        more = int(offset + FRAGMENT_DATA < len(datagram))
        ip: Packet = IPv6(src=src, dst=dst, hlim=hlim)
        if hop_by_hop:
            ip = ip / IPv6ExtHdrHopByHop()
        frag = IPv6ExtHdrFragment(nh=17, offset=offset // 8, m=more, id=frag_id)
        out.append(bytes(Ether(src=eth[0], dst=eth[1]) / ip / frag / Raw(chunk)))
    return out


def later_fragment(frame: bytes, *, frag_id: int | None = None, hlim: int | None = None) -> bytes:
    pkt = Ether(frame)
    if frag_id is not None:
        pkt[IPv6ExtHdrFragment].id = frag_id
    if hlim is not None:
        pkt[IPv6].hlim = hlim
    return bytes(pkt)


CLIENT_TO_DNS = fragments(CLIENT, 33000, DNS.addr, DNS.port, 0x1234abcd)
CLIENT_TO_DNS_BACKEND = fragments(CLIENT, 33000, DNS_BACKEND.addr, DNS_BACKEND.port, 0x1234abcd,
                                  hlim=63, eth=to_backend_arm(DNS_BACKEND))
HOP_BY_HOP_TO_DNS = fragments(CLIENT, 33001, DNS.addr, DNS.port, 77, hop_by_hop=True)
HOP_BY_HOP_TO_DNS_BACKEND = fragments(CLIENT, 33001, DNS_BACKEND.addr, DNS_BACKEND.port, 77,
                                      hlim=63, eth=to_backend_arm(DNS_BACKEND),
                                      hop_by_hop=True)
BACKEND_ANSWER = fragments(DNS_BACKEND.addr, DNS_BACKEND.port, CLIENT, 33000, 0x51,
                           eth=(BACKEND_MACS[DNS_BACKEND.addr], BACKEND_ARM_MAC))
ANSWER_FROM_VIP = fragments(DNS.addr, DNS.port, CLIENT, 33000, 0x51, hlim=63, eth=TO_CLIENT_ARM)
CLIENT_TO_DSR_DNS = fragments(CLIENT, 33002, DSR_DNS.addr, DSR_DNS.port, 0xfeed)
ATOMIC_QUERY = to_vip(DNS, sport=33003, ext=IPv6ExtHdrFragment(id=9, m=0))


TOO_BIG_FOR_DSR_REPLY = bytes(
    Ether(src=ROUTER_MAC, dst=CLIENT_ARM_MAC) / IPv6(src=ROUTER, dst=DSR.addr) /
    ICMPv6PacketTooBig(mtu=1280) /
    IPv6(src=DSR.addr, dst=CLIENT, hlim=3) / TCP(sport=DSR.port, dport=40000, flags="A"))
DSR_SYN = to_vip(DSR)
DSR_ACK = to_vip(DSR, flags="A")


CASES: list[tuple[str, tuple[Send, ...]]] = [
    ("a new flow to an IPv6 DSR VIP leaves with the backend's MAC and nothing else changed", (
        Send(DSR_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(DSR_SYN, PAIR_BACKENDS[0])),
    )),
    ("a tracked IPv6 DSR flow's next packet goes at L2 to the same backend", (
        Send(DSR_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(DSR_SYN, PAIR_BACKENDS[0])),
        Send(DSR_ACK, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(DSR_ACK, PAIR_BACKENDS[0])),
        Send(DSR_ACK, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(DSR_ACK, PAIR_BACKENDS[0])),
    )),
    ("an IPv6 DSR frame with hop limit 1 still goes at L2 (DSR is no routing hop)", (
        Send(to_vip(DSR, hlim=1), CLIENT_ARM, XDP_REDIRECT, "redirect",
             l2_only(to_vip(DSR, hlim=1), PAIR_BACKENDS[0])),
    )),
    ("packet too big about an IPv6 DSR reply goes unchanged at L2 to the flow's backend", (
        Send(DSR_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(DSR_SYN, PAIR_BACKENDS[0])),
        Send(TOO_BIG_FOR_DSR_REPLY, CLIENT_ARM, XDP_REDIRECT, "redirect",
             l2_only(TOO_BIG_FOR_DSR_REPLY, PAIR_BACKENDS[0])),
    )),
    ("a DSR backend's own packet to the client is not caught: DSR tracks one way", (
        Send(DSR_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(DSR_SYN, PAIR_BACKENDS[0])),
        passes(from_backend(PAIR_BACKENDS[0]), "pass_not_vip", BACKEND_ARM),
    )),
    ("a new IPv6 TCP flow to a VIP is DNATed to its backend, port and checksum rewritten", (
        Send(SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN, WEB_BACKEND)),
    )),
    ("a tracked IPv6 flow's next packet hits the flow table", (
        Send(SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN, WEB_BACKEND)),
        Send(ACK, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ACK, WEB_BACKEND)),
        Send(ACK, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ACK, WEB_BACKEND)),
    )),
    ("the backend's IPv6 reply is reverse-NATed to the VIP and sent to the client", (
        Send(SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN, WEB_BACKEND)),
        Send(from_backend(WEB_BACKEND), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(WEB_BACKEND), WEB)),
    )),
    ("an IPv6 UDP query and its answer are NATed both ways", (
        Send(QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(QUERY, DNS_BACKEND)),
        Send(from_backend(DNS_BACKEND, 33000), BACKEND_ARM, XDP_REDIRECT, "redirect",
             snat(from_backend(DNS_BACKEND, 33000), DNS)),
    )),
    ("an IPv6 reply without a tracked flow passes unchanged", (
        passes(from_backend(WEB_BACKEND), "pass_not_vip", BACKEND_ARM),
    )),
    ("IPv6 TCP to an address that is no VIP passes unchanged", (
        passes(client_frame(NOT_A_VIP, TCP(sport=40000, dport=80, flags="S")), "pass_not_vip"),
    )),
    ("IPv6 TCP to a VIP's address on another port passes unchanged", (
        passes(client_frame(WEB.addr, TCP(sport=40000, dport=81, flags="S")), "pass_not_vip"),
    )),
    ("an IPv6 SYN to a VIP without backends is dropped", (
        Send(to_vip(EMPTY), CLIENT_ARM, XDP_DROP, "drop_no_backend"),
    )),
    ("an IPv6 SYN with hop limit 1 passes unchanged so the kernel answers time exceeded", (
        passes(to_vip(WEB, hlim=1), "pass_ttl"),
    )),
    ("a neighbour solicitation passes unchanged", (
        passes(NEIGHBOUR_SOLICITATION, "pass_not_vip"),
    )),
    ("a neighbour solicitation for a VIP's address passes unchanged", (
        passes(NEIGHBOUR_SOLICITATION_FOR_VIP, "pass_not_vip"),
    )),
    ("a neighbour advertisement passes unchanged", (
        passes(NEIGHBOUR_ADVERTISEMENT, "pass_not_vip"),
    )),
    ("a router advertisement passes unchanged", (
        passes(ROUTER_ADVERTISEMENT, "pass_not_vip"),
    )),
    ("an ICMPv6 echo request to a VIP passes unchanged", (
        passes(PING_TO_VIP, "pass_not_vip"),
    )),
    ("a SYN behind a hop-by-hop header is balanced, the header kept", (
        Send(HOP_BY_HOP_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(HOP_BY_HOP_SYN, WEB_BACKEND)),
    )),
    ("a SYN behind a destination-options header is balanced, the header kept", (
        Send(DEST_OPTS_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(DEST_OPTS_SYN, WEB_BACKEND)),
    )),
    ("a SYN behind a routing header with no segments left is balanced", (
        Send(FINAL_ROUTING_SYN, CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(FINAL_ROUTING_SYN, WEB_BACKEND)),
    )),
    ("a SYN behind a routing header with segments left passes unchanged", (
        passes(WAYPOINT_ROUTING_SYN, "pass_ext_header"),
    )),
    ("a SYN behind five extension headers (more than are walked) passes unchanged", (
        passes(FIVE_HEADERS_SYN, "pass_ext_header"),
    )),
    ("an IPv6 UDP datagram in three fragments reaches one backend: the first DNATed, the rest readdressed", (
        *(Send(f, CLIENT_ARM, XDP_REDIRECT, "redirect", out)
          for f, out in zip(CLIENT_TO_DNS, CLIENT_TO_DNS_BACKEND, strict=True)),
    )),
    ("a fragment header behind a hop-by-hop header is followed the same way", (
        *(Send(f, CLIENT_ARM, XDP_REDIRECT, "redirect", out)
          for f, out in zip(HOP_BY_HOP_TO_DNS, HOP_BY_HOP_TO_DNS_BACKEND, strict=True)),
    )),
    ("a backend's fragmented IPv6 answer leaves from the VIP, every fragment", (
        Send(QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(QUERY, DNS_BACKEND)),
        *(Send(f, BACKEND_ARM, XDP_REDIRECT, "redirect", out)
          for f, out in zip(BACKEND_ANSWER, ANSWER_FROM_VIP, strict=True)),
    )),
    ("a fragmented IPv6 datagram of a tracked flow follows the flow's backend", (
        Send(to_vip(DNS, sport=33000), CLIENT_ARM, XDP_REDIRECT, "redirect",
             dnat(to_vip(DNS, sport=33000), DNS_BACKEND)),
        *(Send(f, CLIENT_ARM, XDP_REDIRECT, "redirect", out)
          for f, out in zip(CLIENT_TO_DNS, CLIENT_TO_DNS_BACKEND, strict=True)),
    )),
    ("an IPv6 DSR datagram's fragments all go at L2 to the first one's backend, unchanged", (
        *(Send(f, CLIENT_ARM, XDP_REDIRECT, "redirect", l2_only(f, DSR_DNS_BACKEND))
          for f in CLIENT_TO_DSR_DNS),
    )),
    ("a later IPv6 fragment of a DSR datagram with hop limit 1 still goes at L2", (
        Send(CLIENT_TO_DSR_DNS[0], CLIENT_ARM, XDP_REDIRECT, "redirect",
             l2_only(CLIENT_TO_DSR_DNS[0], DSR_DNS_BACKEND)),
        Send(later_fragment(CLIENT_TO_DSR_DNS[1], hlim=1), CLIENT_ARM, XDP_REDIRECT, "redirect",
             l2_only(later_fragment(CLIENT_TO_DSR_DNS[1], hlim=1), DSR_DNS_BACKEND)),
    )),
    ("a later IPv6 fragment with no first fragment passes unchanged", (
        passes(CLIENT_TO_DNS[1], "pass_fragment"),
    )),
    ("a later IPv6 fragment that arrives before its first passes; the first is still balanced", (
        passes(CLIENT_TO_DNS[2], "pass_fragment"),
        Send(CLIENT_TO_DNS[0], CLIENT_ARM, XDP_REDIRECT, "redirect", CLIENT_TO_DNS_BACKEND[0]),
    )),
    ("a later IPv6 fragment of another datagram (another identification) passes unchanged", (
        Send(CLIENT_TO_DNS[0], CLIENT_ARM, XDP_REDIRECT, "redirect", CLIENT_TO_DNS_BACKEND[0]),
        passes(later_fragment(CLIENT_TO_DNS[1], frag_id=0x1234abce), "pass_fragment"),
    )),
    ("a later IPv6 fragment of a NATed datagram with hop limit 1 passes for the kernel", (
        Send(CLIENT_TO_DNS[0], CLIENT_ARM, XDP_REDIRECT, "redirect", CLIENT_TO_DNS_BACKEND[0]),
        passes(later_fragment(CLIENT_TO_DNS[1], hlim=1), "pass_ttl"),
    )),
    ("an atomic IPv6 fragment (offset 0, no more) is balanced as a whole datagram", (
        Send(ATOMIC_QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(ATOMIC_QUERY, DNS_BACKEND)),
    )),
    ("a fragmented ICMPv6 message to a VIP passes unchanged", (
        passes(ICMP_FRAGMENT_TO_VIP, "pass_fragment"),
    )),
    ("a first IPv6 fragment too short for its TCP header passes unchanged", (
        passes(client_frame(WEB.addr, Raw(bytes(TCP(sport=40000, dport=80))[:12]),
                            ext=IPv6ExtHdrFragment(nh=6, id=10, m=1)), "pass_malformed"),
    )),
    ("a fragment to an address that is no VIP passes unchanged", (
        passes(fragments(CLIENT, 33000, NOT_A_VIP, 53, 11)[0], "pass_not_vip"),
        passes(fragments(CLIENT, 33000, NOT_A_VIP, 53, 11)[1], "pass_fragment"),
    )),
    ("a truncated IPv6 header passes unchanged", (
        passes(_truncated(SYN, 14 + 39), "pass_malformed"),
    )),
    ("a truncated TCP header behind IPv6 passes unchanged", (
        passes(_truncated(SYN, 14 + 40 + 19), "pass_malformed"),
    )),
    ("an IPv6 payload length beyond the frame passes unchanged", (
        passes(_with_payload_length(SYN, 21 + 40), "pass_malformed"),
    )),
    ("an IPv6 payload length shorter than the TCP header passes unchanged", (
        passes(_with_payload_length(SYN, 19), "pass_malformed"),
    )),
    ("packet too big about a VIP reply goes to the backend, quoting the backend's packet", (
        Send(SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN, WEB_BACKEND)),
        Send(TOO_BIG_FOR_VIP_REPLY, CLIENT_ARM, XDP_REDIRECT, "redirect", TOO_BIG_TO_BACKEND),
    )),
    ("packet too big about an untracked flow passes unchanged", (
        passes(TOO_BIG_FOR_VIP_REPLY, "pass_not_vip"),
    )),
    ("port unreachable from a backend reaches the client from the VIP, quoting the VIP", (
        Send(QUERY, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(QUERY, DNS_BACKEND)),
        Send(PORT_UNREACHABLE_FROM_BACKEND, BACKEND_ARM, XDP_REDIRECT, "redirect",
             PORT_UNREACHABLE_FROM_VIP),
    )),
    ("time exceeded from a router near the backend keeps its sender, quotes the VIP", (
        Send(SYN, CLIENT_ARM, XDP_REDIRECT, "redirect", dnat(SYN, WEB_BACKEND)),
        Send(HOP_LIMIT_EXCEEDED_FROM_ROUTER, BACKEND_ARM, XDP_REDIRECT, "redirect",
             HOP_LIMIT_EXCEEDED_TO_CLIENT),
    )),
    ("a client on the backend side is answered out of the interface it came in on", (
        Send(to_vip(WEB, src="fd00:6:2::21", eth=(BACKEND_MACS[PAIR_BACKENDS[0].addr], BACKEND_ARM_MAC)),
             BACKEND_ARM, XDP_TX, "tx",
             dnat(to_vip(WEB, src="fd00:6:2::21",
                         eth=(BACKEND_MACS[PAIR_BACKENDS[0].addr], BACKEND_ARM_MAC)), WEB_BACKEND)),
    )),
]


# Frames the kernel's test run builds no socket buffer from: the XDP build only.
XDP_ONLY = {"a truncated IPv6 header passes unchanged"}


# The program's two builds (bpf_programs/lb_ctx.h), each run by conftest's build_run.
BUILDS = ("xdp", "tc")


@pytest.mark.parametrize(
    ("build_run", "steps"),
    [pytest.param(build, steps, id=f"{build}-{name}")
     for name, steps in CASES for build in BUILDS if build == "xdp" or name not in XDP_ONLY],
    indirect=["build_run"])
def test_dataplane6(steps: tuple[Send, ...],
                    build_run: tuple[Callable[..., tuple[int, bytes]], Callable[[int], int]],
                    lb_maps: LbMaps) -> None:
    """Every case, through the XDP build and through the tc build."""
    run, verdict = build_run
    for step in steps:
        send(step, run, lb_maps, verdict)


# --- behaviours beyond one table row ---

def test_ipv6_flows_are_listed_in_bracket_form_with_their_state(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    run(SYN, CLIENT_ARM)
    flows = controller.flows()
    assert [(f["client"], f["vip"], f["backend"], f["backend_port"], f["state"]) for f in flows] == [
        (CLIENT, WEB.addr, WEB_BACKEND.addr, WEB_BACKEND.port, "syn")]
    run(ACK, CLIENT_ARM)
    assert controller.flows()[0]["state"] == "established"
    run(to_vip(WEB, flags="FA"), CLIENT_ARM)
    assert controller.flows()[0]["state"] == "closing"


def test_ipv6_flows_spread_over_backends_and_each_stays_on_its_own(
        run: Callable[..., tuple[int, bytes]]) -> None:
    seen: dict[int, str] = {}
    for sport in range(41000, 41064):
        _, out = run(to_vip(PAIR, sport=sport), CLIENT_ARM)
        seen[sport] = Ether(out)[IPv6].dst
    assert set(seen.values()) == {b.addr for b in PAIR_BACKENDS}
    for sport, backend in seen.items():
        _, out = run(to_vip(PAIR, sport=sport, flags="A"), CLIENT_ARM)
        assert Ether(out)[IPv6].dst == backend


def test_a_deleted_ipv6_backend_gets_no_new_flows_while_its_flows_finish(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    kept: dict[int, str] = {}
    for sport in range(42000, 42032):
        _, out = run(to_vip(PAIR, sport=sport), CLIENT_ARM)
        kept[sport] = Ether(out)[IPv6].dst
    gone = PAIR_BACKENDS[0]
    controller.backend_del(PAIR, gone)
    for sport, backend in kept.items():      # established flows keep their backend
        _, out = run(to_vip(PAIR, sport=sport, flags="A"), CLIENT_ARM)
        assert Ether(out)[IPv6].dst == backend
    for sport in range(43000, 43032):        # new ones avoid the deleted backend
        _, out = run(to_vip(PAIR, sport=sport), CLIENT_ARM)
        assert Ether(out)[IPv6].dst == PAIR_BACKENDS[1].addr


def test_ipv6_backend_marked_down_loses_its_flows(
        run: Callable[..., tuple[int, bytes]], controller: Controller) -> None:
    owner: dict[int, str] = {}
    for sport in range(44000, 44032):
        _, out = run(to_vip(PAIR, sport=sport), CLIENT_ARM)
        owner[sport] = Ether(out)[IPv6].dst
    down = PAIR_BACKENDS[0]
    controller.backend_set(PAIR, down, weight=None, state="down")
    for sport in owner:
        _, out = run(to_vip(PAIR, sport=sport, flags="A"), CLIENT_ARM)
        assert Ether(out)[IPv6].dst == PAIR_BACKENDS[1].addr


def test_vip_del_forgets_its_ipv6_flows_and_their_replies(
        run: Callable[..., tuple[int, bytes]], controller: Controller, lb_maps: LbMaps,
        lb_program: LoadedProgram) -> None:
    run(SYN, CLIENT_ARM)
    reply_key = codec.encode_flow_key(WEB_BACKEND.addr, WEB_BACKEND.port, CLIENT, 40000, "tcp")
    with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "rnat6")) as rnat6:
        assert rnat6.lookup(reply_key) is not None
        controller.vip_del(WEB)
        assert rnat6.lookup(reply_key) is None
    send(passes(from_backend(WEB_BACKEND), "pass_not_vip", BACKEND_ARM), run, lb_maps)


def test_ipv4_and_ipv6_vips_share_one_id_space(lb_maps: LbMaps) -> None:
    vips = lb_maps.vips()
    ids = [meta.vip_id for meta in vips.values()]
    assert len(ids) == len(set(ids))
    assert {WEB, DNS, PAIR, EMPTY, DSR, DSR_DNS} <= set(vips)


def test_a_vip_of_one_family_refuses_a_backend_of_the_other_and_changes_nothing(
        controller: Controller, lb_maps: LbMaps) -> None:
    from lbctl.errors import ConfigError

    before = planner.read_live(lb_maps)
    with pytest.raises(ConfigError, match="share one address family"):
        controller.backend_add(WEB, Endpoint("10.66.2.11", 80, "tcp"))
    assert planner.read_live(lb_maps) == before


def test_explain_answers_for_an_ipv6_vip_without_creating_a_flow(
        run: Callable[..., tuple[int, bytes]], controller: Controller, lb_maps: LbMaps,
        lb_program: LoadedProgram) -> None:
    from xdp.explain import explain

    client = Endpoint(CLIENT, 40000, "tcp")
    before = lb_maps.global_counters()
    answer = explain(lb_program.fd, client, WEB, new_connection=True)
    assert (answer.verdict, answer.backend) == ("ring", str(WEB_BACKEND))
    assert controller.flows() == [] and lb_maps.global_counters() == before
    run(SYN, CLIENT_ARM)
    hit = explain(lb_program.fd, client, WEB)
    assert (hit.verdict, hit.backend, hit.flow_state) == ("flow_hit", "[fd00:6:2::11]:8080", "syn")
    assert explain(lb_program.fd, client, Endpoint(NOT_A_VIP, 80, "tcp")).verdict == "not_vip"
    assert explain(lb_program.fd, client, EMPTY, new_connection=True).verdict == "no_backend"


def test_vip_del_forgets_its_ipv6_fragment_entries(
        run: Callable[..., tuple[int, bytes]], controller: Controller, lb_maps: LbMaps,
        lb_program: LoadedProgram) -> None:
    run(CLIENT_TO_DNS[0], CLIENT_ARM)
    key = codec.encode_frag_key6(CLIENT, DNS.addr, 0x1234abcd, "udp")
    with libbpf.MapHandle.open(os.path.join(lb_program.pin_dir, "frags6")) as frags6:
        raw = frags6.lookup(key)
        assert raw is not None
        entry = codec.FragEntry6.from_buffer_copy(raw)
        assert (entry.e.rewrite_dst, bytes(entry.addr)) == (1, ipaddress.IPv6Address(
            DNS_BACKEND.addr).packed)
        backend_id = entry.e.backend_id
        assert backend_id in lb_maps.tracked_backend_ids()
        controller.vip_del(DNS)
        assert frags6.lookup(key) is None
    send(passes(CLIENT_TO_DNS[1], "pass_fragment"), run, lb_maps)
