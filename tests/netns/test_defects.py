"""Defects an operator found (issue #14), reproduced with real traffic through the lab and the
real CLI: backend ids and their counters, explain's two answers, orphaned state, refused
addresses, the flow listing."""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from labcli import KeepAliveClient, lab_up, lbctl

from lbctl.lab import Lab
from xdp import codec, libbpf
from xdp.maps import monotonic_ns

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


# -- explain: a new connection and a tracked flow, each labelled ---------------------------------
def test_explain_tells_a_new_connection_from_the_next_packet_of_a_closed_flow(clean):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
    served = lab.http_requests(lab.vip, count=1, new_connection=True)[0]   # ends with FIN: closing
    assert served.ok, served
    drained = next(b for b in lab.backends if b.name == served.backend)
    lbctl(lab, "backend", "set", vip, f"{drained.addr}:{lab.http_port}", "--state", "drain")
    answer = lbctl_json(lab, "explain", served.client_addr, vip)
    # A SYN from that port opens a new connection: the ring picks, and never the drained backend.
    assert answer["verdict"] == "ring" and not answer["backend"].startswith(f"{drained.addr}:")
    tracked = answer["tracked_flow"]
    assert tracked["verdict"] == "flow_hit" and tracked["flow_state"] == "closing"
    assert tracked["backend"] == f"{drained.addr}:{lab.http_port}"
    assert "slot" not in tracked and "ring_generation" not in tracked
    text = lbctl(lab, "explain", served.client_addr, vip).stdout
    assert "new connection" in text and "tracked flow" in text and drained.addr in text


def test_explain_of_an_established_flow_keeps_its_backend_and_carries_no_slot(clean):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
    client = KeepAliveClient(lab, lab.vip, lab.http_port, pause_s=0.01)
    try:
        served = client.requests(2)[-1]
        answer = lbctl_json(lab, "explain", client.local, vip)
        by_addr = {b.addr: b.name for b in lab.backends}
        assert answer["verdict"] == "flow_hit" and answer["flow_state"] == "established"
        assert by_addr[answer["backend"].split(":")[0]] == served["backend"]
        assert "slot" not in answer and "ring_generation" not in answer
        assert answer["tracked_flow"]["backend"] == answer["backend"]
    finally:
        client.close()


# -- detach with live flows -----------------------------------------------------------------------
def test_detach_with_live_flows_refuses_without_force_and_says_how_many(clean):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, f"{lab.backends[0].addr}:{lab.http_port}")
    client = KeepAliveClient(lab, lab.vip, lab.http_port, pause_s=0.01)
    try:
        assert all(r.get("status") == 200 for r in client.requests(3))
        proc = lbctl(lab, "detach", "--all", check=False)
        assert proc.returncode == 2 and "1 live flow" in proc.stderr and "--force" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert sorted(a["ifname"] for a in lbctl_json(lab, "status")["attached"]) == sorted(lab.lb_ifaces)
        assert all(r.get("status") == 200 for r in client.requests(3))   # nothing was broken
    finally:
        client.close()


# -- one-sided attach -----------------------------------------------------------------------------
def test_backends_behind_an_interface_without_the_program_are_warned_about(clean):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, f"{lab.backends[0].addr}:{lab.http_port}")
    client_side, backend_side = lab.lb_ifaces
    try:
        lbctl(lab, "detach", backend_side)
        st = lbctl_json(lab, "status")
        assert len(st["warnings"]) == 1 and backend_side in st["warnings"][0] and vip in st["warnings"][0]
        assert "warning" in lbctl(lab, "status").stdout
        proc = lbctl(lab, "attach", client_side)
        assert f"lbctl attach {backend_side}" in proc.stderr
    finally:
        lbctl(lab, "attach", *lab.lb_ifaces)
    assert lbctl_json(lab, "status")["warnings"] == []


# -- listings: numeric order, share digits, stats filter, batch add, big weights -------------------
def test_listings_sort_addresses_numerically(clean):
    lab = clean
    for v in ("10.77.0.10:80", "10.77.0.9:80", "10.77.0.9:8080"):
        lbctl(lab, "vip", "add", v)
    lbctl(lab, "backend", "add", "10.77.0.9:80", "10.77.2.10:80", "10.77.2.2:80", "10.77.2.2:8080")
    assert [v["vip"] for v in lbctl_json(lab, "vip", "list")] == ["10.77.0.9:80", "10.77.0.9:8080", "10.77.0.10:80"]
    assert [b["backend"] for b in lbctl_json(lab, "backend", "list")] == \
        ["10.77.2.2:80", "10.77.2.2:8080", "10.77.2.10:80"]


