"""`lbctl doctor` in a real lab: the healthy lab passes every check, and each fault injected on
purpose (then undone) is named, with the evidence and the fix."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from labcli import lab_up, lbctl

from lbctl import planner
from lbctl.lab import Lab
from xdp import codec
from xdp.limits import DEFAULT_LIMITS
from xdp.maps import LbMaps

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up("dr", http_vip=True) as the_lab:
        yield the_lab


def doctor(lab: Lab, *args: str) -> tuple[int, list[dict]]:
    proc = lbctl(lab, "doctor", "--json", *args, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0)
    return proc.returncode, report["checks"]


def failing(checks: list[dict]) -> list[dict]:
    return [c for c in checks if not c["ok"]]


def must(lab: Lab, host: str, *argv: str) -> None:
    proc = lab.run(host, list(argv))
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"


def only_failure(lab: Lab, name: str) -> dict:
    """The one failing check doctor reports now, which must be `name`."""
    code, checks = doctor(lab)
    bad = failing(checks)
    assert code == 1 and [c["name"] for c in bad] == [name], bad
    assert bad[0]["fix"]
    return bad[0]


def test_healthy_lab_passes_every_check(lab: Lab) -> None:
    assert all(r.ok for r in lab.http_requests(lab.vip, count=6))
    code, checks = doctor(lab)
    assert failing(checks) == []
    assert code == 0
    names = {c["name"] for c in checks}
    assert {"bpffs", "attached", "foreign_xdp", "maps", "ip_forward", "rp_filter", "tx_checksum",
            "table_fill", "vip_backends", "ring_share", "neighbour", "replies"} <= names
    text = lbctl(lab, "doctor").stdout
    assert "✗" not in text and "✓ ip_forward" in text


def test_ip_forward_off_is_named(lab: Lab) -> None:
    must(lab, "lb", "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    try:
        bad = only_failure(lab, "ip_forward")
        assert bad["fix"] == "sysctl -w net.ipv4.ip_forward=1"
        text = lbctl(lab, "doctor", check=False)
        assert text.returncode == 1 and "✗ ip_forward" in text.stdout
    finally:
        must(lab, "lb", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")


def test_strict_rp_filter_is_named(lab: Lab) -> None:
    must(lab, "lb", "sysctl", "-q", "-w", "net.ipv4.conf.eth0.rp_filter=1")
    try:
        bad = only_failure(lab, "rp_filter")
        assert bad["subject"] == "eth0" and "strict" in bad["evidence"]
        assert "net.ipv4.conf.eth0.rp_filter=0" in bad["fix"]
    finally:
        must(lab, "lb", "sysctl", "-q", "-w", "net.ipv4.conf.eth0.rp_filter=0")


@pytest.mark.parametrize("host", ["client", "be2"])
def test_tx_checksum_offload_on_a_sending_veth_is_named(lab: Lab, host: str) -> None:
    """The client is the balancer's direct veth peer; be2 reaches it through the bridge.
    An XDP build cannot tell a partial checksum from a full one: named there."""
    sender = lab.host(host)
    lbctl(lab, "attach", "--mode", "generic", *lab.lb_ifaces)
    must(lab, host, "ethtool", "-K", sender.ifname, "tx", "on")
    try:
        bad = only_failure(lab, "tx_checksum")
        assert bad["subject"] == f"{sender.ifname}@{sender.netns}"
        assert bad["fix"] == f"ip netns exec {sender.netns} ethtool -K {sender.ifname} tx off"
        assert "generic XDP program" in bad["evidence"]
    finally:
        must(lab, host, "ethtool", "-K", sender.ifname, "tx", "off")
        lbctl(lab, "attach", "--mode", "tc", *lab.lb_ifaces)


def test_tx_checksum_offload_is_fine_for_the_tc_build(lab: Lab) -> None:
    """The tc build keeps partial checksums valid (test_tc_mode.py proves it with traffic)."""
    lbctl(lab, "attach", "--mode", "tc", *lab.lb_ifaces)
    sender = lab.host("client")
    must(lab, "client", "ethtool", "-K", sender.ifname, "tx", "on")
    try:
        code, checks = doctor(lab)
        assert failing(checks) == [] and code == 0
        [check] = [c for c in checks if c["name"] == "tx_checksum"
                   and c["subject"] == f"{sender.ifname}@{sender.netns}"]
        assert "tx checksum offload on" in check["evidence"] and "tc build" in check["evidence"]
    finally:
        must(lab, "client", "ethtool", "-K", sender.ifname, "tx", "off")


def test_gro_off_on_a_veth_peer_receiving_native_redirects_is_named(lab: Lab) -> None:
    lbctl(lab, "attach", "--mode", "native", *lab.lb_ifaces)
    must(lab, "sw", "ethtool", "-K", "p-lb", "gro", "off")
    try:
        bad = only_failure(lab, "veth_gro")
        assert bad["subject"] == f"eth1->p-lb@{lab.switch_netns}"
        assert bad["fix"] == f"ip netns exec {lab.switch_netns} ethtool -K p-lb gro on"
    finally:
        must(lab, "sw", "ethtool", "-K", "p-lb", "gro", "on")
        lbctl(lab, "attach", "--mode", "generic", *lab.lb_ifaces)


# Loads a program that passes everything and attaches it in generic mode to argv[1]; the
# attachment outlives this process.
_FOREIGN = r"""
import socket, sys
from bcc import BPF
from xdp import libbpf
b = BPF(text="int pass_all(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func("pass_all", BPF.XDP)
libbpf.xdp_attach(socket.if_nametoindex(sys.argv[1]), fn.fd, libbpf.XDP_FLAGS_SKB_MODE)
"""


def test_foreign_xdp_program_is_named(lab: Lab) -> None:
    dummy = "dr" + secrets.token_hex(3)
    # A veth pair inside the balancer's namespace (this kernel has no dummy driver).
    must(lab, "lb", "ip", "link", "add", dummy, "type", "veth", "peer", "name", dummy + "p")
    try:
        proc = lab.run("lb", [sys.executable, "-c", _FOREIGN, dummy], keep_mounts=True)
        assert proc.returncode == 0, proc.stderr
        bad = only_failure(lab, "foreign_xdp")
        assert bad["subject"] == dummy and "generic mode" in bad["evidence"]
        assert bad["fix"].startswith(f"ip link set dev {dummy} xdpgeneric off")
    finally:
        lab.run("lb", ["ip", "link", "del", dummy])


def test_config_file_interfaces_and_mode_are_compared(lab: Lab, tmp_path) -> None:
    path = tmp_path / "lbctl.yaml"
    path.write_text("interfaces: [eth0, eth1]\nxdp_mode: native\nvips: []\n")
    code, checks = doctor(lab, "-f", str(path))
    bad = failing(checks)
    assert code == 1 and {c["subject"] for c in bad} == {"eth0", "eth1"}
    assert all(c["name"] == "attached" and c["fix"].endswith("--mode native") for c in bad)
    path.write_text("interfaces: [eth0, eth1]\nxdp_mode: generic\nvips: []\n")
    assert doctor(lab, "-f", str(path))[0] == 0


def test_vip_without_usable_backend_is_named(lab: Lab) -> None:
    lbctl(lab, "vip", "add", "10.77.0.11:80")
    try:
        bad = only_failure(lab, "vip_backends")
        assert bad["subject"] == "10.77.0.11:80 tcp"
        assert bad["fix"] == "lbctl backend add 10.77.0.11:80 ADDR:PORT"
        # Narrowed to the healthy VIP, doctor passes.
        assert doctor(lab, f"{lab.vip}:{lab.http_port}")[0] == 0
    finally:
        lbctl(lab, "vip", "del", "10.77.0.11:80")


def test_backend_without_neighbour_is_named(lab: Lab) -> None:
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "backend", "add", vip, "10.77.2.99:80")
    try:
        bad = only_failure(lab, "neighbour")
        assert bad["subject"] == "10.77.2.99" and "does not answer ARP" in bad["evidence"]
    finally:
        lbctl(lab, "backend", "del", vip, "10.77.2.99:80")


@contextmanager
def ring_without(lab: Lab, backend: str) -> Iterator[None]:
    """The VIP's live ring rewritten so that `backend` holds no slot (its weight kept)."""
    with LbMaps(str(lab.bpf_pin_dir)) as maps:
        live = planner.read_live(maps)
        lv = live[codec.Endpoint(lab.vip, lab.http_port, "tcp")]
        saved = maps.ring(lv.vip_id, lv.ring_generation)
        gone, other = lv.backend_ids[backend], lv.backend_ids[f"{lab.backends[1].addr}:{lab.http_port}"]
        maps.write_ring(lv.vip_id, lv.ring_generation, [other if i == gone else i for i in saved])
        try:
            yield
        finally:
            maps.write_ring(lv.vip_id, lv.ring_generation, saved)


def test_backend_with_weight_but_no_ring_slot_is_named(lab: Lab) -> None:
    name = f"{lab.backends[0].addr}:{lab.http_port}"
    with ring_without(lab, name):
        bad = only_failure(lab, "ring_share")
        assert bad["subject"].endswith(f"-> {name}") and "0 of 65537 slots" in bad["evidence"]


def test_replies_routed_around_the_balancer_are_named(lab: Lab) -> None:
    be1 = lab.backends[0]
    lbctl(lab, "flows", "flush")   # answered flows of earlier tests would vouch for be1
    must(lab, "be1", "ip", "route", "replace", "default", "via", "10.77.2.254")
    try:
        lab.http_requests(lab.vip, count=20, timeout_s=1.0)
        deadline = time.monotonic() + 30
        while True:
            _, checks = doctor(lab)
            bad = failing(checks)
            if bad or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [c["name"] for c in bad] == ["replies"], bad
        assert bad[0]["subject"] == f"{be1.addr}:{lab.http_port}"
        assert bad[0]["fix"].startswith(f"on {be1.addr}: ip route replace default via 10.77.2.1")
    finally:
        must(lab, "be1", "ip", "route", "replace", "default", "via", be1.gateway)
        lbctl(lab, "flows", "flush")


def test_full_flow_table_is_named(lab: Lab) -> None:
    with LbMaps(str(lab.bpf_pin_dir)) as maps:
        size = maps.limits.flow_table_size
        keys = b"".join(codec.encode_flow_key("10.9.0.1", 1 + i % 60000, f"10.8.{i // 60000}.1", 80, "tcp")
                        for i in range(size))
        maps["flows"].update_batch(keys, bytes(maps["flows"].value_bytes) * size, size)
    try:
        bad = only_failure(lab, "table_fill")
        assert bad["subject"] == "flows" and "evict" in bad["evidence"]
    finally:
        lbctl(lab, "flows", "flush")


def test_veth_peer_mtu_above_the_native_xdp_limit_is_named(lab: Lab, tmp_path) -> None:
    """A real fault: the client's end of eth0's veth at MTU 9000 makes the kernel refuse native
    XDP on eth0; doctor, told by the config file that eth0 should run native, says why and how
    to fix it, and the fix it prints makes the native attach work."""
    client = lab.host("client")
    eth0 = lab.lb_ifaces[0]
    path = tmp_path / "lbctl.yaml"
    path.write_text(f"interfaces: [{', '.join(lab.lb_ifaces)}]\nxdp_mode: native\nvips: []\n")
    must(lab, "client", "ip", "link", "set", "dev", client.ifname, "mtu", "9000")
    try:
        refused = lbctl(lab, "attach", "--mode", "native", *lab.lb_ifaces, check=False)
        assert refused.returncode == 3 and "Peer MTU is too large" in refused.stderr, refused.stderr
        code, checks = doctor(lab, "-f", str(path))
        bad = failing(checks)
        mtu = [c for c in bad if c["name"] == "mtu"]
        assert code == 1 and [c["subject"] for c in mtu] == [eth0], bad
        assert f"{client.ifname} in {client.netns}" in mtu[0]["evidence"] and "9000" in mtu[0]["evidence"]
        assert mtu[0]["fix"].startswith(f"ip netns exec {client.netns} ip link set dev "
                                        f"{client.ifname} mtu 3506")
        # The other arm's peer is at 1500: checked and fine.
        assert [c["ok"] for c in checks if c["name"] == "mtu" and c["subject"] == lab.lb_ifaces[1]] == [True]
        # Only the mode differs from the file otherwise (the program stayed generic).
        assert {c["name"] for c in bad} == {"mtu", "attached"}

        fix = subprocess.run(mtu[0]["fix"].split("   (")[0].split(), capture_output=True, text=True,
                             check=False)
        assert fix.returncode == 0, fix.stderr     # the fix as printed, run from the host
        lbctl(lab, "attach", "--mode", "native", *lab.lb_ifaces)
        code, checks = doctor(lab, "-f", str(path))
        assert failing(checks) == [] and code == 0
    finally:
        must(lab, "client", "ip", "link", "set", "dev", client.ifname, "mtu", "1500")
        lbctl(lab, "attach", "--mode", "generic", *lab.lb_ifaces)


# Sends N UDP datagrams of SIZE bytes (each fragmented by the kernel: one IP id each), a short
# pause every 100 so the balancer's receive queue never overflows.
_FRAGMENTS = """
import socket, sys, time
addr, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(bytes(size), (addr, port))
    if i % 100 == 99:
        time.sleep(0.003)
"""
FRAGMENTED_BYTES = 2000     # two fragments at MTU 1500


def test_fragment_table_fill_from_real_fragments_is_reported(lab: Lab) -> None:
    """Real fragmented datagrams through a UDP VIP fill the real frags table; doctor reports its
    fill level as the map holds it, and names it once it passes 90%."""
    vip = f"{lab.vip}:{lab.udp_port}"
    # A backend port where nothing listens: the backend reassembles and answers with an ICMP
    # error (rate-limited), so only the client's first fragments make entries.
    lbctl(lab, "vip", "add", vip, "--proto", "udp")
    lbctl(lab, "backend", "add", vip, f"{lab.backends[0].addr}:9", "--proto", "udp")

    def fill() -> int:
        with LbMaps(str(lab.bpf_pin_dir)) as maps:
            return sum(1 for _ in maps["frags"].items())

    def send(n: int) -> None:
        proc = lab.run(lab.client, [sys.executable, "-I", "-c", _FRAGMENTS, lab.vip,
                                    str(lab.udp_port), str(n), str(FRAGMENTED_BYTES)], timeout=120)
        assert proc.returncode == 0, proc.stderr

    try:
        send(1000)
        used = fill()
        assert 900 <= used <= 1000, used        # one entry per datagram (a few may be lost)
        _, checks = doctor(lab)
        (frags,) = [c for c in checks if c["name"] == "table_fill" and c["subject"] == "frags"]
        size = DEFAULT_LIMITS.frag_table_size     # what the lab's balancer was built with
        assert frags["ok"] and frags["evidence"].startswith(f"{used}/{size} entries")

        for _ in range(12):                      # past 90%; each round 2,000 more datagrams
            if fill() >= 0.92 * size:
                break
            send(2000)
        used = fill()
        assert used >= 0.9 * size, used
        bad = only_failure(lab, "table_fill")
        assert bad["subject"] == "frags" and bad["evidence"].startswith(f"{used}/{size} entries")
        assert "evict" in bad["evidence"]
    finally:
        lbctl(lab, "vip", "del", vip, "--proto", "udp")
        with LbMaps(str(lab.bpf_pin_dir)) as maps:
            maps["frags"].clear()
