"""Full-NAT (one-arm) in the XDP program, packet by packet through BPF_PROG_TEST_RUN: both
addresses rewritten, the source port claimed per flow without collisions, replies matched by the
claimed port, expiry and take-over, exhaustion, ICMP errors, fragments, mode changes."""

from __future__ import annotations

import os
import struct
from dataclasses import replace

import pytest
from fullnat_cases import SINGLE_PORT, FullNatVips, OneArm, Run, assert_frame, rewritten, source_of
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether

from lbctl.bench.routed import Port, mac_of
from lbctl.control import Controller
from lbctl.model import Config
from xdp import codec
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS
from xdp.maps import LbMaps

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps"),
    pytest.mark.usefixtures("fresh_dataplane"),
]

# One arm carries clients and backends alike (one-arm); a second arm has a backend subnet of
# its own, to show the default SNAT address is the one toward the backend.
ARM = "fna"
ARM_ADDR, ARM_MAC = "10.20.1.1", "02:00:0a:14:01:01"
FAR_ARM = "fnb"
FAR_ARM_ADDR, FAR_ARM_MAC = "10.20.2.1", "02:00:0a:14:02:01"
CLIENT = "10.20.1.100"
CLIENT2 = "10.20.1.101"
CLIENT3 = "10.20.1.102"
ROUTER = "10.20.1.254"

WEB = Endpoint("10.20.9.1", 80, "tcp")
WEB_BACKEND = Endpoint("10.20.1.11", 8080, "tcp")
DNS = Endpoint("10.20.9.1", 53, "udp")
DNS_BACKEND = Endpoint("10.20.1.12", 5353, "udp")
FAR = Endpoint("10.20.9.2", 80, "tcp")
FAR_BACKEND = Endpoint("10.20.2.11", 80, "tcp")
PINNED = Endpoint("10.20.9.3", 80, "tcp")              # --snat 10.20.1.201,10.20.1.202
PINNED_SNAT = ("10.20.1.201", "10.20.1.202")
NARROW = Endpoint("10.20.9.4", 80, "tcp")              # two source ports: 5000-5001
SINGLE = Endpoint("10.20.9.5", 80, "tcp")              # one source port: 6000
UNROUTED = Endpoint("10.20.9.6", 80, "tcp")
UNROUTED_BACKEND = Endpoint("192.0.2.77", 80, "tcp")    # no route: no source address to pick
SWITCH = Endpoint("10.20.9.7", 80, "tcp")              # full-NAT, switched to NAT by a case
SWITCH_BACKEND = Endpoint("10.20.1.13", 80, "tcp")
VIPS = FullNatVips(WEB, WEB_BACKEND, DNS, DNS_BACKEND, FAR, FAR_BACKEND, PINNED, PINNED_SNAT, NARROW,
                   SINGLE, UNROUTED, UNROUTED_BACKEND, SWITCH, SWITCH_BACKEND)

NEIGHBOURS = {a: mac_of(a) for a in (CLIENT, CLIENT2, CLIENT3, ROUTER, WEB_BACKEND.addr,
                                     DNS_BACKEND.addr, SWITCH_BACKEND.addr)}
PORTS = (
    Port(ARM, ARM_MAC, f"{ARM_ADDR}/24", NEIGHBOURS),
    Port(FAR_ARM, FAR_ARM_MAC, f"{FAR_ARM_ADDR}/24", {FAR_BACKEND.addr: mac_of(FAR_BACKEND.addr)}),
)


@pytest.fixture(scope="module")
def baseline(controller: Controller, lb_maps: LbMaps) -> Config:
    return VIPS.baseline(controller, lb_maps)


# --- frames ---

def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S", *, ttl: int = 64,
        payload: bytes = b"") -> bytes:
    return bytes(Ether(src=mac_of(src), dst=ARM_MAC) / IP(src=src, dst=dst, ttl=ttl, id=4242) /
                 TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                     ack=0 if flags == "S" else 1, window=64240) / payload)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"query") -> bytes:
    return bytes(Ether(src=mac_of(src), dst=ARM_MAC) / IP(src=src, dst=dst, id=4242) /
                 UDP(sport=sport, dport=dport) / payload)


def to_vip(vip: Endpoint, sport: int = 40000, flags: str = "S", client: str = CLIENT) -> bytes:
    if vip.proto == "udp":
        return udp(client, vip.addr, sport, vip.port)
    return tcp(client, vip.addr, sport, vip.port, flags)


def reply(backend: Endpoint, snat_addr: str, snat_port: int, flags: str = "SA") -> bytes:
    """The backend's answer to the SNAT address and port it saw."""
    if backend.proto == "udp":
        return udp(backend.addr, snat_addr, backend.port, snat_port, b"answer")
    return tcp(backend.addr, snat_addr, backend.port, snat_port, flags)


