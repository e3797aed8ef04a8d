"""Path MTU discovery across the balancer over IPv6: a router between the balancer and the
backend has a 1280-byte link, so a client's 1500-byte segments to a v6 VIP get an ICMPv6
"packet too big" from that router, which quotes client -> backend. Only the balancer's
translation (the quote rewritten to client -> VIP) lets the client's kernel match it to its
connection; without it the upload stalls. A large POST through the VIP must complete."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
VIP = "fd00:78::10"
CLIENT, LB_CLIENT_SIDE = "fd00:78:a::2", "fd00:78:a::1"
LB_ROUTER_SIDE, ROUTER_LB_SIDE = "fd00:78:b::1", "fd00:78:b::2"
ROUTER_BACKEND_SIDE, BACKEND = "fd00:78:c::1", "fd00:78:c::2"
NARROW_MTU = 1280                     # IPv6's minimum: the router's link toward the backend
UPLOAD_BYTES = 400_000
PORT = 8080

# Reads a POST body whole and answers with its length.
_SERVER = r"""
import http.server, socket, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        got = 0
        while got < n:
            chunk = self.rfile.read(min(65536, n - got))
            if not chunk:
                break
            got += len(chunk)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
Server(("::", int(sys.argv[1])), Handler).serve_forever()
"""

_UPLOAD = r"""
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[4]))
body = b"x" * int(sys.argv[3])
conn.request("POST", "/", body=body, headers={"Connection": "close"})
resp = conn.getresponse()
print(resp.status, resp.read().decode())
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def in_ns(ns: str, *argv: str) -> None:
    sh("ip", "netns", "exec", ns, *argv)


def lbctl(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", ns, *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"lbctl {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _veth(a_ns: str, a_if: str, b_ns: str, b_if: str) -> None:
    """A veth pair made inside the namespaces (nothing in the host's)."""
    sh("ip", "-n", a_ns, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b_ns)


@pytest.fixture(scope="module")
def topology() -> Iterator[dict[str, str]]:
    """client -- lb -- router ==1280== backend, IPv6 only; all removed whatever happened."""
    tag = secrets.token_hex(2)
    names = {role: f"v6{tag}{role[0]}" for role in ("client", "lb", "router", "backend")}
    server: subprocess.Popen[bytes] | None = None
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                  "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_ra=0",
                  "net.ipv6.conf.default.accept_ra=0")
            in_ns(ns, "ip", "link", "set", "lo", "up")
        c, lb, r, b = names["client"], names["lb"], names["router"], names["backend"]
        _veth(c, "c0", lb, "l0")
        _veth(lb, "l1", r, "r0")
        _veth(r, "r1", b, "b0")
        for ns, ifname, cidr in ((c, "c0", f"{CLIENT}/64"), (lb, "l0", f"{LB_CLIENT_SIDE}/64"),
                                 (lb, "l1", f"{LB_ROUTER_SIDE}/64"), (r, "r0", f"{ROUTER_LB_SIDE}/64"),
                                 (r, "r1", f"{ROUTER_BACKEND_SIDE}/64"), (b, "b0", f"{BACKEND}/64")):
            in_ns(ns, "ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad")
            in_ns(ns, "ip", "link", "set", ifname, "up")
        # The narrow link: the router's side only, so the backend still advertises a
        # 1500-byte MSS and the client sends segments the router cannot pass on.
        in_ns(r, "ip", "link", "set", "r1", "mtu", str(NARROW_MTU))
        in_ns(c, "ip", "-6", "route", "add", "default", "via", LB_CLIENT_SIDE)
        in_ns(b, "ip", "-6", "route", "add", "default", "via", ROUTER_BACKEND_SIDE)
        in_ns(r, "ip", "-6", "route", "add", "default", "via", LB_ROUTER_SIDE)
        in_ns(lb, "ip", "-6", "route", "add", "fd00:78:c::/64", "via", ROUTER_LB_SIDE)
        for ns in (lb, r):
            in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        # Socket-made frames on veth carry partial checksums that a redirect would leave
        # unfinished; GRO on the peers of the balancer's ends lets XDP_REDIRECT deliver.
        for ns, ifname in ((c, "c0"), (b, "b0")):
            in_ns(ns, "ethtool", "-K", ifname, "tx", "off")
        for ns, ifname in ((c, "c0"), (r, "r0")):
            in_ns(ns, "ethtool", "-K", ifname, "gro", "on")
        server = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-I", "-S", "-c",
                                   _SERVER, str(PORT)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        lbctl(lb, "attach", "l0", "l1")
        yield names
    finally:
        if server is not None:
            server.kill()
            server.wait()
        lbctl(names["lb"], "detach", "--all", "--purge", "--force", check=False)
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _upload(client_ns: str, host: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-I", "-S", "-c",
                           _UPLOAD, host, str(PORT), str(UPLOAD_BYTES), str(timeout_s)],
                          capture_output=True, text=True, timeout=timeout_s + 10, check=False)


def test_a_large_upload_through_a_v6_vip_completes_over_a_narrower_link(
        topology: dict[str, str]) -> None:
    lb, client = topology["lb"], topology["client"]
    vip = f"[{VIP}]:{PORT}"
    lbctl(lb, "vip", "add", vip)
    lbctl(lb, "backend", "add", vip, f"[{BACKEND}]:{PORT}")
    # The server is up once the balancer reaches it directly (small request: no PMTU yet).
    deadline = time.monotonic() + 20
    while subprocess.run(["ip", "netns", "exec", lb, sys.executable, "-I", "-S", "-c",
                          _UPLOAD, BACKEND, str(PORT), "10", "1"],
                         capture_output=True, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the backend's server never answered"
        time.sleep(0.2)

    done = _upload(client, VIP, 15.0)
    assert done.returncode == 0, f"upload through the VIP failed: {done.stderr.strip()[-300:]}"
    assert done.stdout.split() == ["200", str(UPLOAD_BYTES)]
    # The client learned the narrower path for the VIP from the translated error.
    route = subprocess.run(["ip", "-n", client, "-6", "route", "get", VIP], capture_output=True,
                           text=True, check=True).stdout
    assert f"mtu {NARROW_MTU}" in route, route
    stats = lbctl(lb, "stats", "--json").stdout
    assert '"redirect"' in stats