def test_200_backends_of_weight_1000_in_one_command_and_a_tiny_share_is_visible(clean):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    backends = [f"10.77.{2 + i // 250}.{i % 250 + 1}:8080" for i in range(200)]
    proc = lbctl(lab, "backend", "add", vip, *backends, "--weight", "1000")
    assert proc.stdout.count("+ backend") == 200 and proc.stderr == ""
    rows = lbctl_json(lab, "backend", "list", vip)
    assert len(rows) == 200 and all(r["weight"] == 1000 for r in rows)
    proc = lbctl(lab, "backend", "add", vip, "10.77.9.1:8080", "--weight", "2")
    assert proc.stderr == ""
    table = lbctl(lab, "backend", "list", vip).stdout
    tiny = next(line for line in table.splitlines() if "10.77.9.1:8080" in line)
    assert "0.0%" not in tiny and "0.001" in tiny
    proc = lbctl(lab, "backend", "set", vip, "10.77.9.1:8080", "--weight", "1")
    # 1 of 200,001: a third of a slot of 65537.
    assert "10.77.9.1:8080" in proc.stderr and "no ring slot" in proc.stderr


def test_stats_for_one_vip_and_the_top_rows(clean):
    lab = clean
    vips = [f"{lab.vip}:{lab.http_port}", f"{lab.vip}:8080"]
    for v in vips:
        lbctl(lab, "vip", "add", v)
        lbctl(lab, "backend", "add", v, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
    assert all(r.ok for r in lab.http_requests(lab.vip, count=6, new_connection=True))
    one = lbctl_json(lab, "stats", vips[1])
    assert [v["vip"] for v in one["vips"]] == [vips[1]] and {b["vip"] for b in one["backends"]} == {vips[1]}
    top = lbctl(lab, "stats", "--top", "1").stdout
    assert vips[0] in top and vips[1] not in top
    missing = lbctl(lab, "stats", "10.77.0.99:80", check=False)
    assert missing.returncode == 2 and "vip list" in missing.stderr


# -- messages -------------------------------------------------------------------------------------
def test_messages_say_what_was_wrong_with_this_input_and_what_to_type(clean):
    lab = clean
    proc = lbctl(lab, "detach", "--purge", check=False)
    assert proc.returncode == 2 and "--purge" in proc.stderr and "lbctl detach --all --purge" in proc.stderr
    proc = lbctl(lab, "vip", "del", "10.77.0.99:80", check=False)
    assert proc.returncode == 2 and "lbctl vip list" in proc.stderr and "add it first" not in proc.stderr


# -- flows list: age, idle, expired entries, filters ----------------------------------------------
def _plant_expired_flow(lab: Lab, client: str, client_port: int, vip: str, backend: str, backend_id: int,
                        vip_id: int) -> None:
    """An entry as the LRU table keeps it after its connection closed and the closing timeout
    passed (15 s): the program forwards nothing by it any more."""
    vip_addr, vip_port = vip.split(":")
    be_addr, be_port = backend.split(":")
    now = monotonic_ns()
    entry = codec.NatEntry(addr=codec._be32(be_addr), port=codec._be16(int(be_port)), state=2,
                           backend_id=backend_id, vip_id=vip_id, last_seen_ns=now - 60 * 10**9,
                           created_ns=now - 70 * 10**9)
    fd = libbpf.obj_get(str(lab.bpf_pin_dir / "flows"))
    try:
        libbpf.map_update(fd, codec.encode_flow_key(client, client_port, vip_addr, int(vip_port), "tcp"),
                          bytes(entry))
    finally:
        libbpf.close(fd)


def test_flows_list_hides_expired_entries_shows_age_and_idle_and_filters(clean):
    lab = clean
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
    client = KeepAliveClient(lab, lab.vip, lab.http_port, pause_s=0.01)
    try:
        served = client.requests(2)[-1]
        be = next(b for b in lab.backends if b.name == served["backend"])
        row = backend_row(lab, vip, f"{be.addr}:{lab.http_port}")
        vip_id = lbctl_json(lab, "vip", "list")[0]["vip_id"]
        _plant_expired_flow(lab, lab.client.addr, 40999, vip, f"{be.addr}:{lab.http_port}", row["backend_id"], vip_id)
        live = lbctl_json(lab, "flows", "list")
        assert [(f["client"], f["client_port"]) for f in live] == [tuple_of(client.local)]
        assert live[0]["expired"] is False and live[0]["idle_s"] >= 0 and live[0]["age_s"] >= live[0]["idle_s"]
        every = lbctl_json(lab, "flows", "list", "--all")
        expired = [f for f in every if f["expired"]]
        assert [(f["client_port"], f["state"]) for f in expired] == [(40999, "closing")]
        assert expired[0]["idle_s"] >= 59
        table = lbctl(lab, "flows", "list", "--all").stdout
        assert "IDLE" in table and "AGE" in table
        assert "expired" in next(line for line in table.splitlines() if ":40999" in line)
        other = next(b for b in lab.backends if b is not be)
        assert lbctl_json(lab, "flows", "list", "--backend", f"{other.addr}:{lab.http_port}") == []
        assert len(lbctl_json(lab, "flows", "list", "--backend", f"{be.addr}:{lab.http_port}")) == 1
        assert len(lbctl_json(lab, "flows", "list", "--vip", vip)) == 1
        assert lbctl_json(lab, "flows", "list", "--vip", f"{lab.vip}:8080") == []
        assert len(lbctl_json(lab, "flows", "list", "--client", lab.client.addr)) == 1
        assert lbctl_json(lab, "flows", "list", "--client", f"{lab.client.addr}:1") == []
    finally:
        client.close()


def tuple_of(endpoint: str) -> tuple[str, int]:
    addr, port = endpoint.rsplit(":", 1)
    return addr, int(port)


# -- state that outlives its namespace ------------------------------------------------------------
@pytest.fixture
def own_netns() -> Iterator[str]:
    """A namespace of this test's own with one veth pair (both ends inside) to attach to; its
    pins are removed whatever happens."""
    ns = "df" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(f"/sys/fs/bpf/lbctl/{ns}", ignore_errors=True)


def _wire(ns: str) -> None:

    for argv in (["link", "add", "df0a", "type", "veth", "peer", "name", "df0b"],
                 ["addr", "add", "10.99.0.1/24", "dev", "df0a"],
                 ["link", "set", "df0a", "up"], ["link", "set", "df0b", "up"]):
        subprocess.run(["ip", "-n", ns, *argv], check=True)


def _lbctl_in(ns: str | None, *args: str) -> Any:

    argv = [sys.executable, "-m", "lbctl", *(("-n", ns) if ns else ()), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def test_state_outliving_its_namespace_is_listed_restored_on_attach_and_purgeable(own_netns):
    ns = own_netns
    _wire(ns)
    for args in (("attach", "df0a", "--mode", "generic"), ("vip", "add", "10.99.1.10:80"),
                 ("backend", "add", "10.99.1.10:80", "10.99.0.5:80", "10.99.0.6:80")):
        assert _lbctl_in(ns, *args).returncode == 0

    subprocess.run(["ip", "netns", "del", ns], check=True)        # the namespace goes, the pins stay
    assert ns in json.loads(_lbctl_in(None, "status", "--json").stdout)["orphaned_instances"]
    assert ns in _lbctl_in(None, "status").stdout
    st = json.loads(_lbctl_in(ns, "status", "--json").stdout)
    assert st["namespace_gone"] is True and st["vips"] == 1 and st["attached"] == []
    proc = _lbctl_in(ns, "vip", "list")
    assert proc.returncode == 2 and f"lbctl -n {ns} detach --all --purge" in proc.stderr

    # A namespace of the same name again: the old program and maps are there, attached nowhere.
    subprocess.run(["ip", "netns", "add", ns], check=True)
    _wire(ns)
    proc = _lbctl_in(ns, "explain", "10.99.0.9:4000", "10.99.1.10:80")
    assert proc.returncode == 0 and "attached to no interface" in proc.stdout
    answer = json.loads(_lbctl_in(ns, "explain", "10.99.0.9:4000", "10.99.1.10:80", "--json").stdout)
    assert answer["attached_to"] == []
    proc = _lbctl_in(ns, "attach", "df0a", "--mode", "generic")
    assert proc.returncode == 0 and "restored 1 VIP, 2 backends" in proc.stdout
    assert _lbctl_in(ns, "detach", "--all").returncode == 0
    proc = _lbctl_in(ns, "attach", "df0a", "--mode", "generic", "--fresh")
    assert proc.returncode == 0 and "restored" not in proc.stdout
    assert json.loads(_lbctl_in(ns, "vip", "list", "--json").stdout) == []
    assert _lbctl_in(ns, "vip", "add", "10.99.1.10:80").returncode == 0

    subprocess.run(["ip", "netns", "del", ns], check=True)
    proc = _lbctl_in(ns, "detach", "--all", "--purge")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(f"/sys/fs/bpf/lbctl/{ns}")
    assert ns not in json.loads(_lbctl_in(None, "status", "--json").stdout)["orphaned_instances"]