ONE_ARM = OneArm(ARM, ARM_MAC, ARM_ADDR, CLIENT, to_vip, mac_of)
counted, open_flow, age_entries = ONE_ARM.counted, ONE_ARM.open_flow, ONE_ARM.age_entries


def vip_drops(controller: Controller, vip: Endpoint) -> int:
    return next(row["drops"] for row in controller.vips() if row["vip"] == str(vip)
                and row["proto"] == vip.proto)


# --- the cases ---

def test_a_syn_leaves_from_the_balancers_own_address_toward_the_backend(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    assert snat[0] == ARM_ADDR
    flows = list(lb_maps.flows())
    assert len(flows) == 1
    assert (flows[0].forwarding, flows[0].snat, flows[0].snat_port) == ("fullnat", *snat)


def test_the_backends_reply_to_the_snat_port_goes_back_to_the_client_from_the_vip(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    frame = reply(WEB_BACKEND, *snat)
    action, out, outcome = counted(lb_maps, run, frame)
    assert (action, outcome) == (XDP_TX, "tx")
    assert_frame(out, rewritten(frame, (WEB.addr, WEB.port), (CLIENT, 40000),
                                (ARM_MAC, mac_of(CLIENT))))


def test_the_flows_next_packets_keep_its_backend_and_its_source_port(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    for flags in ("A", "PA", "A"):
        frame = to_vip(WEB, flags=flags)
        action, out, _ = counted(lb_maps, run, frame)
        assert action == XDP_TX
        assert_frame(out, rewritten(frame, snat, (WEB_BACKEND.addr, WEB_BACKEND.port),
                                    (ARM_MAC, mac_of(WEB_BACKEND.addr))))


def test_udp_query_and_answer_are_full_natted(run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, DNS, DNS_BACKEND, sport=33000)
    frame = reply(DNS_BACKEND, *snat)
    action, out, _ = counted(lb_maps, run, frame)
    assert action == XDP_TX
    assert_frame(out, rewritten(frame, (DNS.addr, DNS.port), (CLIENT, 33000),
                                (ARM_MAC, mac_of(CLIENT))))


def test_a_backend_on_another_arm_sees_that_arms_address_as_source(run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, FAR, FAR_BACKEND, snat_addrs=(FAR_ARM_ADDR,),
                     macs=(FAR_ARM_MAC, mac_of(FAR_BACKEND.addr)), action=XDP_REDIRECT)
    frame = reply(FAR_BACKEND, *snat)
    action, out, outcome = counted(lb_maps, run, frame, FAR_ARM)
    assert (action, outcome) == (XDP_REDIRECT, "redirect")
    assert_frame(out, rewritten(frame, (FAR.addr, FAR.port), (CLIENT, 40000),
                                (ARM_MAC, mac_of(CLIENT))))


def test_configured_snat_addresses_are_used_instead_of_the_fibs(run: Run, lb_maps: LbMaps) -> None:
    seen = {open_flow(lb_maps, run, PINNED, WEB_BACKEND, sport=sport, snat_addrs=PINNED_SNAT)[0]
            for sport in range(41000, 41040)}
    assert seen == set(PINNED_SNAT)      # the flow hash spreads flows over both


def test_concurrent_flows_to_one_backend_each_get_their_own_port(run: Run, lb_maps: LbMaps) -> None:
    ports = [open_flow(lb_maps, run, WEB, WEB_BACKEND, sport=sport)[1] for sport in range(42000, 42300)]
    assert len(set(ports)) == 300
    # Each port's reply reaches its own client port.
    for sport, port in zip(range(42000, 42300, 37), ports[::37]):
        action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, ARM_ADDR, port, "A"))
        assert action == XDP_TX and Ether(out)[TCP].dport == sport


def test_port_collision_a_second_flow_takes_the_other_port_of_a_two_port_range(
        run: Run, lb_maps: LbMaps) -> None:
    first = open_flow(lb_maps, run, NARROW, WEB_BACKEND, sport=40000, ports=range(5000, 5002))
    second = open_flow(lb_maps, run, NARROW, WEB_BACKEND, sport=40001, ports=range(5000, 5002))
    assert {first[1], second[1]} == {5000, 5001}
    for sport, (addr, port) in ((40000, first), (40001, second)):
        action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, addr, port))
        assert action == XDP_TX and Ether(out)[TCP].dport == sport


