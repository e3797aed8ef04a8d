"""Shared by the netns tests: the real lbctl CLI run against a lab's balancer, a lab that is
always torn down (namespaces, servers, XDP and pins), even after a failure or Ctrl-C, a
tracer started in the background and the trace a NAT connection leaves, and a long-lived
keep-alive HTTP client stepped from the test."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lbctl.lab import Lab
from xdp.maps import LbMaps
from xdp.tracing import TraceSwitch


def lbctl(lab: Lab, *args: str, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """`lbctl -n <lab's balancer> ARGS` in a child process, as a user types it."""
    proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", lab.lb.netns, *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if check:
        assert proc.returncode == 0, f"lbctl {' '.join(args)}: {proc.stderr}"
    return proc


@contextmanager
def lab_up(letters: str, attach: bool = True, http_vip: bool = False) -> Iterator[Lab]:
    """A lab with a unique prefix (letters + 4 hex digits), the balancer attached on both arms;
    with http_vip, also the lab's HTTP VIP with every backend (one change)."""
    lab = Lab(letters + secrets.token_hex(2))
    try:
        lab.up()
        if attach:
            lbctl(lab, "attach", *lab.lb_ifaces)
        if http_vip:
            vip = f"{lab.vip}:{lab.http_port}"
            lbctl(lab, "vip", "add", vip)
            lbctl(lab, "backend", "add", vip, *(f"{b.addr}:{lab.http_port}" for b in lab.backends))
        yield lab
    finally:
        try:
            lbctl(lab, "detach", "--all", "--purge", "--force", check=False)
        finally:
            # Also when the detach times out (a loaded machine): the lab must not outlive its test.
            lab.down()


def tracer_pid(lab: Lab) -> int:
    """The pid of the process tracing on the lab's balancer (0: tracing is off)."""
    with LbMaps(str(lab.bpf_pin_dir)) as maps:
        return int(TraceSwitch(maps["trace_ctl"]).read().enabled)


def start_tracer(lab: Lab, *args: str) -> subprocess.Popen[str]:
    """`lbctl -n LB ARGS` (trace or capture) in the background, returned once it has switched
    tracing on."""
    proc = subprocess.Popen([sys.executable, "-m", "lbctl", "-n", lab.lb.netns, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while tracer_pid(lab) != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"lbctl {' '.join(args)} did not switch tracing on: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def nat_connection_trace(client: str, vip: str, backend: str) -> list[tuple[str, str]]:
    """The (in, out) of each traced packet of a NAT connection from `client` to `vip` carried
    by `backend`: SYN, SYN-ACK, the handshake's ACK, the request."""
    return [(f"{client} -> {vip} tcp", f"{client} -> {backend} tcp"),
            (f"{backend} -> {client} tcp", f"{vip} -> {client} tcp"),
            (f"{client} -> {vip} tcp", f"{client} -> {backend} tcp"),
            (f"{client} -> {vip} tcp", f"{client} -> {backend} tcp")]


def traced_connection(lab: Lab) -> list[dict[str, Any]]:
    """`lbctl trace --client CLIENT --count 4 --json` while the client makes one HTTP request
    to the lab's VIP: the four events (SYN, SYN-ACK, ACK, request), in order."""
    proc = start_tracer(lab, "trace", "--client", lab.client.addr, "--count", "4", "--json")
    try:
        assert all(r.ok for r in lab.http_requests(lab.vip, count=1))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def assert_nat_connection_traced(lab: Lab, events: list[dict[str, Any]]) -> None:
    """The events of traced_connection, as a NAT VIP's connection must read: which interface,
    which outcome, which rewrite, one backend throughout."""
    vip = f"{lab.vip}:{lab.http_port}"
    client = events[0]["in"].split(" ->")[0]
    backend = events[0]["backend"]
    assert backend in {f"{b.addr}:{lab.http_port}" for b in lab.backends}
    assert [(e["iface"], e["outcome"]) for e in events] == [
        ("eth0", "new flow"), ("eth1", "reverse NAT"), ("eth0", "flow hit"), ("eth0", "flow hit")]
    assert [(e["in"], e["out"]) for e in events] == nat_connection_trace(client, vip, backend)
    assert all(e["backend"] == backend for e in events)


# A keep-alive HTTP client driven over stdin: each line "N" makes N requests on the one
# connection, a pause apart; one JSON line out per request, then {"done": N}. No reconnects.
_KEEPALIVE_SNIPPET = r"""
import http.client, json, sys, time
host, port, pause_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=2.0)
conn.auto_open = 0
conn.connect()
print(json.dumps({"local": "%s:%d" % conn.sock.getsockname()}), flush=True)
for line in sys.stdin:
    n = int(line)
    for _ in range(n):
        rec = {}
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            rec.update(status=resp.status, backend=resp.getheader("X-Backend"),
                       client_addr=resp.getheader("X-Client-Addr"))
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(rec), flush=True)
        time.sleep(pause_s)
    print(json.dumps({"done": n}), flush=True)
"""


class KeepAliveClient:
    """One long-lived HTTP connection from the lab client, stepped from the test."""

    def __init__(self, lab: Lab, host: str, port: int, pause_s: float) -> None:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.client.netns,
                sys.executable,
                "-I",
                "-S",
                "-c",
                _KEEPALIVE_SNIPPET,
                host,
                str(port),
                str(pause_s),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        first = self._line()
        self.local: str = first["local"]
        self.results: list[dict[str, Any]] = []

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=5)
            assert self.proc.stderr is not None
            raise AssertionError(f"keep-alive client ended: {self.proc.stderr.read()[-800:]}")
        return json.loads(line)

    def requests(self, count: int) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        batch = []
        while True:
            rec = self._line()
            if "done" in rec:
                break
            batch.append(rec)
        self.results.extend(batch)
        return batch

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=5)
