"""The per-driver attach mode on real interfaces: the lab's veths get tc by default and say
why, --mode still overrides (and native still balances), and every driver the table sends to
generic for lack of native XDP really refuses native here."""
from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator

import pytest
from labcli import lab_up, lbctl

from lbctl.lab import Lab
from xdp.modes import GENERIC, MODE_BY_DRIVER, TC

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up("vm", attach=False) as the_lab:
        yield the_lab


@pytest.fixture
def detached(lab: Lab) -> Lab:
    lbctl(lab, "detach", "--all", check=False)
    assert status(lab) == {}
    return lab


def status(lab: Lab) -> dict[str, dict]:
    data = json.loads(lbctl(lab, "status", "--json").stdout)
    return {a["ifname"]: a for a in data["attached"]}


def balanced_to_every_backend(lab: Lab) -> bool:
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    try:
        for b in lab.backends:
            lbctl(lab, "backend", "add", vip, f"{b.addr}:{lab.http_port}")
        bodies = Counter(lab.http_get(lab.vip, lab.http_port, count=60, new_connection=True))
    finally:
        lbctl(lab, "vip", "del", vip)
    return set(bodies) == {b.name for b in lab.backends}


def test_veth_gets_tc_by_default_and_status_says_why(detached: Lab):
    out = lbctl(detached, "attach", *detached.lb_ifaces).stdout
    assert out.count(f"({TC}, prog") == 2 and "keeps the socket buffer as it is" in out
    got = status(detached)
    assert {name: a["mode"] for name, a in got.items()} == dict.fromkeys(detached.lb_ifaces, TC)
    for a in got.values():
        assert a["driver"] == "veth" and a["why"] == MODE_BY_DRIVER["veth"].reason
    table = lbctl(detached, "status").stdout
    assert "WHY" in table and MODE_BY_DRIVER["veth"].reason in table
    assert balanced_to_every_backend(detached)


def test_mode_overrides_and_a_later_attach_without_mode_keeps_it(detached: Lab):
    lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "native")
    got = status(detached)
    assert {a["mode"] for a in got.values()} == {"native"}
    assert all("set by --mode native (veth defaults to tc)" == a["why"] for a in got.values())
    lbctl(detached, "attach", *detached.lb_ifaces)       # no --mode: nothing switches
    assert {a["mode"] for a in status(detached).values()} == {"native"}
    assert balanced_to_every_backend(detached)


# Each driver the table sends to generic because it has no native XDP, and how to make one.
_MAKE = {
    "bridge": ["type", "bridge"],
    "vxlan": ["type", "vxlan", "id", "77", "dstport", "4789", "dev", "eth1"],
    "macvlan": ["link", "eth1", "type", "macvlan"],
    "ifb": ["type", "ifb"],
}


def test_every_driver_the_table_calls_without_native_xdp_refuses_native(detached: Lab):
    no_native = sorted(d for d, c in MODE_BY_DRIVER.items() if c.mode == GENERIC and d != "veth")
    assert no_native == sorted(_MAKE)
    ip = ["ip", "-n", detached.lb.netns, "link"]
    for driver in no_native:
        name = f"vm{driver[:4]}0"
        subprocess.run([*ip, "add", name, *_MAKE[driver]], check=True, capture_output=True)
        try:
            subprocess.run([*ip, "set", name, "up"], check=True, capture_output=True)
            refused = lbctl(detached, "attach", name, "--mode", "native", check=False)
            assert refused.returncode == 3 and "Operation not supported" in refused.stderr, driver
            lbctl(detached, "attach", name)
            got = status(detached)[name]
            assert (got["driver"], got["mode"]) == (driver, "generic")
            assert got["why"] == f"{driver}: the driver has no native XDP"
            lbctl(detached, "detach", name)
        finally:
            subprocess.run([*ip, "del", name], check=False, capture_output=True)