def test_port_exhaustion_drops_the_new_flow_and_counts_it(run: Run, lb_maps: LbMaps,
                                                         controller: Controller) -> None:
    for sport in (40000, 40001):
        open_flow(lb_maps, run, NARROW, WEB_BACKEND, sport=sport, ports=range(5000, 5002))
    action, _, outcome = counted(lb_maps, run, to_vip(NARROW, 40002))
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_port")
    assert vip_drops(controller, NARROW) == 1
    # The flows that hold the ports go on.
    action, _, _ = counted(lb_maps, run, to_vip(NARROW, 40000, "A"))
    assert action == XDP_TX


def test_an_expired_flows_port_is_taken_over_by_a_new_flow(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40000, ports=range(6000, 6001))
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_syn_timeout_s + 5)
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40001, client=CLIENT2,
              ports=range(6000, 6001))
    # The port's replies now belong to the new client.
    action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, ARM_ADDR, SINGLE_PORT))
    assert action == XDP_TX and (Ether(out)[IP].dst, Ether(out)[TCP].dport) == (CLIENT2, 40001)


def test_a_live_flows_port_is_not_taken_over(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40000, ports=range(6000, 6001))
    counted(lb_maps, run, to_vip(SINGLE, 40000, "A"))           # established
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_syn_timeout_s + 5)  # idle, but far from 900 s
    action, _, outcome = counted(lb_maps, run, to_vip(SINGLE, 40001, client=CLIENT2))
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_port")


def test_a_closed_flows_port_waits_out_time_wait_before_reuse(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40000, ports=range(6000, 6001))
    counted(lb_maps, run, to_vip(SINGLE, 40000, "FA"))
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_closing_timeout_s + 5)     # ended, still TIME_WAIT
    action, _, outcome = counted(lb_maps, run, to_vip(SINGLE, 40001, client=CLIENT2))
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_port")
    age_entries(lb_maps, DEFAULT_LIMITS.snat_time_wait_s + 5)
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40001, client=CLIENT2,
              ports=range(6000, 6001))


def test_a_reply_on_an_expired_entry_passes_and_keeps_the_port_claimed(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    counted(lb_maps, run, to_vip(SINGLE, 40000, "FA"))
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_closing_timeout_s + 5)
    frame = reply(WEB_BACKEND, *snat, flags="A")
    action, out, outcome = counted(lb_maps, run, frame)
    assert (action, outcome, out) == (XDP_PASS, "pass_stale_reply", frame)
    action, _, outcome = counted(lb_maps, run, to_vip(SINGLE, 40001, client=CLIENT2))
    assert outcome == "drop_snat_no_port"


def test_a_reply_to_a_snat_address_on_an_unclaimed_port_passes_untouched(
        run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    frame = reply(WEB_BACKEND, ARM_ADDR, 6001)
    action, out, outcome = counted(lb_maps, run, frame)
    assert (action, outcome, out) == (XDP_PASS, "pass_not_vip", frame)


def test_no_route_to_the_backend_and_no_snat_address_drops_and_counts(
        run: Run, lb_maps: LbMaps, controller: Controller) -> None:
    action, _, outcome = counted(lb_maps, run, to_vip(UNROUTED))
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_source")
    assert vip_drops(controller, UNROUTED) == 1
    assert list(lb_maps.flows()) == []


def test_an_evicted_reply_entry_is_claimed_back_by_the_clients_next_state_change(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    assert lb_maps["snat_rnat"].clear() == 1
    counted(lb_maps, run, to_vip(WEB, flags="A"))      # SYN -> established: a refresh
    action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, *snat, flags="A"))
    assert action == XDP_TX and Ether(out)[TCP].dport == 40000


def test_a_vip_switched_to_nat_keeps_its_full_nat_flows_and_nats_new_ones(
        run: Run, lb_maps: LbMaps, controller: Controller) -> None:
    snat = open_flow(lb_maps, run, SWITCH, SWITCH_BACKEND)
    controller.change(lambda config: {**config, SWITCH: replace(config[SWITCH], forwarding="nat",
                                                                snat_ports=(1024, 32767))})
    frame = to_vip(SWITCH, flags="A")
    _, out, _ = counted(lb_maps, run, frame)
    assert source_of(out) == snat
    frame = to_vip(SWITCH, 40001)
    _, out, _ = counted(lb_maps, run, frame)
    assert source_of(out) == (CLIENT, 40001)           # NAT: the client's own source


def test_snat_settings_read_back_from_the_maps(lb_maps: LbMaps, baseline: Config) -> None:
    assert baseline[PINNED].snat == PINNED_SNAT
    assert baseline[NARROW].snat_ports == (5000, 5001)
    assert baseline[WEB].snat == () and baseline[WEB].snat_ports == (1024, 32767)


# --- ICMP errors and fragments ---

