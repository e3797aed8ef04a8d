"""Fragmented UDP over IPv6 through a v6 VIP with real kernels at both ends: the client's kernel
fragments datagrams larger than the MTU (a Fragment extension header), each datagram's
fragments all reach one backend, which gets it whole, and the echo, fragmented by the
backend's kernel, comes back whole from the VIP. Both NAT66 and L2 DSR (the backend holds the
VIP on lo and answers straight to the client)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
from labcli import lbctl
from v6lab import V6Net, ip, v6_lab

from lbctl.lab import Lab, LabHost

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: builds namespaces and attaches XDP")

NET6 = V6Net.of_lab()
VIP6, CLIENT6, backend6 = NET6.vip, NET6.client, NET6.backend
ECHO_PORT = 5353
DATAGRAM_BYTES = 4000       # over a 1500-byte MTU: three fragments each way
DATAGRAMS = 24              # each from its own socket (source port), so the ring spreads them

# Each backend echoes a datagram prefixed with its name, from the address it was sent to (the
# VIP under DSR: IPV6_PKTINFO, as a DNS server does, since route-based source selection could
# pick the backend's own address).
_ECHO_SERVER = r"""
import socket, sys
name = sys.argv[1].encode()
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
s.bind(("::", int(sys.argv[2])))
while True:
    data, ancillary, _flags, peer = s.recvmsg(65535, 1024)
    info = [(lvl, kind, raw) for lvl, kind, raw in ancillary if kind == socket.IPV6_PKTINFO]
    s.sendmsg([name + b" " + data], info, 0, peer)
"""

# One datagram per socket; prints the peer the answer came from and whether it was whole.
_CLIENT = r"""
import json, socket, sys
vip, port, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for n in range(count):
    payload = bytes((n + i) % 251 for i in range(size))
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(3.0)
    s.sendto(payload, (vip, port))
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        print(json.dumps({"error": "timeout"}))
        continue
    name, _, echoed = data.partition(b" ")
    print(json.dumps({"peer": peer[0], "port": peer[1], "backend": name.decode(),
                      "whole": echoed == payload}))
    s.close()
"""


def _start_echo(lab: Lab, backend: LabHost, _i: int) -> subprocess.Popen[bytes]:
    """The echo server, with the VIP on lo for DSR."""
    lab.run(backend, ["sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=0"], check=True)
    ip(lab, backend, "-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
    return subprocess.Popen(["ip", "netns", "exec", backend.netns, sys.executable, "-I", "-S", "-c",
                             _ECHO_SERVER, backend.name, str(ECHO_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def lab6() -> Iterator[Lab]:
    """The lab with IPv6 beside IPv4, the balancer attached, a v6 UDP echo server in each
    backend (which also holds the VIP on lo, for DSR)."""
    with v6_lab("bp", _start_echo, _wait_neighbours) as lab:
        yield lab


# From the balancer: every backend's echo answers (servers up, neighbours resolved); a datagram
# to the client resolves its neighbour too (it answers port unreachable).
_PROBE = r"""
import socket, sys, time
client, port, backends = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(0.5)
s.sendto(b"probe", (client, 9))
deadline = time.monotonic() + 20.0
for addr in backends:
    while True:
        s.sendto(b"probe", (addr, port))
        try:
            data, peer = s.recvfrom(65535)
            if peer[0] == addr:
                break
        except (socket.timeout, ConnectionRefusedError):
            pass
        if time.monotonic() > deadline:
            sys.exit(addr + " never echoed")
"""


def _wait_neighbours(lab: Lab) -> None:
    """DSR sends only to resolved neighbours: resolve them before the first datagram."""
    proc = lab.run(lab.lb, [sys.executable, "-I", "-c", _PROBE, CLIENT6, str(ECHO_PORT),
                            *(backend6(i) for i in range(len(lab.backends)))], timeout=60)
    assert proc.returncode == 0, proc.stderr


def _send(lab: Lab, count: int) -> list[dict[str, object]]:
    proc = lab.run(lab.client, [sys.executable, "-I", "-c", _CLIENT, VIP6, str(ECHO_PORT),
                                str(DATAGRAM_BYTES), str(count)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _outcomes(lab: Lab) -> dict[str, int]:
    stats = json.loads(lbctl(lab, "stats", "--json").stdout)
    return {name: c["packets"] for name, c in stats["outcomes"].items()}


@pytest.mark.parametrize("forwarding", ["nat", "dsr"])
def test_fragmented_v6_datagrams_reach_one_backend_whole_and_their_echo_comes_from_the_vip(
        lab6: Lab, forwarding: str) -> None:
    lab = lab6
    vip = f"[{VIP6}]:{ECHO_PORT}"
    lbctl(lab, "vip", "add", vip, "--proto", "udp", "--forwarding", forwarding)
    try:
        lbctl(lab, "backend", "add", vip, "--proto", "udp",
              *(f"[{backend6(i)}]:{ECHO_PORT}" for i in range(len(lab.backends))))
        before = _outcomes(lab)
        answers = _send(lab, DATAGRAMS)
        after = _outcomes(lab)

        # Without the fragment table a later fragment would reach no backend (NAT: it is
        # addressed to the VIP, which the balancer's kernel does not hold), the backend could
        # not reassemble, and the client would time out.
        failed = [a for a in answers if a.get("error") or not a["whole"]]
        assert not failed, f"{len(failed)} of {DATAGRAMS} datagrams lost or damaged: {failed[:3]}"
        assert {(a["peer"], a["port"]) for a in answers} == {(VIP6, ECHO_PORT)}
        per_backend = Counter(a["backend"] for a in answers)
        assert len(per_backend) >= 2, per_backend     # balanced, not all to one

        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        # No fragment toward the VIP was left to the kernel. A DSR echo is no tracked flow:
        # the lab's backends route through the balancer, whose kernel forwards the echo's
        # first fragment (pass_not_vip) and its two later ones (pass_fragment) to the client.
        assert moved["pass_fragment"] == (0 if forwarding == "nat" else 2 * DATAGRAMS), moved
        stats = json.loads(lbctl(lab, "stats", "--json").stdout)
        (vip_row,) = [v for v in stats["vips"] if v["vip"] == vip]
        # NAT: three fragments each way per datagram; DSR: the echo goes straight to the client.
        ways = 2 if forwarding == "nat" else 1
        assert vip_row["packets"] == 3 * ways * DATAGRAMS, (vip_row, moved)
    finally:
        lbctl(lab, "vip", "del", vip, "--proto", "udp")
