"""Full-NAT over IPv6 in the XDP program, packet by packet through BPF_PROG_TEST_RUN, byte for
byte: both addresses rewritten, the source port claimed per flow without collisions, replies
matched by the claimed port, expiry and take-over, exhaustion, ICMPv6 errors both ways, IPv6
that is no full-NAT traffic left untouched, a mode switch."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from fullnat_cases import SINGLE_PORT, FullNatVips, OneArm, Run, assert_frame, rewritten, source_of
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lbctl.bench.routed import Port
from lbctl.control import Controller
from lbctl.model import Config
from xdp import codec
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS, DP_FLAGS
from xdp.maps import LbMaps

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps"),
    pytest.mark.usefixtures("fresh_dataplane"),
]
NETNS_PREFIX = "fs"      # this stream's namespaces

# One arm carries clients and backends alike (one-arm); a second arm has a backend subnet of
# its own, to show the default SNAT address is the balancer's address toward the backend.
ARM, ARM_MAC, ARM_ADDR = "f6a", "02:00:76:01:00:01", "fd00:76:1::1"
FAR_ARM, FAR_ARM_MAC, FAR_ARM_ADDR = "f6b", "02:00:76:02:00:01", "fd00:76:2::1"
CLIENT, CLIENT2 = "fd00:76:1::100", "fd00:76:1::101"
ROUTER = "fd00:76:1::fe"                                        # a router on the clients' side

WEB = Endpoint("fd00:76:9::1", 80, "tcp")
WEB_BACKEND = Endpoint("fd00:76:1::11", 8080, "tcp")
DNS = Endpoint("fd00:76:9::1", 53, "udp")
DNS_BACKEND = Endpoint("fd00:76:1::12", 5353, "udp")
FAR = Endpoint("fd00:76:9::2", 80, "tcp")
FAR_BACKEND = Endpoint("fd00:76:2::11", 80, "tcp")
PINNED = Endpoint("fd00:76:9::3", 80, "tcp")                   # --snat with two addresses
PINNED_SNAT = ("fd00:76:1::201", "fd00:76:1::202")
NARROW = Endpoint("fd00:76:9::4", 80, "tcp")                   # two source ports: 5000-5001
SINGLE = Endpoint("fd00:76:9::5", 80, "tcp")                   # one source port: 6000
UNROUTED = Endpoint("fd00:76:9::6", 80, "tcp")
UNROUTED_BACKEND = Endpoint("2001:db8:ffff::77", 80, "tcp")    # no route: no source to pick
SWITCH = Endpoint("fd00:76:9::7", 80, "tcp")                   # full-NAT, switched to NAT by a case
SWITCH_BACKEND = Endpoint("fd00:76:1::13", 80, "tcp")
VIPS = FullNatVips(WEB, WEB_BACKEND, DNS, DNS_BACKEND, FAR, FAR_BACKEND, PINNED, PINNED_SNAT, NARROW,
                   SINGLE, UNROUTED, UNROUTED_BACKEND, SWITCH, SWITCH_BACKEND)
NAT66 = Endpoint("fd00:76:9::8", 80, "tcp")                    # a plain NAT66 VIP beside them

MACS = {CLIENT: "02:00:76:01:01:00", CLIENT2: "02:00:76:01:01:01", ROUTER: "02:00:76:01:00:fe",
        WEB_BACKEND.addr: "02:00:76:01:00:11", DNS_BACKEND.addr: "02:00:76:01:00:12",
        SWITCH_BACKEND.addr: "02:00:76:01:00:13", FAR_BACKEND.addr: "02:00:76:02:00:11"}
PORTS = (
    Port(ARM, ARM_MAC, "10.76.1.1/24", {a: m for a, m in MACS.items() if a != FAR_BACKEND.addr},
         cidr6=f"{ARM_ADDR}/64"),
    Port(FAR_ARM, FAR_ARM_MAC, "10.76.2.1/24", {FAR_BACKEND.addr: MACS[FAR_BACKEND.addr]},
         cidr6=f"{FAR_ARM_ADDR}/64"),
)


@pytest.fixture(scope="module")
def baseline(controller: Controller, lb_maps: LbMaps) -> Config:
    return VIPS.baseline(controller, lb_maps, nat=[(NAT66, SWITCH_BACKEND)])


# --- frames ---

def frame(src: str, dst: str, l4: Packet, *, hlim: int = 64, ingress_mac: str = ARM_MAC) -> bytes:
    return bytes(Ether(src=MACS.get(src, "02:00:76:99:99:99"), dst=ingress_mac) /
                 IPv6(src=src, dst=dst, hlim=hlim) / l4)


def segment(sport: int, dport: int, flags: str) -> Packet:
    return TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 1,
               window=64240)


def to_vip(vip: Endpoint, sport: int = 40000, flags: str = "S", client: str = CLIENT) -> bytes:
    if vip.proto == "udp":
        return frame(client, vip.addr, UDP(sport=sport, dport=vip.port) / b"query")
    return frame(client, vip.addr, segment(sport, vip.port, flags))


def reply(backend: Endpoint, snat_addr: str, snat_port: int, flags: str = "SA",
          ingress_mac: str = ARM_MAC) -> bytes:
    """The backend's answer to the SNAT address and port it saw."""
    if backend.proto == "udp":
        l4: Packet = UDP(sport=backend.port, dport=snat_port) / b"answer"
    else:
        l4 = segment(backend.port, snat_port, flags)
    return frame(backend.addr, snat_addr, l4, ingress_mac=ingress_mac)


