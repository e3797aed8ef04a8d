"""The lab's servers start without a name service: a host with no /etc/hosts (a minimal root) and a namespace whose route drops DNS queries must not delay or stop them."""
from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a network namespace and /etc/netns files"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT = 8080
READY_WAIT_S = 30.0   # a bound on the wait, not a speed check: the assertion is on the queries

# A name server that answers nothing and prints every query it gets, one line each.
_SILENT_DNS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    print(f"query of {len(data)} bytes from {peer[0]}", flush=True)
"""


def _first_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_WAIT_S)
    assert ready, f"{what} printed nothing in {READY_WAIT_S:.0f} s"
    return proc.stdout.readline().strip()


@pytest.fixture
def resolverless_netns() -> Iterator[str]:
    """A namespace whose `ip netns exec` sees an empty /etc/hosts and a name server that never
    answers: what a minimal root looks like from a lab namespace that drops DNS."""
    ns = f"fd{secrets.token_hex(3)}"
    etc = Path("/etc/netns") / ns
    made_etc_netns = not etc.parent.exists()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        # `ip netns exec` binds these over the host's files, so only over files that exist;
        # with no /etc/hosts (a minimal root) the lookup goes to DNS anyway, and with no
        # /etc/resolv.conf the resolver asks 127.0.0.1, the silent server.
        if Path("/etc/hosts").exists():
            (etc / "hosts").write_text("")
        if Path("/etc/resolv.conf").exists():
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield ns
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        if made_etc_netns:
            shutil.rmtree(etc.parent, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_lab_server_listens_without_asking_the_name_service(resolverless_netns: str) -> None:
    ns = resolverless_netns
    dns = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-I", "-S", "-c", _SILENT_DNS],
                           stdout=subprocess.PIPE, text=True)
    server = None
    try:
        assert _first_line(dns, "the silent name server") == "ready"
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m",
             "lbctl.labserver", "--name", "be9", "--http-port", str(HTTP_PORT), "--udp-port", "9009"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert _first_line(server, "the lab server").startswith("labserver be9: http 0.0.0.0:8080")
        # Once it says so, it accepts.
        probe = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-I", "-S", "-c",
             f"import socket; socket.create_connection(('127.0.0.1', {HTTP_PORT}), timeout=5).close()"],
            capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode == 0, probe.stderr
    finally:
        for proc in (server, dns):
            if proc is not None:
                proc.kill()
                proc.wait()
    queries = dns.stdout.read().strip() if dns.stdout else ""
    assert queries == "", f"the lab server asked the name service: {queries}"
