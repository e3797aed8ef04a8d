"""Full-NAT over IPv6 with real traffic: IPv6 HTTP through a full-NAT VIP whose backends have
no route back to the client's network, one-arm (client and backends behind the balancer's one
interface, where NAT66 cannot answer) and across a second interface; each backend sees the
balancer's IPv6 address, every concurrent connection its own source port; UDP; the listings
and explain print the SNAT source as [v6]:port."""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterator

import onearm
import pytest
from onearm import HTTP_PORT, Link, OneArm

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

# One bridge carries the backends' subnet (fd00:78:1::/64) and the client's (fd00:78:2::/64);
# the balancer has an address in each on its one interface (eth0). A second bridge, on the
# balancer's eth1, holds one more backend in fd00:78:3::/64. No backend has a route beyond
# its own subnet: a packet from the client's address cannot be answered by any of them.
LB_BACKEND_SIDE, LB_CLIENT_SIDE, LB_FAR_SIDE = "fd00:78:1::1", "fd00:78:2::1", "fd00:78:3::1"
CLIENT = "fd00:78:2::100"
BACKENDS = ("fd00:78:1::11", "fd00:78:1::12", "fd00:78:1::13")
FAR_BACKEND = "fd00:78:3::11"
NAT_VIP, FULLNAT_VIP, FAR_VIP = "fd00:78::10", "fd00:78::11", "fd00:78::12"
CONCURRENT = 120
BACKEND_ROLES = tuple(f"b{i}" for i in range(len(BACKENDS)))


@pytest.fixture(scope="module")
def lab() -> Iterator[OneArm]:
    links = (Link("lb", "sw", "eth0", (f"{LB_BACKEND_SIDE}/64", f"{LB_CLIENT_SIDE}/64")),
             Link("lb", "sw2", "eth1", (f"{LB_FAR_SIDE}/64",)),
             Link("cl", "sw", "eth0", (f"{CLIENT}/64",)),
             Link("far", "sw2", "eth0", (f"{FAR_BACKEND}/64",)),
             *(Link(role, "sw", "eth0", (f"{addr}/64",)) for role, addr in zip(BACKEND_ROLES, BACKENDS)))
    built = OneArm(f"fs{secrets.token_hex(3)}", True, links, (*BACKEND_ROLES, "far"),
                   (NAT_VIP, FULLNAT_VIP, FAR_VIP), LB_CLIENT_SIDE)
    http_vips = [(NAT_VIP, "nat", BACKENDS), (FULLNAT_VIP, "fullnat", BACKENDS),
                 (FAR_VIP, "fullnat", (FAR_BACKEND,))]
    with onearm.running(built, ["eth0", "eth1"], http_vips, FULLNAT_VIP, BACKENDS):
        yield built


def get(lab: OneArm, vip: str, count: int = 1) -> list[dict[str, str]]:
    """`count` HTTP GETs from the client to [vip]:80, one connection each: who answered, and
    the peer address it saw."""
    code = ("import http.client, json\n"
            f"for i in range({count}):\n"
            f"    c = http.client.HTTPConnection('{vip}', {HTTP_PORT}, timeout=5); c.request('GET', '/')\n"
            "    r = c.getresponse(); r.read()\n"
            "    print(json.dumps({'status': r.status, 'backend': r.getheader('X-Backend'),\n"
            "                      'seen_as': r.getheader('X-Client-Addr')}))\n"
            "    c.close()\n")
    out = lab.run("cl", sys.executable, "-I", "-S", "-c", code, timeout_s=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_nat66_cannot_answer_here_the_backends_have_no_route_to_the_client(lab: OneArm) -> None:
    proc = lab.run("cl", sys.executable, "-I", "-S", "-c",
                   "import socket\n"
                   f"socket.create_connection(('{NAT_VIP}', {HTTP_PORT}), timeout=2)\n", check=False)
    assert proc.returncode != 0 and "timed out" in proc.stderr, proc.stderr


def test_concurrent_ipv6_connections_through_one_arm_full_nat_all_succeed(lab: OneArm) -> None:
    onearm.check_concurrent(lab, FULLNAT_VIP, CONCURRENT, LB_BACKEND_SIDE, BACKEND_ROLES)


def test_a_backend_behind_another_interface_with_no_route_back_is_reached_through_full_nat(
        lab: OneArm) -> None:
    answers = get(lab, FAR_VIP, 20)
    assert [a["status"] for a in answers] == [200] * 20
    assert {a["backend"] for a in answers} == {"far"}
    # The far backend sees the balancer's address on its own link, never the client's.
    assert {a["seen_as"].rsplit(":", 1)[0] for a in answers} == {LB_FAR_SIDE}
    assert lab.run("far", "ip", "-6", "route", "get", CLIENT, check=False).returncode != 0


def test_udp_over_ipv6_full_nat_is_answered_from_the_vip(lab: OneArm) -> None:
    onearm.check_udp_from_vip(lab, FULLNAT_VIP)


def test_listings_and_explain_show_the_ipv6_snat_source(lab: OneArm) -> None:
    vips = {(v["vip"], v["proto"]): v for v in json.loads(lab.lbctl("vip", "list", "--json").stdout)}
    row = vips[(f"[{FULLNAT_VIP}]:{HTTP_PORT}", "tcp")]
    assert (row["forwarding"], row["snat"], row["snat_ports"]) == ("fullnat", "fib", "1024-32767")
    with onearm.held_connection(lab, FULLNAT_VIP) as port:
        ans = json.loads(lab.lbctl("explain", f"[{CLIENT}]:{port}", f"[{FULLNAT_VIP}]:{HTTP_PORT}",
                                   "--json").stdout)
        assert (ans["forwarding"], ans["snat"]) == ("fullnat", LB_BACKEND_SIDE)
        flows = json.loads(lab.lbctl("flows", "list", "--client", f"[{CLIENT}]:{port}", "--json").stdout)
        assert ans["tracked_flow"]["snat"] == f"[{flows[0]['snat']}]:{flows[0]['snat_port']}"
        table = lab.lbctl("flows", "list", "--client", f"[{CLIENT}]:{port}").stdout
        assert f"[{LB_BACKEND_SIDE}]:{flows[0]['snat_port']}" in table
    vips = {(v["vip"], v["proto"]): v for v in json.loads(lab.lbctl("vip", "list", "--json").stdout)}
    assert vips[(f"[{FULLNAT_VIP}]:{HTTP_PORT}", "tcp")]["new_flows"] >= 1
