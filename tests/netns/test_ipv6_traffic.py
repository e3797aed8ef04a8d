"""Real IPv6 traffic through the XDP balancer (NAT66, two-arm): the namespace lab with IPv6
addresses beside its IPv4 ones, HTTP servers listening on IPv6 in each backend, and the
real `lbctl` CLI. A client reaches a v6 VIP balanced over three backends; `backend del` moves
new connections off one; the listings print [v6]:port; a backend of the other family is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import labcli
import pytest
from v6lab import CLI_TIMEOUT_S, V6Net, v6_lab

from lbctl.lab import HttpResult, Lab, LabHost

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
V6_PORT = 8080
NET6 = V6Net.of_lab()
VIP6 = NET6.vip
VIP6_ENDPOINT = f"[{VIP6}]:80"
CLIENT6 = NET6.client
backend6 = NET6.backend
NEW_CONNECTIONS = 120

# Each backend answers GET with its name in X-Backend and the peer it saw in X-Client-Addr,
# like lbctl.labserver does over IPv4.
_SERVER = r"""
import http.server, socket, sys
name = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("X-Backend", name)
        self.send_header("X-Client-Addr", self.client_address[0])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
Server(("::", int(sys.argv[2])), Handler).serve_forever()
"""


def lbctl(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return labcli.lbctl(lab, *args, check=check, timeout_s=CLI_TIMEOUT_S)


def _start_server(lab: Lab, backend: LabHost, _i: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", backend.netns, sys.executable, "-I", "-S", "-c",
                             _SERVER, backend.name, str(V6_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def lab6() -> Iterator[Lab]:
    """The lab with IPv6 beside IPv4, the balancer attached on both arms and a v6 HTTP server
    in each backend."""
    with v6_lab("v6", _start_server, _wait_direct_reachable) as lab:
        yield lab


def _wait_direct_reachable(lab: Lab) -> None:
    """Every v6 server answers the balancer directly (servers up, neighbours resolvable)."""
    deadline = time.monotonic() + 20.0
    for i in range(len(lab.backends)):
        while True:
            [r] = lab.http_requests(backend6(i), V6_PORT, count=1, src=lab.lb, timeout_s=1.0)
            if r.ok:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the v6 server of {lab.backends[i].name} never answered: {r.error}")
            time.sleep(0.1)


def _through_vip(lab: Lab, count: int) -> list[HttpResult]:
    return lab.http_requests(VIP6, 80, count=count, new_connection=True, timeout_s=3.0)


def test_a_v6_vip_is_balanced_over_its_backends_and_backend_del_moves_new_connections(
        lab6: Lab) -> None:
    lab = lab6
    lbctl(lab, "vip", "add", VIP6_ENDPOINT)
    lbctl(lab, "backend", "add", VIP6_ENDPOINT,
          *(f"[{backend6(i)}]:{V6_PORT}" for i in range(len(lab.backends))))

    results = _through_vip(lab, NEW_CONNECTIONS)
    failed = [r.error or r.status for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {NEW_CONNECTIONS} requests through the v6 VIP failed: {failed[:3]}"
    per_backend = Counter(r.backend for r in results)
    assert set(per_backend) == {b.name for b in lab.backends}, per_backend
    # NAT66 keeps the client's address: the backends saw the client, not the balancer.
    assert {r.client_addr for r in results} == {CLIENT6}

    # The listings print the bracket form.
    vips = json.loads(lbctl(lab, "vip", "list", "--json").stdout)
    assert any(v["vip"] == VIP6_ENDPOINT for v in vips), vips
    backends_text = lbctl(lab, "backend", "list", VIP6_ENDPOINT).stdout
    assert f"[{backend6(0)}]:{V6_PORT}" in backends_text
    stats = json.loads(lbctl(lab, "stats", "--json").stdout)
    [vip_stats] = [v for v in stats["vips"] if v["vip"] == VIP6_ENDPOINT]
    assert vip_stats["new_flows"] >= NEW_CONNECTIONS
    flows_text = lbctl(lab, "flows", "list", "--all", "--vip", VIP6_ENDPOINT).stdout
    assert f"[{CLIENT6}]:" in flows_text and VIP6_ENDPOINT in flows_text
    exported = lbctl(lab, "export").stdout
    assert VIP6_ENDPOINT in exported

    gone = lab.backends[0]
    lbctl(lab, "backend", "del", VIP6_ENDPOINT, f"[{backend6(0)}]:{V6_PORT}")
    after = _through_vip(lab, NEW_CONNECTIONS // 2)
    assert all(r.ok for r in after), [r.error for r in after if not r.ok][:3]
    moved = Counter(r.backend for r in after)
    assert gone.name not in moved, moved
    assert set(moved) == {b.name for b in lab.backends[1:]}, moved


def test_a_backend_of_the_other_family_is_one_line_exit_2_and_changes_nothing(
        lab6: Lab) -> None:
    lab = lab6
    vip = "[fd00:77::20]:80"
    lbctl(lab, "vip", "add", vip)
    before = lbctl(lab, "export").stdout
    proc = lbctl(lab, "backend", "add", vip, f"{lab.backends[0].addr}:{lab.http_port}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "is IPv4 but VIP [fd00:77::20]:80 is IPv6" in proc.stderr and "hint:" in proc.stderr
    assert lbctl(lab, "export").stdout == before
    lbctl(lab, "vip", "del", vip)


def test_ipv4_traffic_still_flows_beside_ipv6(
        lab6: Lab) -> None:
    lab = lab6
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
    try:
        results = lab.http_requests(lab.vip, lab.http_port, count=30, timeout_s=3.0)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        assert len({r.backend for r in results}) >= 2
    finally:
        lbctl(lab, "vip", "del", vip)


@pytest.mark.parametrize("how", ["vip", "client", "backend"])
def test_trace_filters_take_ipv6_and_show_a_v6_connection_in_order(
        lab6: Lab, how: str) -> None:
    lab = lab6
    vip = "[fd00:77::30]:80"
    backend = f"[{backend6(1)}]:{V6_PORT}"
    lbctl(lab, "vip", "add", vip)
    try:
        lbctl(lab, "backend", "add", vip, backend)
        flt = {"vip": ["--vip", vip], "client": ["--client", CLIENT6],
               "backend": ["--backend", backend]}[how]
        proc = labcli.start_tracer(lab, "trace", *flt, "--count", "4", "--json")
        try:
            # IPv4 traffic meanwhile must not be caught by an IPv6 filter.
            v4_vip = f"{lab.vip}:{lab.http_port}"
            lbctl(lab, "vip", "add", v4_vip)
            lbctl(lab, "backend", "add", v4_vip, f"{lab.backends[0].addr}:{lab.http_port}")
            assert all(r.ok for r in lab.http_requests(lab.vip, lab.http_port, count=2))
            [result] = lab.http_requests("fd00:77::30", 80, count=1, timeout_s=3.0)
            assert result.ok, result.error
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            lbctl(lab, "vip", "del", f"{lab.vip}:{lab.http_port}", check=False)
        assert proc.returncode == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        client = events[0]["in"].split(" ->")[0]
        assert client.startswith(f"[{CLIENT6}]:"), events
        # SYN, SYN-ACK, the handshake's ACK, the request: both directions, in bracket form.
        assert [e["outcome"] for e in events] == ["new flow", "reverse NAT", "flow hit", "flow hit"]
        assert [(e["in"], e["out"]) for e in events] == labcli.nat_connection_trace(client, vip, backend)
        assert all(e["backend"] == backend for e in events)
        assert labcli.tracer_pid(lab) == 0, "tracing must be off once --count is reached"
    finally:
        lbctl(lab, "vip", "del", vip)
