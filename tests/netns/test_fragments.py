"""Fragmented UDP through a VIP with real kernels at both ends: a datagram larger than the MTU
reaches a backend whole, and the backend's echo, fragmented too, comes back whole from the VIP."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
from labcli import lab_up, lbctl

from lbctl.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")

DATAGRAM_BYTES = 3000  # over a 1500-byte MTU: three fragments each way

# An unconnected socket, so an answer from any address is seen and its source reported.
_ECHO = """
import socket, sys
addr, port, size, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
payload = bytes(i % 251 for i in range(size))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3.0)
s.sendto(payload, (addr, port))
try:
    data, peer = s.recvfrom(65535)
except socket.timeout:
    print("timeout")
    sys.exit(0)
print(peer[0], peer[1], len(data), data == prefix.encode() + b" " + payload)
"""


@pytest.fixture(scope="module")
def lab():
    with lab_up("tf") as the_lab:
        yield the_lab


def test_a_fragmented_datagram_reaches_the_backend_whole_and_its_echo_comes_back_from_the_vip(
        lab: Lab) -> None:
    backend = lab.backends[0]
    vip = f"{lab.vip}:{lab.udp_port}"
    lbctl(lab, "vip", "add", vip, "--proto", "udp")
    lbctl(lab, "backend", "add", vip, f"{backend.addr}:{lab.udp_port}", "--proto", "udp")

    proc = lab.run(lab.client, [sys.executable, "-I", "-c", _ECHO, lab.vip, str(lab.udp_port),
                                str(DATAGRAM_BYTES), backend.name], timeout=30)
    assert proc.returncode == 0, proc.stderr
    echo_bytes = len(backend.name) + 1 + DATAGRAM_BYTES
    # Untranslated, a later fragment would reach no backend (or come back from the backend's
    # own address) and the client would wait out its timeout.
    assert proc.stdout.split() == [lab.vip, str(lab.udp_port), str(echo_bytes), "True"]

    stats: dict[str, Any] = json.loads(lbctl(lab, "stats", "--json").stdout)
    (vip_row,) = [v for v in stats["vips"] if v["vip"] == vip]
    assert vip_row["packets"] == 6, stats    # every fragment, both ways, by the data plane
