"""`lbctl explain` against real traffic: it names the backend that served a connection, and
asking changes no flow and no counter."""
from __future__ import annotations

import json
import os

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


def test_explain_names_the_backend_that_served_each_connection(lab):
    by_addr = {b.addr: b.name for b in lab.backends}
    results = lab.http_requests(lab.vip, count=30, new_connection=True)
    assert all(r.ok for r in results)
    for r in results:
        answer = json.loads(out(lab, "explain", r.client_addr, f"{lab.vip}:{lab.http_port}", "--json"))
        assert answer["verdict"] == "flow_hit"
        assert by_addr[answer["backend"].split(":")[0]] == r.backend, r


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


def test_explain_changes_no_flow_and_no_counter(lab):
    before_stats = out(lab, "stats", "--json")
    before_flows = json.loads(out(lab, "flows", "list", "--json", "--limit", "100000"))
    for port in range(40000, 40020):
        out(lab, "explain", f"{lab.client.addr}:{port}", f"{lab.vip}:{lab.http_port}")
    assert out(lab, "stats", "--json") == before_stats
    after_flows = json.loads(out(lab, "flows", "list", "--json", "--limit", "100000"))
    assert {(f["client"], f["client_port"]) for f in after_flows} == \
        {(f["client"], f["client_port"]) for f in before_flows}


def test_explain_of_a_non_vip_says_it_passes(lab):
    text = out(lab, "explain", f"{lab.client.addr}:1234", f"{lab.backends[0].addr}:80")
    assert "is not a VIP here" in text
