"""ICMP errors about VIP flows with real kernels at both ends: a backend's port-unreachable
reaches the client as if the VIP sent it, so a connected UDP socket sees ECONNREFUSED."""
from __future__ import annotations

import os
import sys

import pytest
from labcli import lab_up, lbctl

from lbctl.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")

CLOSED_PORT = 9999  # nothing listens there on the backends: they answer port-unreachable

_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"hello")
try:
    s.recv(100)
    print("reply")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""


@pytest.fixture(scope="module")
def lab():
    with lab_up("ti") as the_lab:
        yield the_lab


def udp_answer(lab: Lab, addr: str, port: int) -> str:
    proc = lab.run(lab.client, [sys.executable, "-I", "-c", _SEND, addr, str(port)], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_backends_port_unreachable_reaches_the_client_from_the_vip(lab: Lab):
    vip = f"{lab.vip}:{CLOSED_PORT}"
    lbctl(lab, "vip", "add", vip, "--proto", "udp")
    lbctl(lab, "backend", "add", vip, f"{lab.backends[0].addr}:{CLOSED_PORT}", "--proto", "udp")
    # Control: the backend really refuses when asked directly.
    assert udp_answer(lab, lab.backends[0].addr, CLOSED_PORT) == "refused"
    # Through the VIP the error quotes client->backend; translated, the client's socket
    # (connected to the VIP) matches it. Untranslated it would wait out its timeout.
    assert udp_answer(lab, lab.vip, CLOSED_PORT) == "refused"
    # And the working port still answers through the VIP.
    lbctl(lab, "vip", "add", f"{lab.vip}:{lab.udp_port}", "--proto", "udp")
    lbctl(lab, "backend", "add", f"{lab.vip}:{lab.udp_port}", f"{lab.backends[0].addr}:{lab.udp_port}",
          "--proto", "udp")
    assert udp_answer(lab, lab.vip, lab.udp_port) == "reply"
