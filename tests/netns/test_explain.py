"""`lbctl explain` against real traffic: it names the backend that served a connection, and
asking changes no flow and no counter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from labcli import lab_up, lbctl

from lbctl.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


@pytest.fixture(scope="module")
def lab():
    with lab_up("tx") as the_lab:
        vip = f"{the_lab.vip}:{the_lab.http_port}"
        lbctl(the_lab, "vip", "add", vip)
        for b in the_lab.backends:
            lbctl(the_lab, "backend", "add", vip, f"{b.addr}:{the_lab.http_port}")
        yield the_lab


def out(lab: Lab, *args: str) -> str:
    return lbctl(lab, *args).stdout


# Opens N keep-alive HTTP connections to the VIP, prints "client_addr backend" per connection,
# and holds them open until stdin closes.
_HOLD_OPEN = r"""
import http.client, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(count):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    print(resp.getheader("X-Client-Addr"), resp.getheader("X-Backend"), flush=True)
    conns.append(conn)
sys.stdin.read()
"""


@contextmanager
def open_connections(lab: Lab, count: int) -> Iterator[list[tuple[str, str]]]:
    """(client addr:port, backend name) of `count` connections that stay established: their
    flows live on (an established flow idles out after minutes), however slow the checks are."""
    proc = subprocess.Popen(["ip", "netns", "exec", lab.client.netns, sys.executable, "-c",
                             _HOLD_OPEN, lab.vip, str(lab.http_port), str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        conns = [tuple(proc.stdout.readline().split()) for _ in range(count)]
        assert all(len(c) == 2 for c in conns), f"connections failed: {conns}"
        yield conns  # type: ignore[misc]
    finally:
        proc.kill()
        proc.wait()


def test_explain_names_the_backend_that_served_each_connection(lab):
    by_addr = {b.addr: b.name for b in lab.backends}
    # Open connections: a closed one's flow ends a few seconds after its FIN, and 30 explains
    # can take longer than that on a loaded machine.
    with open_connections(lab, 30) as conns:
        assert {backend for _, backend in conns} == set(by_addr.values())
        for client_addr, backend in conns:
            answer = json.loads(out(lab, "explain", client_addr, f"{lab.vip}:{lab.http_port}",
                                    "--json"))
            # An open flow keeps even a SYN from its tuple, and its next packet alike.
            assert answer["verdict"] == "flow_hit" and answer["tracked_flow"]["backend"] == answer["backend"]
            assert by_addr[answer["backend"].split(":")[0]] == backend, client_addr


def test_explain_of_a_new_flow_is_a_ring_pick_that_real_traffic_then_follows(lab):
    # The client's next source port is unknown, so predict for many and check the real ones.
    results = lab.http_requests(lab.vip, count=20, new_connection=True)
    assert all(r.ok for r in results)
    by_addr = {b.addr: b.name for b in lab.backends}
    lbctl(lab, "flows", "flush")
    for r in results:
        answer = json.loads(out(lab, "explain", r.client_addr, f"{lab.vip}:{lab.http_port}", "--json"))
        assert answer["verdict"] == "ring" and 0 <= answer["slot"] < 65537
        # With the flows gone, the ring alone must still lead to the backend that served it.
        assert by_addr[answer["backend"].split(":")[0]] == r.backend


def _counters(lab: Lab) -> dict:
    """Every counter but pass_not_vip: the lab's hosts keep their neighbours fresh by
    themselves (IPv6 neighbour unreachability detection, a few ICMPv6 frames some seconds
    after traffic), and those frames reach the balancer as non-VIP traffic at any time. An
    explain of a VIP tuple that counted would show in the VIP, backend or other outcome rows."""
    stats = json.loads(out(lab, "stats", "--json"))
    stats["outcomes"].pop("pass_not_vip")
    return stats


def test_explain_changes_no_flow_and_no_counter(lab):
    before_stats = _counters(lab)
    before_flows = json.loads(out(lab, "flows", "list", "--json", "--limit", "100000"))
    for port in range(40000, 40020):
        out(lab, "explain", f"{lab.client.addr}:{port}", f"{lab.vip}:{lab.http_port}")
    assert _counters(lab) == before_stats
    after_flows = json.loads(out(lab, "flows", "list", "--json", "--limit", "100000"))
    assert {(f["client"], f["client_port"]) for f in after_flows} == \
        {(f["client"], f["client_port"]) for f in before_flows}


def test_explain_of_a_non_vip_says_it_passes(lab):
    text = out(lab, "explain", f"{lab.client.addr}:1234", f"{lab.backends[0].addr}:80")
    assert "is not a VIP here" in text