ONE_ARM = OneArm(ARM, ARM_MAC, ARM_ADDR, CLIENT, to_vip, MACS.__getitem__)
counted, open_flow, age_entries = ONE_ARM.counted, ONE_ARM.open_flow, ONE_ARM.age_entries


# --- new flows, hits, replies ---

def test_a_syn_to_an_ipv6_full_nat_vip_leaves_from_the_balancers_address_toward_the_backend(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    flows = list(lb_maps.flows())
    assert len(flows) == 1
    assert (flows[0].forwarding, flows[0].snat, flows[0].snat_port) == ("fullnat", *snat)
    assert (flows[0].client, flows[0].backend) == (CLIENT, WEB_BACKEND.addr)
    assert sum(1 for _ in lb_maps["snat_rnat6"].items()) == 1
    assert list(lb_maps["snat_flows"].items()) == [] and list(lb_maps["flows6"].items()) == []


def test_the_backends_reply_to_the_snat_port_goes_back_to_the_client_from_the_vip(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    raw = reply(WEB_BACKEND, *snat)
    action, out, outcome = counted(lb_maps, run, raw, ARM)
    assert (action, outcome) == (XDP_TX, "tx")
    assert_frame(out, rewritten(raw, (WEB.addr, WEB.port), (CLIENT, 40000), (ARM_MAC, MACS[CLIENT])))


def test_the_flows_next_packets_keep_its_backend_and_its_source_port(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    for flags in ("A", "PA", "A"):
        raw = to_vip(WEB, flags=flags)
        action, out, _ = counted(lb_maps, run, raw, ARM)
        assert action == XDP_TX
        assert_frame(out, rewritten(raw, snat, (WEB_BACKEND.addr, WEB_BACKEND.port),
                                    (ARM_MAC, MACS[WEB_BACKEND.addr])))


def test_udp_query_and_answer_are_full_natted(run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, DNS, DNS_BACKEND, sport=33000)
    raw = reply(DNS_BACKEND, *snat)
    action, out, _ = counted(lb_maps, run, raw, ARM)
    assert action == XDP_TX
    assert_frame(out, rewritten(raw, (DNS.addr, DNS.port), (CLIENT, 33000), (ARM_MAC, MACS[CLIENT])))


def test_a_backend_on_another_arm_sees_that_arms_address_as_source(run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, FAR, FAR_BACKEND, snat_addrs=(FAR_ARM_ADDR,),
                     macs=(FAR_ARM_MAC, MACS[FAR_BACKEND.addr]), action=XDP_REDIRECT)
    raw = reply(FAR_BACKEND, *snat, ingress_mac=FAR_ARM_MAC)
    action, out, outcome = counted(lb_maps, run, raw, FAR_ARM)
    assert (action, outcome) == (XDP_REDIRECT, "redirect")
    assert_frame(out, rewritten(raw, (FAR.addr, FAR.port), (CLIENT, 40000), (ARM_MAC, MACS[CLIENT])))


def test_configured_ipv6_snat_addresses_are_used_instead_of_the_fibs(run: Run, lb_maps: LbMaps) -> None:
    seen = {open_flow(lb_maps, run, PINNED, WEB_BACKEND, sport=sport, snat_addrs=PINNED_SNAT)[0]
            for sport in range(41000, 41040)}
    assert seen == set(PINNED_SNAT)      # the flow hash spreads flows over both


# --- ports: collisions, exhaustion, expiry and reuse ---

def test_concurrent_flows_to_one_backend_each_get_their_own_port(run: Run, lb_maps: LbMaps) -> None:
    ports = [open_flow(lb_maps, run, WEB, WEB_BACKEND, sport=sport)[1] for sport in range(42000, 42200)]
    assert len(set(ports)) == 200
    for sport, port in zip(range(42000, 42200, 37), ports[::37]):
        action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, ARM_ADDR, port, "A"), ARM)
        assert action == XDP_TX and Ether(out)[TCP].dport == sport


def test_port_collision_a_second_flow_takes_the_other_port_of_a_two_port_range(
        run: Run, lb_maps: LbMaps) -> None:
    first = open_flow(lb_maps, run, NARROW, WEB_BACKEND, sport=40000, ports=range(5000, 5002))
    second = open_flow(lb_maps, run, NARROW, WEB_BACKEND, sport=40001, ports=range(5000, 5002))
    assert {first[1], second[1]} == {5000, 5001}
    for sport, (addr, port) in ((40000, first), (40001, second)):
        action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, addr, port), ARM)
        assert action == XDP_TX and Ether(out)[TCP].dport == sport


