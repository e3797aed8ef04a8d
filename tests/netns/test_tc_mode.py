"""`lbctl attach --mode tc` on a real lab: the tc build on the clsact ingress hook balances,
takes over from XDP (and back) under a keep-alive load without a connection noticing, reloads
hitlessly beside an XDP interface, and never touches a tc filter that is not its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
from agentlab import KeepAliveLoad, load_verdict
from labcli import assert_nat_connection_traced, lab_up, lbctl, traced_connection

import xdp.program
from lbctl.lab import Lab
from lbctl.netns import inside
from xdp import libbpf
from xdp.balancer import Balancer
from xdp.errors import CompileError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces, loads XDP and tc programs"),
]

# A filter of another tool on the same hook (classic BPF that matches nothing; the kernel here
# has no matchall or u32 classifier): lbctl must leave it where it is.
FOREIGN = ["prio", "7", "handle", "7", "bpf", "bytecode", "1,6 0 0 0,"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up("tm", attach=False, http_vip=False) as the_lab:
        yield the_lab


@pytest.fixture
def detached(lab: Lab) -> Iterator[Lab]:
    lbctl(lab, "detach", "--all", "--force", check=False)
    assert attached(lab) == {}
    yield lab
    lbctl(lab, "detach", "--all", "--force", check=False)


def attached(lab: Lab) -> dict[str, tuple[str, int]]:
    status = json.loads(lbctl(lab, "status", "--json").stdout)
    return {a["ifname"]: (a["mode"], a["prog_id"]) for a in status["attached"]}


def filters(lab: Lab, ifname: str) -> str:
    return subprocess.run(["tc", "-n", lab.lb.netns, "filter", "show", "dev", ifname, "ingress"],
                          check=True, capture_output=True, text=True).stdout


def with_vip(lab: Lab) -> None:
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))


def test_tc_mode_balances_and_detach_removes_only_its_filter(detached: Lab):
    subprocess.run(["tc", "-n", detached.lb.netns, "qdisc", "add", "dev", "eth0", "clsact"],
                   check=True, capture_output=True)
    subprocess.run(["tc", "-n", detached.lb.netns, "filter", "add", "dev", "eth0", "ingress", *FOREIGN],
                   check=True, capture_output=True)
    try:
        out = lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "tc").stdout
        assert out.count("(tc, prog") == 2 and "veth: tc keeps the socket buffer as it is" in out
        got = attached(detached)
        assert {mode for mode, _ in got.values()} == {"tc"} and len({p for _, p in got.values()}) == 1
        tc_prog = next(iter(got.values()))[1]
        assert f"(XDP build), prog {tc_prog} (tc build)" in lbctl(detached, "status").stdout
        for ifname in detached.lb_ifaces:
            shown = filters(detached, ifname)
            assert f"handle {libbpf.TC_HANDLE:#x} tc_lb" in shown and "direct-action" in shown
            assert f"id {tc_prog}" in shown
        with_vip(detached)
        bodies = Counter(detached.http_get(detached.vip, detached.http_port, count=60))
        assert set(bodies) == {b.name for b in detached.backends}
        stats = json.loads(lbctl(detached, "stats", "--json").stdout)
        assert stats["outcomes"]["redirect"]["packets"] >= 60 * 4
        assert stats["outcomes"]["pass_malformed"]["packets"] == 0

        lbctl(detached, "detach", "eth0", "--force")
        assert attached(detached) == {"eth1": ("tc", tc_prog)}
        assert "tc_lb" not in filters(detached, "eth0")
        assert "bytecode '1,6 0 0 0'" in filters(detached, "eth0"), "another tool's filter stays"
        lbctl(detached, "detach", "--all", "--force")
        assert "tc_lb" not in filters(detached, "eth1")
        assert not os.path.exists(detached.bpf_pin_dir / "prog_tc")
    finally:
        lbctl(detached, "vip", "del", f"{detached.vip}:{detached.http_port}", check=False)
        subprocess.run(["tc", "-n", detached.lb.netns, "qdisc", "del", "dev", "eth0", "clsact"],
                       check=False, capture_output=True)


def test_switching_between_xdp_and_tc_keeps_every_connection_on_its_backend(detached: Lab):
    lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "generic")
    with_vip(detached)
    load = KeepAliveLoad(detached, connections=32, min_duration_s=6.0)
    try:
        lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "tc")
        assert {m for m, _ in attached(detached).values()} == {"tc"}
        lbctl(detached, "attach", "eth1", "--mode", "generic")
        assert {n: m for n, (m, _) in attached(detached).items()} == {"eth0": "tc", "eth1": "generic"}
        verdict = load_verdict(load.finish())
    finally:
        load.close()
        lbctl(detached, "vip", "del", f"{detached.vip}:{detached.http_port}", check=False)
    assert verdict["errors"] == [] and verdict["non2xx"] == 0
    assert verdict["moved"] == [], "a connection changed backend across the switches"
    assert verdict["requests"] > 32


def test_reload_swaps_both_builds_hitlessly(detached: Lab):
    lbctl(detached, "attach", "eth0", "--mode", "tc")
    lbctl(detached, "attach", "eth1", "--mode", "generic")
    before = attached(detached)
    with_vip(detached)
    load = KeepAliveLoad(detached, connections=32, min_duration_s=6.0)
    try:
        out = lbctl(detached, "reload", timeout_s=180.0).stdout
        after = attached(detached)
        verdict = load_verdict(load.finish())
    finally:
        load.close()
        lbctl(detached, "vip", "del", f"{detached.vip}:{detached.http_port}", check=False)
    assert {n: m for n, (m, _) in after.items()} == {"eth0": "tc", "eth1": "generic"}
    assert after["eth0"][1] != before["eth0"][1] and after["eth1"][1] != before["eth1"][1]
    assert f"reloaded eth0 (tc, prog {after['eth0'][1]})" in out
    assert verdict["errors"] == [] and verdict["non2xx"] == 0 and verdict["moved"] == []
    assert not os.path.exists(detached.bpf_pin_dir / "prog_tc_next")


def test_a_tc_attach_that_fails_halfway_leaves_nothing_attached(detached: Lab):
    refused = lbctl(detached, "attach", "eth0", "nosuch0", "--mode", "tc", check=False)
    assert refused.returncode != 0 and "nosuch0" in refused.stderr
    assert attached(detached) == {}
    assert "tc_lb" not in filters(detached, "eth0")


def test_trace_reads_the_tc_build_as_it_reads_the_xdp_one(detached: Lab):
    """The same four packets, outcomes and rewrites `lbctl trace` shows for XDP
    (tests/netns/test_trace_live.py), from the tc build's events."""
    lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "tc")
    with_vip(detached)
    try:
        assert_nat_connection_traced(detached, traced_connection(detached))
    finally:
        lbctl(detached, "vip", "del", f"{detached.vip}:{detached.http_port}", check=False)


