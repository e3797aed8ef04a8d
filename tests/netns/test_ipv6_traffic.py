"""Real IPv6 traffic through the XDP balancer (NAT66, two-arm): the namespace lab with IPv6
addresses added beside its IPv4 ones, HTTP servers listening on IPv6 in each backend, and the
real `lbctl` CLI. A client reaches a v6 VIP balanced over three backends; `backend del` moves
new connections off one; the listings print [v6]:port; a backend of the other family is refused."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.lab import NETNS_DIR, HttpResult, Lab, LabHost

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 120.0          # the first attach compiles the program with bcc
V6_PORT = 8080
VIP6 = "fd00:77::10"
VIP6_ENDPOINT = f"[{VIP6}]:80"
CLIENT6, LB_CLIENT_SIDE6, LB_BACKEND_SIDE6 = "fd00:77:1::2", "fd00:77:1::1", "fd00:77:2::1"
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


def backend6(i: int) -> str:
    return f"fd00:77:2::{11 + i}"


def lbctl(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", lab.lb.netns, *args],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=REPO_ROOT,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"'lbctl {' '.join(args)}' exited {proc.returncode}: "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ip(lab: Lab, host: LabHost, *args: str) -> None:
    lab.run(host, ["ip", *args], check=True)


def _enable_ipv6(lab: Lab, host: LabHost, addrs: dict[str, str], gateway: str | None) -> None:
    """The lab turns IPv6 off everywhere (no ND/MLD noise in its IPv4 tests): back on here,
    without duplicate address detection so the addresses are usable at once."""
    knobs = ["net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
             "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
    knobs += [f"net.ipv6.conf.{ifname}.disable_ipv6=0" for ifname in addrs]
    knobs += [f"net.ipv6.conf.{ifname}.accept_dad=0" for ifname in addrs]
    lab.run(host, ["sysctl", "-q", "-w", *knobs], check=True)
    for ifname, cidr in addrs.items():
        _ip(lab, host, "-6", "addr", "add", cidr, "dev", ifname, "nodad")
    if gateway is not None:
        _ip(lab, host, "-6", "route", "add", "default", "via", gateway)


@pytest.fixture(scope="module")
def lab6() -> Iterator[tuple[Lab, list[subprocess.Popen[bytes]]]]:
    """The lab with IPv6 beside IPv4, the balancer attached on both arms and a v6 HTTP server
    in each backend; servers, XDP, pins and namespaces are removed whatever happened."""
    lab = Lab(prefix=f"v6{secrets.token_hex(2)}")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        lab.up()
        client_if, backend_if = lab.lb_ifaces
        _enable_ipv6(lab, lab.lb, {client_if: f"{LB_CLIENT_SIDE6}/64",
                                   backend_if: f"{LB_BACKEND_SIDE6}/64"}, None)
        lab.run(lab.lb, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"], check=True)
        _enable_ipv6(lab, lab.client, {lab.client.ifname: f"{CLIENT6}/64"}, LB_CLIENT_SIDE6)
        for i, b in enumerate(lab.backends):
            _enable_ipv6(lab, b, {b.ifname: f"{backend6(i)}/64"}, LB_BACKEND_SIDE6)
            servers.append(subprocess.Popen(
                ["ip", "netns", "exec", b.netns, sys.executable, "-I", "-S", "-c", _SERVER,
                 b.name, str(V6_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        lbctl(lab, "attach", *lab.lb_ifaces)
        _wait_direct_reachable(lab)
        yield lab, servers
    finally:
        for s in servers:
            s.kill()
            s.wait()
        try:
            if (NETNS_DIR / lab.lb.netns).exists():
                lbctl(lab, "detach", "--all", "--purge", "--force", check=False)
        finally:
            lab.down()


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
        lab6: tuple[Lab, list[subprocess.Popen[bytes]]]) -> None:
    lab, _servers = lab6
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
        lab6: tuple[Lab, list[subprocess.Popen[bytes]]]) -> None:
    lab, _servers = lab6
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
        lab6: tuple[Lab, list[subprocess.Popen[bytes]]]) -> None:
    lab, _servers = lab6
    vip = f"{lab.vip}:{lab.http_port}"
    lbctl(lab, "vip", "add", vip)
    lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
    try:
        results = lab.http_requests(lab.vip, lab.http_port, count=30, timeout_s=3.0)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        assert len({r.backend for r in results}) >= 2
    finally:
        lbctl(lab, "vip", "del", vip)


def _tracer_pid(lab: Lab) -> int:
    from xdp.maps import LbMaps
    from xdp.tracing import TraceSwitch

    with LbMaps(str(lab.bpf_pin_dir)) as maps:
        return int(TraceSwitch(maps["trace_ctl"]).read().enabled)


def _start_trace(lab: Lab, *args: str) -> subprocess.Popen[str]:
    """`lbctl trace ARGS` in the background, returned once it has switched tracing on."""
    proc = subprocess.Popen([sys.executable, "-m", "lbctl", "-n", lab.lb.netns, "trace", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    while _tracer_pid(lab) != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"lbctl trace {' '.join(args)} did not switch tracing on: "
                                 f"{proc.communicate()}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("how", ["vip", "client", "backend"])
def test_trace_filters_take_ipv6_and_show_a_v6_connection_in_order(
        lab6: tuple[Lab, list[subprocess.Popen[bytes]]], how: str) -> None:
    lab, _servers = lab6
    vip = "[fd00:77::30]:80"
    backend = f"[{backend6(1)}]:{V6_PORT}"
    lbctl(lab, "vip", "add", vip)
    try:
        lbctl(lab, "backend", "add", vip, backend)
        flt = {"vip": ["--vip", vip], "client": ["--client", CLIENT6],
               "backend": ["--backend", backend]}[how]
        proc = _start_trace(lab, *flt, "--count", "4", "--json")
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
        assert [(e["in"], e["out"]) for e in events] == [
            (f"{client} -> {vip} tcp", f"{client} -> {backend} tcp"),
            (f"{backend} -> {client} tcp", f"{vip} -> {client} tcp"),
            (f"{client} -> {vip} tcp", f"{client} -> {backend} tcp"),
            (f"{client} -> {vip} tcp", f"{client} -> {backend} tcp")]
        assert all(e["backend"] == backend for e in events)
        assert _tracer_pid(lab) == 0, "tracing must be off once --count is reached"
    finally:
        lbctl(lab, "vip", "del", vip)
