"""attach/detach edge cases on real interfaces: mode switches, foreign XDP programs, forwarding
off, partial failures that must leave nothing attached."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest
from labcli import lab_up, lbctl

from lbctl.control import LOCK_DIR
from lbctl.lab import Lab
from xdp.modes import default_mode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


@pytest.fixture(scope="module")
def lab():
    with lab_up("ta", attach=False) as the_lab:
        yield the_lab


def attached(lab: Lab) -> dict[str, str]:
    status = json.loads(lbctl(lab, "status", "--json").stdout)
    return {a["ifname"]: a["mode"] for a in status["attached"]}


@pytest.fixture
def detached(lab: Lab) -> Lab:
    lbctl(lab, "detach", "--all", "--force", check=False)
    assert attached(lab) == {}
    return lab


def test_switching_mode_reattaches_in_the_new_mode(detached: Lab):
    lbctl(detached, "attach", "eth0", "eth1", "--mode", "native")
    assert attached(detached) == {"eth0": "native", "eth1": "native"}
    lbctl(detached, "attach", "eth1", "--mode", "generic")
    assert attached(detached) == {"eth0": "native", "eth1": "generic"}
    assert len(detached.http_get(detached.backends[0].addr, count=5)) == 5


def test_an_unknown_interface_attaches_nothing(detached: Lab):
    proc = lbctl(detached, "attach", "eth0", "nosuch0", check=False)
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "unknown interface 'nosuch0'" in proc.stderr
    assert attached(detached) == {}


def test_an_interface_without_ethernet_frames_attaches_nothing(detached: Lab):
    """A tun device (as WireGuard and IP tunnels, link type none) hands the program frames that
    start at the IP header: before the check `--mode generic` attached to it, and the program
    read IP addresses as MACs. Loopback carries no client's packet. Both are refused, with the
    interfaces beside them left as they were."""
    detached.run(detached.lb, ["ip", "tuntap", "add", "dev", "lt0", "mode", "tun"], check=True)
    try:
        for name, says, mode in (("lt0", "no Ethernet header (link type none)", ()),
                                 ("lt0", "no Ethernet header (link type none)", ("--mode", "generic")),
                                 ("lo", "loopback interface", ())):
            proc = lbctl(detached, "attach", "eth0", name, *mode, check=False)
            assert proc.returncode == 3, proc.stderr
            assert proc.stderr.count("\n") == 1 and says in proc.stderr and "hint" in proc.stderr
            assert attached(detached) == {}
    finally:
        detached.run(detached.lb, ["ip", "link", "del", "lt0"], check=True)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Another balancer instance's program (its own pins) stands in for a foreign XDP program.
_ATTACH_OTHER = """
import sys
sys.path.insert(0, sys.argv[1])
from pyroute2 import netns
netns.setns(sys.argv[2], flags=0)
from xdp.balancer import Balancer
balancer = Balancer(sys.argv[3])
balancer.attach(["eth0"], "generic")
balancer.close()
"""


def test_a_foreign_xdp_program_is_not_replaced(detached: Lab):
    other = "tforeign" + secrets.token_hex(2)
    subprocess.run([sys.executable, "-c", _ATTACH_OTHER, REPO, detached.lb.netns, other],
                   check=True, capture_output=True, text=True, timeout=60)
    try:
        proc = lbctl(detached, "attach", "eth1", "eth0", check=False)
        assert proc.returncode == 3
        assert "another XDP program" in proc.stderr and "hint" in proc.stderr
        assert attached(detached) == {}      # eth1, attached first, was undone
    finally:
        subprocess.run(["ip", "-n", detached.lb.netns, "link", "set", "dev", "eth0", "xdpgeneric",
                        "off"], check=False)
        subprocess.run(["rm", "-rf", f"/sys/fs/bpf/lbctl/{other}"], check=False)


def test_detaching_an_interface_that_is_not_attached_is_refused(detached: Lab):
    lbctl(detached, "attach", "eth0")
    proc = lbctl(detached, "detach", "eth1", check=False)
    assert proc.returncode == 4 and "not attached to 'eth1'" in proc.stderr
    assert attached(detached) == {"eth0": default_mode("veth").mode}


def test_attach_warns_when_forwarding_is_off(detached: Lab):
    sysctl = ["ip", "netns", "exec", detached.lb.netns, "sysctl", "-qw"]
    subprocess.run([*sysctl, "net.ipv4.ip_forward=0"], check=True)
    try:
        proc = lbctl(detached, "attach", "eth0", "eth1")
        assert "warning: net.ipv4.ip_forward is 0" in proc.stderr
    finally:
        subprocess.run([*sysctl, "net.ipv4.ip_forward=1"], check=True)
    assert "warning" not in lbctl(detached, "attach", "eth0", "eth1").stderr


_LISTEN = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(60)
"""


def test_a_vip_on_a_local_service_is_refused_unless_forced(detached: Lab):
    lbctl(detached, "attach", "eth0", "eth1")
    own = detached.lb.addr                     # the balancer's client-side address
    server = subprocess.Popen(["ip", "netns", "exec", detached.lb.netns, sys.executable, "-c",
                               _LISTEN, "8022"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        before = lbctl(detached, "vip", "list", "--json").stdout
        proc = lbctl(detached, "vip", "add", f"{own}:8022", check=False)
        assert proc.returncode == 2
        assert "a local service listens (0.0.0.0:8022)" in proc.stderr and "--force" in proc.stderr
        assert lbctl(detached, "vip", "list", "--json").stdout == before
        # The same address on a port nothing listens on, or with --force, is accepted.
        lbctl(detached, "vip", "add", f"{own}:8023")
        lbctl(detached, "vip", "add", f"{own}:8022", "--force")
    finally:
        server.kill()
        server.wait()
        for port in (8022, 8023):
            lbctl(detached, "vip", "del", f"{own}:{port}", check=False)


def test_a_backend_that_is_the_vip_itself_is_refused(detached: Lab):
    lbctl(detached, "attach", "eth0", "eth1")
    vip = f"{detached.vip}:{detached.http_port}"
    lbctl(detached, "vip", "add", vip)
    try:
        proc = lbctl(detached, "backend", "add", vip, vip, check=False)
        assert proc.returncode == 2 and "is the VIP itself" in proc.stderr
    finally:
        lbctl(detached, "vip", "del", vip, check=False)


def test_commands_leave_no_lock_file_behind(detached: Lab):
    # Each command locks its instance with /run/lbctl/<instance>.lock; the file goes with the
    # last holder, so /run does not collect one per instance name ever used.
    lbctl(detached, "attach", *detached.lb_ifaces)
    lbctl(detached, "status")
    assert not os.path.exists(os.path.join(LOCK_DIR, f"{detached.lb.netns}.lock"))