def test_a_kernel_that_refuses_the_tc_build_gets_generic_xdp_and_status_says_why(
        detached: Lab, monkeypatch: pytest.MonkeyPatch):
    """The driver table asks for tc on veth; where the kernel will not load the tc build (an
    older verifier; here its refusal is made in-process) attach falls back to generic XDP,
    which takes the same decisions, and says why until a tc build loads. An explicit
    --mode tc is never replaced."""
    real = xdp.program.compile_and_load
    refusal = "cannot compile or load lb_xdp.c: Failed to load BPF program b'tc_lb': Permission denied"

    def refuse_tc(*args, tc: bool = False, **kwargs):
        if tc:
            raise CompileError(refusal)
        return real(*args, **kwargs)

    monkeypatch.setattr(xdp.program, "compile_and_load", refuse_tc)
    balancer = Balancer(detached.lb.netns)
    try:
        with inside(detached.lb.netns):
            done = balancer.attach(list(detached.lb_ifaces))
            with pytest.raises(CompileError):
                balancer.attach(["eth0"], "tc")
    finally:
        balancer.close()
    assert {a.mode for a in done} == {"generic"}
    why = f"veth: this kernel refused the tc build ({refusal}); generic instead"
    assert all(a.reason == why for a in done)
    status = json.loads(lbctl(detached, "status", "--json").stdout)
    assert [(a["mode"], a["why"]) for a in status["attached"]] == [("generic", why)] * 2
    assert set(detached.http_get(detached.backends[0].addr, count=3)) == {detached.backends[0].name}
    # A tc build that loads (the real compiler, in the CLI's process) clears the note.
    lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "tc")
    lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "generic")
    again = json.loads(lbctl(detached, "status", "--json").stdout)["attached"]
    assert {a["why"] for a in again} == {"set by --mode generic (veth defaults to tc)"}