def test_frag_needed_from_the_backend_reaches_the_client_quoting_its_own_packet(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = bytes(Ether(src=mac_of(WEB_BACKEND.addr), dst=ARM_MAC) /
                  IP(src=WEB_BACKEND.addr, dst=snat[0]) / ICMP(type=3, code=4, nexthopmtu=1400) /
                  IP(src=snat[0], dst=WEB_BACKEND.addr, ttl=3) /
                  TCP(sport=snat[1], dport=WEB_BACKEND.port, flags="A"))
    expected = bytes(Ether(src=ARM_MAC, dst=mac_of(CLIENT)) /
                     IP(src=WEB.addr, dst=CLIENT, ttl=63) / ICMP(type=3, code=4, nexthopmtu=1400) /
                     IP(src=CLIENT, dst=WEB.addr, ttl=3) /
                     TCP(sport=40000, dport=WEB.port, flags="A"))
    action, out, outcome = counted(lb_maps, run, error)
    assert (action, outcome) == (XDP_TX, "tx")
    assert_frame(out, expected)


def test_frag_needed_from_a_router_near_the_client_reaches_the_backend_from_the_snat_address(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = bytes(Ether(src=mac_of(ROUTER), dst=ARM_MAC) / IP(src=ROUTER, dst=WEB.addr) /
                  ICMP(type=3, code=4, nexthopmtu=1400) /
                  IP(src=WEB.addr, dst=CLIENT, ttl=3) / TCP(sport=WEB.port, dport=40000, flags="A"))
    expected = bytes(Ether(src=ARM_MAC, dst=mac_of(WEB_BACKEND.addr)) /
                     IP(src=snat[0], dst=WEB_BACKEND.addr, ttl=63) /
                     ICMP(type=3, code=4, nexthopmtu=1400) /
                     IP(src=WEB_BACKEND.addr, dst=snat[0], ttl=3) /
                     TCP(sport=WEB_BACKEND.port, dport=snat[1], flags="A"))
    action, out, _ = counted(lb_maps, run, error)
    assert action == XDP_TX
    assert_frame(out, expected)


def test_an_icmp_error_quoting_no_full_nat_flow_passes(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = bytes(Ether(src=mac_of(WEB_BACKEND.addr), dst=ARM_MAC) /
                  IP(src=WEB_BACKEND.addr, dst=ARM_ADDR) / ICMP(type=3, code=3) /
                  IP(src=ARM_ADDR, dst=WEB_BACKEND.addr) / TCP(sport=1, dport=WEB_BACKEND.port))
    action, out, outcome = counted(lb_maps, run, error)
    assert (action, outcome, out) == (XDP_PASS, "pass_not_vip", error)


def _split(frame: bytes) -> list[bytes]:
    pkt = Ether(frame)
    return [bytes(Ether(src=pkt.src, dst=pkt.dst) / piece) for piece in fragment(pkt[IP], fragsize=1480)]


def test_a_fragmented_query_and_its_fragmented_answer_are_full_natted_whole(
        run: Run, lb_maps: LbMaps) -> None:
    query = bytes(Ether(src=mac_of(CLIENT), dst=ARM_MAC) / IP(src=CLIENT, dst=DNS.addr, id=7777) /
                  UDP(sport=33000, dport=DNS.port) / (bytes(range(256)) * 12))
    pieces = _split(query)
    action, first, _ = counted(lb_maps, run, pieces[0])
    assert action == XDP_TX
    snat = source_of(first)
    assert snat[0] == ARM_ADDR
    expected = _split(rewritten(query, snat, (DNS_BACKEND.addr, DNS_BACKEND.port),
                                (ARM_MAC, mac_of(DNS_BACKEND.addr))))
    assert_frame(first, expected[0])
    for piece, want in zip(pieces[1:], expected[1:]):
        action, out, _ = counted(lb_maps, run, piece)
        assert action == XDP_TX
        assert_frame(out, want)

    answer = bytes(Ether(src=mac_of(DNS_BACKEND.addr), dst=ARM_MAC) /
                   IP(src=DNS_BACKEND.addr, dst=snat[0], id=8888) /
                   UDP(sport=DNS_BACKEND.port, dport=snat[1]) / (b"a" * 4000))
    expected = _split(rewritten(answer, (DNS.addr, DNS.port), (CLIENT, 33000),
                                (ARM_MAC, mac_of(CLIENT))))
    for piece, want in zip(_split(answer), expected):
        action, out, _ = counted(lb_maps, run, piece)
        assert action == XDP_TX
        assert_frame(out, want)


def test_snat_cfg_codec_round_trips() -> None:
    raw = codec.encode_snat_cfg(PINNED_SNAT, 1024, 2047)
    assert codec.decode_snat_cfg(raw) == codec.SnatSettings(PINNED_SNAT, 1024, 2047)
    assert struct.unpack_from("=HH", raw, 4 * DEFAULT_LIMITS.snat_max_addrs + 4) == (1024, 2047)
