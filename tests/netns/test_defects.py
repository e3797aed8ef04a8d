"""Defects an operator found (issue #14), reproduced with real traffic through the lab and the
real CLI: backend ids and their counters, explain's two answers, orphaned state, refused
addresses, the flow listing."""
from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from labcli import KeepAliveClient, lab_up, lbctl

from lbctl.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up("df") as the_lab:
        yield the_lab


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """Each test starts and ends with no VIPs and no flows."""
    yield lab
    for v in lbctl_json(lab, "vip", "list"):
        lbctl(lab, "vip", "del", v["vip"], "--proto", v["proto"])
    lbctl(lab, "flows", "flush")


def lbctl_json(lab: Lab, *args: str) -> Any:
    return json.loads(lbctl(lab, *args, "--json").stdout)


def backend_row(lab: Lab, vip: str, backend: str) -> dict[str, Any]:
    return next(r for r in lbctl_json(lab, "backend", "list", vip) if r["backend"] == backend)


def test_a_new_backend_never_inherits_the_id_and_counters_of_a_deleted_one_with_live_flows(clean):
    lab = clean
    vip_a, vip_b = f"{lab.vip}:{lab.http_port}", f"{lab.vip}:8080"
    be1, be2 = (f"{b.addr}:{lab.http_port}" for b in lab.backends[:2])
    lbctl(lab, "vip", "add", vip_a)
    lbctl(lab, "backend", "add", vip_a, be1)
    old_id = backend_row(lab, vip_a, be1)["backend_id"]
    client = KeepAliveClient(lab, lab.vip, lab.http_port, pause_s=0.01)
    try:
        assert all(r.get("status") == 200 for r in client.requests(20))
        lbctl(lab, "backend", "del", vip_a, be1)       # its established connection goes on
        lbctl(lab, "vip", "add", vip_b)
        lbctl(lab, "backend", "add", vip_b, be2)
        fresh = backend_row(lab, vip_b, be2)
        assert fresh["backend_id"] != old_id
        assert (fresh["packets"], fresh["bytes"]) == (0, 0)
        # The old connection keeps carrying traffic: none of it may show under the new backend.
        assert all(r.get("status") == 200 for r in client.requests(20))
        fresh = backend_row(lab, vip_b, be2)
        assert (fresh["packets"], fresh["bytes"], fresh["new_flows"]) == (0, 0, 0)
    finally:
        client.close()


@pytest.mark.parametrize(("args", "why"), [
    (("vip", "add", "127.0.0.1:81"), "loopback"),
    (("vip", "add", "224.0.0.251:5353", "--proto", "udp"), "unicast"),
    (("backend", "add", "{vip}", "127.0.0.1:80"), "loopback"),
    (("backend", "add", "{vip}", "{broadcast}:80"), "broadcast address of"),
    (("backend", "add", "{vip}", "0.0.0.0:80"), "unicast"),
])
def test_addresses_that_cannot_work_are_refused_in_one_line_and_change_nothing(clean, args, why):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    backend_net = next(i for i in lab.lb.ifaces if i.network != lab.client.ifaces[0].network)
    broadcast = ipaddress.IPv4Interface(f"{backend_net.addr}/{backend_net.prefixlen}").network.broadcast_address
    before = (lbctl(lab, "vip", "list", "--json").stdout, lbctl(lab, "backend", "list", "--json").stdout)
    proc = lbctl(lab, *(a.format(vip=vip, broadcast=broadcast) for a in args), check=False)
    assert proc.returncode == 2, proc
    assert why in proc.stderr and "hint:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (lbctl(lab, "vip", "list", "--json").stdout, lbctl(lab, "backend", "list", "--json").stdout) == before