def test_port_exhaustion_drops_the_new_flow_and_counts_it(run: Run, lb_maps: LbMaps,
                                                         controller: Controller) -> None:
    for sport in (40000, 40001):
        open_flow(lb_maps, run, NARROW, WEB_BACKEND, sport=sport, ports=range(5000, 5002))
    action, _, outcome = counted(lb_maps, run, to_vip(NARROW, 40002), ARM)
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_port")
    assert next(r["drops"] for r in controller.vips() if r["vip"] == str(NARROW)) == 1
    action, _, _ = counted(lb_maps, run, to_vip(NARROW, 40000, "A"), ARM)
    assert action == XDP_TX


def test_an_expired_flows_port_is_taken_over_by_a_new_flow(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_syn_timeout_s + 5)
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40001, client=CLIENT2, ports=range(6000, 6001))
    action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, ARM_ADDR, SINGLE_PORT), ARM)
    assert action == XDP_TX and (Ether(out)[IPv6].dst, Ether(out)[TCP].dport) == (CLIENT2, 40001)


def test_a_live_flows_port_is_not_taken_over(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    counted(lb_maps, run, to_vip(SINGLE, 40000, "A"), ARM)         # established
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_syn_timeout_s + 5)     # idle, far from 900 s
    action, _, outcome = counted(lb_maps, run, to_vip(SINGLE, 40001, client=CLIENT2), ARM)
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_port")


def test_a_closed_flows_port_waits_out_time_wait_before_reuse(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    counted(lb_maps, run, to_vip(SINGLE, 40000, "FA"), ARM)
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_closing_timeout_s + 5)     # ended, still TIME_WAIT
    action, _, outcome = counted(lb_maps, run, to_vip(SINGLE, 40001, client=CLIENT2), ARM)
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_port")
    age_entries(lb_maps, DEFAULT_LIMITS.snat_time_wait_s + 5)
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, sport=40001, client=CLIENT2, ports=range(6000, 6001))