def set_tx_checksumming(lab: Lab, hosts_on: bool) -> None:
    """Transmit checksum offload on (the kernel's default for veth) at every client and backend
    end, off at the balancer's own ends; or back as the lab keeps it (the reverse)."""
    for h in [lab.client, *lab.backends]:
        for i in h.ifaces:
            lab.run(h.name, ["ethtool", "-K", i.name, "tx", "on" if hosts_on else "off"], check=True)
    for ifname in lab.lb_ifaces:
        lab.run(lab.lb.name, ["ethtool", "-K", ifname, "tx", "off" if hosts_on else "on"], check=True)


def test_the_tc_build_keeps_partial_checksums_valid(detached: Lab):
    """Sockets on the same host send over veth with transmit checksum offload on by default:
    their segments carry only the pseudo-header's sum, for the device to finish. The tc build
    must update that partial sum as the kernel's own NAT does (the addresses, not the ports),
    and a full one as before. The balancer's ends here finish checksums in software (offload
    off), so a wrong partial sum becomes a wrong checksum, which the receiver drops: with the
    XDP build's arithmetic on a partial sum, every connection below times out."""
    set_tx_checksumming(detached, hosts_on=True)
    try:
        lbctl(detached, "attach", *detached.lb_ifaces, "--mode", "tc")
        with_vip(detached)
        udp_vip = f"{detached.vip}:{detached.udp_port}"
        lbctl(detached, "vip", "add", udp_vip, "--proto", "udp")
        lbctl(detached, "backend", "add", udp_vip, "--proto", "udp",
              *(f"{b.addr}:{detached.udp_port}" for b in detached.backends))
        names = {b.name for b in detached.backends}
        bodies = detached.http_get(detached.vip, detached.http_port, count=30, timeout_s=3.0)
        assert set(bodies) == names
        replies = detached.udp_echo(detached.vip, detached.udp_port, "sum", count=12)
        assert {r.split()[0] for r in replies} == names and all(r.endswith(" sum") for r in replies)
        if detached.vip6:
            vip6 = f"[{detached.vip6}]:{detached.http_port}"
            lbctl(detached, "vip", "add", vip6)
            lbctl(detached, "backend", "add", vip6,
                  *(f"[{b.addr6}]:{detached.http_port}" for b in detached.backends))
            assert set(detached.http_get(detached.vip6, detached.http_port, count=30,
                                         timeout_s=3.0)) == names
        bulk_both_ways(detached)
        # The same frames with full checksums (offload off at the senders) still pass.
        set_tx_checksumming(detached, hosts_on=False)
        assert set(detached.http_get(detached.vip, detached.http_port, count=15)) == names
    finally:
        set_tx_checksumming(detached, hosts_on=False)


BULK_PORT = 5299
BULK_BYTES = 4 << 20
# One connection each way of BULK_BYTES through the VIP: the sockets send 64 KB segments
# (TSO over veth), which the balancer's ends cut into MSS-sized ones (offload off there),
# each checksum finished from the sum the tc build updated.
_BULK_SERVER = r"""
import hashlib, socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while n < int(sys.argv[2]):
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
c.sendall(h.hexdigest().encode() + bytes(i % 251 for i in range(int(sys.argv[2]))))
c.close()
"""
_BULK_CLIENT = r"""
import hashlib, socket, sys
data = bytes(i % 251 for i in range(int(sys.argv[3])))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(data)
got = b""
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    got += b
sent_ok = got[:64].decode() == hashlib.sha256(data).hexdigest()
print(sent_ok, got[64:] == data, len(got) - 64)
"""


def bulk_both_ways(lab: Lab) -> None:
    backend = lab.backends[0]
    vip = f"{lab.vip}:{BULK_PORT}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, f"{backend.addr}:{BULK_PORT}")
    server = subprocess.Popen(["ip", "netns", "exec", backend.netns, sys.executable, "-c", _BULK_SERVER,
                               str(BULK_PORT), str(BULK_BYTES)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = subprocess.run(["ip", "netns", "exec", lab.client.netns, sys.executable, "-c", _BULK_CLIENT,
                              lab.vip, str(BULK_PORT), str(BULK_BYTES)],
                             check=False, capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == ["True", "True", str(BULK_BYTES)], out.stderr[-300:]
    finally:
        server.kill()
        server.wait()
        lbctl(lab, "vip", "del", vip, check=False)