def test_a_reply_on_an_expired_entry_passes_and_keeps_the_port_claimed(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    counted(lb_maps, run, to_vip(SINGLE, 40000, "FA"), ARM)
    age_entries(lb_maps, DEFAULT_LIMITS.tcp_closing_timeout_s + 5)
    raw = reply(WEB_BACKEND, *snat, flags="A")
    action, out, outcome = counted(lb_maps, run, raw, ARM)
    assert (action, outcome, out) == (XDP_PASS, "pass_stale_reply", raw)
    _, _, outcome = counted(lb_maps, run, to_vip(SINGLE, 40001, client=CLIENT2), ARM)
    assert outcome == "drop_snat_no_port"


def test_an_evicted_reply_entry_is_claimed_back_by_the_clients_next_state_change(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    assert lb_maps["snat_rnat6"].clear() == 1
    counted(lb_maps, run, to_vip(WEB, flags="A"), ARM)      # SYN -> established: a refresh
    action, out, _ = counted(lb_maps, run, reply(WEB_BACKEND, *snat, flags="A"), ARM)
    assert action == XDP_TX and Ether(out)[TCP].dport == 40000


def test_no_route_to_the_backend_and_no_snat_address_drops_and_counts(
        run: Run, lb_maps: LbMaps) -> None:
    action, _, outcome = counted(lb_maps, run, to_vip(UNROUTED), ARM)
    assert (action, outcome) == (XDP_DROP, "drop_snat_no_source")
    assert list(lb_maps.flows()) == []


# --- what is not full-NAT traffic stays untouched ---

@pytest.mark.parametrize(("what", "raw"), [
    ("a reply to the SNAT address on an unclaimed port",
     frame(WEB_BACKEND.addr, ARM_ADDR, segment(WEB_BACKEND.port, 6001, "SA"))),
    ("a backend's own connection to the balancer's address",
     frame(WEB_BACKEND.addr, ARM_ADDR, segment(50000, 22, "S"))),
    ("IPv6 to an address that is no VIP", frame(CLIENT, "fd00:76:9::99", segment(40000, 80, "S"))),
    ("the VIP's address on a port that is no VIP", frame(CLIENT, WEB.addr, segment(40000, 81, "S"))),
])
def test_ipv6_that_is_no_full_nat_traffic_passes_untouched(run: Run, lb_maps: LbMaps, what: str,
                                                          raw: bytes) -> None:
    open_flow(lb_maps, run, SINGLE, WEB_BACKEND, ports=range(6000, 6001))
    action, out, outcome = counted(lb_maps, run, raw, ARM)
    assert (action, outcome, out) == (XDP_PASS, "pass_not_vip", raw), what


def test_a_nat66_vip_beside_full_nat_ones_keeps_the_clients_source(run: Run, lb_maps: LbMaps) -> None:
    _, out, _ = counted(lb_maps, run, to_vip(NAT66), ARM)
    assert source_of(out) == (CLIENT, 40000)
    assert list(lb_maps["snat_flows6"].items()) == []


def test_a_vip_switched_to_nat_keeps_its_full_nat_flows_and_nats_new_ones(
        run: Run, lb_maps: LbMaps, controller: Controller) -> None:
    snat = open_flow(lb_maps, run, SWITCH, SWITCH_BACKEND)
    controller.change(lambda config: {**config, SWITCH: replace(config[SWITCH], forwarding="nat")})
    _, out, _ = counted(lb_maps, run, to_vip(SWITCH, flags="A"), ARM)
    assert source_of(out) == snat
    _, out, _ = counted(lb_maps, run, to_vip(SWITCH, 40001), ARM)
    assert source_of(out) == (CLIENT, 40001)           # NAT66: the client's own source


# --- ICMPv6 errors, both ways ---

def test_packet_too_big_from_the_backend_reaches_the_client_quoting_its_own_packet(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = frame(WEB_BACKEND.addr, snat[0], ICMPv6PacketTooBig(mtu=1280) /
                  IPv6(src=snat[0], dst=WEB_BACKEND.addr, hlim=3) /
                  TCP(sport=snat[1], dport=WEB_BACKEND.port, flags="A"))
    expected = bytes(Ether(src=ARM_MAC, dst=MACS[CLIENT]) / IPv6(src=WEB.addr, dst=CLIENT, hlim=63) /
                     ICMPv6PacketTooBig(mtu=1280) / IPv6(src=CLIENT, dst=WEB.addr, hlim=3) /
                     TCP(sport=40000, dport=WEB.port, flags="A"))
    action, out, outcome = counted(lb_maps, run, error, ARM)
    assert (action, outcome) == (XDP_TX, "tx")
    assert_frame(out, expected)


def test_a_routers_packet_too_big_about_the_backend_keeps_the_routers_source(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = frame(ROUTER, snat[0], ICMPv6PacketTooBig(mtu=1280) /
                  IPv6(src=snat[0], dst=WEB_BACKEND.addr, hlim=3) /
                  TCP(sport=snat[1], dport=WEB_BACKEND.port, flags="A"))
    expected = bytes(Ether(src=ARM_MAC, dst=MACS[CLIENT]) / IPv6(src=ROUTER, dst=CLIENT, hlim=63) /
                     ICMPv6PacketTooBig(mtu=1280) / IPv6(src=CLIENT, dst=WEB.addr, hlim=3) /
                     TCP(sport=40000, dport=WEB.port, flags="A"))
    action, out, _ = counted(lb_maps, run, error, ARM)
    assert action == XDP_TX
    assert_frame(out, expected)


def test_port_unreachable_from_the_backend_reaches_the_client_from_the_vip(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, DNS, DNS_BACKEND, sport=33000)
    error = frame(DNS_BACKEND.addr, snat[0], ICMPv6DestUnreach(code=4) /
                  IPv6(src=snat[0], dst=DNS_BACKEND.addr) /
                  UDP(sport=snat[1], dport=DNS_BACKEND.port) / b"query")
    expected = bytes(Ether(src=ARM_MAC, dst=MACS[CLIENT]) / IPv6(src=DNS.addr, dst=CLIENT, hlim=63) /
                     ICMPv6DestUnreach(code=4) / IPv6(src=CLIENT, dst=DNS.addr) /
                     UDP(sport=33000, dport=DNS.port) / b"query")
    action, out, _ = counted(lb_maps, run, error, ARM)
    assert action == XDP_TX
    assert_frame(out, expected)


def test_packet_too_big_from_a_router_near_the_client_reaches_the_backend_from_the_snat_address(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = frame(ROUTER, WEB.addr, ICMPv6PacketTooBig(mtu=1280) /
                  IPv6(src=WEB.addr, dst=CLIENT, hlim=3) / TCP(sport=WEB.port, dport=40000, flags="A"))
    expected = bytes(Ether(src=ARM_MAC, dst=MACS[WEB_BACKEND.addr]) /
                     IPv6(src=snat[0], dst=WEB_BACKEND.addr, hlim=63) / ICMPv6PacketTooBig(mtu=1280) /
                     IPv6(src=WEB_BACKEND.addr, dst=snat[0], hlim=3) /
                     TCP(sport=WEB_BACKEND.port, dport=snat[1], flags="A"))
    action, out, _ = counted(lb_maps, run, error, ARM)
    assert action == XDP_TX
    assert_frame(out, expected)


def test_an_icmpv6_error_quoting_no_full_nat_flow_passes_untouched(run: Run, lb_maps: LbMaps) -> None:
    open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = frame(WEB_BACKEND.addr, ARM_ADDR, ICMPv6DestUnreach(code=4) /
                  IPv6(src=ARM_ADDR, dst=WEB_BACKEND.addr) / TCP(sport=1, dport=WEB_BACKEND.port))
    action, out, outcome = counted(lb_maps, run, error, ARM)
    assert (action, outcome, out) == (XDP_PASS, "pass_not_vip", error)


def test_an_icmpv6_error_with_hop_limit_1_goes_to_the_kernel(run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    error = frame(WEB_BACKEND.addr, snat[0], ICMPv6PacketTooBig(mtu=1280) /
                  IPv6(src=snat[0], dst=WEB_BACKEND.addr) /
                  TCP(sport=snat[1], dport=WEB_BACKEND.port, flags="A"), hlim=1)
    action, out, outcome = counted(lb_maps, run, error, ARM)
    assert (action, outcome, out) == (XDP_PASS, "pass_ttl", error)


# --- the control plane's view ---

def test_ipv6_snat_settings_read_back_from_the_maps(baseline: Config) -> None:
    assert baseline[PINNED].snat == PINNED_SNAT
    assert baseline[NARROW].snat_ports == (5000, 5001)
    assert baseline[WEB].snat == ()


def test_ipv6_snat_cfg_codec_round_trips() -> None:
    raw = codec.encode_snat_cfg(PINNED_SNAT, 1024, 2047)
    assert codec.decode_snat_cfg(raw) == codec.SnatSettings(PINNED_SNAT, 1024, 2047)


# --- dp_config: the reverse lookup only while full-NAT is in use ---

def test_the_planner_switches_the_reverse_lookup_on_only_while_full_nat_is_in_use(
        run: Run, lb_maps: LbMaps, controller: Controller, baseline: Config) -> None:
    assert lb_maps.dp_flags() & DP_FLAGS["fullnat6"]
    snat = open_flow(lb_maps, run, SWITCH, SWITCH_BACKEND)
    # Only NAT66 VIPs left, but the switched VIP's full-NAT flow still holds its port: its
    # replies must still be found, so the flag stays.
    controller.change(lambda config: {NAT66: config[NAT66],
                                      SWITCH: replace(config[SWITCH], forwarding="nat")})
    assert lb_maps.dp_flags() & DP_FLAGS["fullnat6"]
    action, out, _ = counted(lb_maps, run, reply(SWITCH_BACKEND, *snat), ARM)
    assert action == XDP_TX and Ether(out)[TCP].dport == 40000
    # Once the entries are gone, the next change switches it off: the lookup is skipped.
    lb_maps.flush_flows()
    controller.change(lambda config: {NAT66: config[NAT66]})
    assert lb_maps.dp_flags() == 0


def test_with_the_flag_off_a_packet_to_a_claimed_port_is_not_looked_up(
        run: Run, lb_maps: LbMaps) -> None:
    snat = open_flow(lb_maps, run, WEB, WEB_BACKEND)
    kept = lb_maps.dp_flags()
    try:
        lb_maps.put_dp_flags(kept & ~DP_FLAGS["fullnat6"])
        raw = reply(WEB_BACKEND, *snat)
        action, out, outcome = counted(lb_maps, run, raw, ARM)
        assert (action, outcome, out) == (XDP_PASS, "pass_not_vip", raw)
    finally:
        lb_maps.put_dp_flags(kept)
    action, _, _ = counted(lb_maps, run, reply(WEB_BACKEND, *snat), ARM)
    assert action == XDP_TX
