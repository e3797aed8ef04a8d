"""Full-NAT with real traffic in a one-arm topology: client and backends behind the balancer's
one interface, the backends with no route to the client's network at all. Two-arm NAT cannot
work there (a backend cannot answer the client); full-NAT carries hundreds of concurrent
connections, each backend sees the balancer's address as the source, and flows list shows it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 180.0       # the first attach compiles the program with bcc

# One bridge, two subnets on it: the backends' (10.78.1.0/24) and the client's (10.78.2.0/24).
# The balancer has an address in each on its one interface; the backends know only their own
# subnet (no default route), so a packet from the client's address cannot be answered by them.
LB_BACKEND_SIDE = "10.78.1.1"
LB_CLIENT_SIDE = "10.78.2.1"
CLIENT = "10.78.2.100"
BACKENDS = ("10.78.1.11", "10.78.1.12", "10.78.1.13")
NAT_VIP = "10.78.0.10"
FULLNAT_VIP = "10.78.0.11"
HTTP_PORT, UDP_PORT = 80, 9000
CONCURRENT = 240


@dataclass
class OneArm:
    prefix: str
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in ("sw", "lb", "cl", *(f"b{i}" for i in range(len(BACKENDS))))]

    def run(self, role: str, *argv: str, check: bool = True, timeout_s: float = 60.0,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", self.ns(role), *argv], check=False,
                              capture_output=True, text=True, timeout=timeout_s, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.ns(role)}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    def lbctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`lbctl -n <balancer> ARGS` in a child process, as a user types it."""
        proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", self.ns("lb"), *args],
                              check=False, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, cwd=REPO_ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"'lbctl {' '.join(args)}' exited {proc.returncode}: "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def build(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        for ns in self.namespaces:
            self.run(ns.rsplit("-", 1)[1], "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1")
            self.run(ns.rsplit("-", 1)[1], "ip", "link", "set", "lo", "up")
        self.run("lb", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                 "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        self.run("sw", "ip", "link", "add", "br0", "type", "bridge")
        self.run("sw", "ip", "link", "set", "br0", "up")
        hosts = {"lb": [f"{LB_BACKEND_SIDE}/24", f"{LB_CLIENT_SIDE}/24"], "cl": [f"{CLIENT}/24"],
                 **{f"b{i}": [f"{addr}/24"] for i, addr in enumerate(BACKENDS)}}
        for role, cidrs in hosts.items():
            port = f"p-{role}"
            subprocess.run(["ip", "link", "add", "eth0", "netns", self.ns(role), "type", "veth",
                            "peer", "name", port, "netns", self.ns("sw")], check=True)
            self.run("sw", "ip", "link", "set", port, "master", "br0", "up")
            for cidr in cidrs:
                self.run(role, "ip", "addr", "add", cidr, "dev", "eth0")
            self.run(role, "ip", "link", "set", "eth0", "up")
            if role != "lb":
                # Socket-made frames carry partial checksums; after XDP sends one back out,
                # the receiver would drop it.
                self.run(role, "ethtool", "-K", "eth0", "tx", "off")
        # XDP_TX / XDP_REDIRECT into a veth deliver only with GRO (or XDP) on the peer.
        self.run("sw", "ethtool", "-K", "p-lb", "gro", "on")
        for vip in (NAT_VIP, FULLNAT_VIP):
            self.run("cl", "ip", "route", "add", f"{vip}/32", "via", LB_CLIENT_SIDE)
        pythonpath = str(REPO_ROOT)
        for i in range(len(BACKENDS)):
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns(f"b{i}"), "env", f"PYTHONPATH={pythonpath}",
                 sys.executable, "-m", "lbctl.labserver", "--name", f"b{i}", "--http-port",
                 str(HTTP_PORT), "--udp-port", str(UDP_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for i, addr in enumerate(BACKENDS):
            deadline = time.monotonic() + 20
            while self.run("cl", "true", check=False) and \
                    self.run(f"b{i}", "ss", "-Htln", f"sport = :{HTTP_PORT}").stdout.strip() == "":
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server on {addr} did not start")
                time.sleep(0.05)

    def teardown(self) -> None:
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
        if Path(f"/var/run/netns/{self.ns('lb')}").exists():
            self.lbctl("detach", "--all", "--purge", "--force", check=False)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture(scope="module")
def one_arm() -> Iterator[OneArm]:
    lab = OneArm(f"fn{secrets.token_hex(3)}")
    try:
        lab.build()
        lab.lbctl("attach", "eth0")
        for vip, mode in ((NAT_VIP, "nat"), (FULLNAT_VIP, "fullnat")):
            lab.lbctl("vip", "add", f"{vip}:{HTTP_PORT}", "--forwarding", mode)
            lab.lbctl("backend", "add", f"{vip}:{HTTP_PORT}", *(f"{b}:{HTTP_PORT}" for b in BACKENDS))
        lab.lbctl("vip", "add", f"{FULLNAT_VIP}:{UDP_PORT}", "--proto", "udp", "--forwarding", "fullnat")
        lab.lbctl("backend", "add", f"{FULLNAT_VIP}:{UDP_PORT}", *(f"{b}:{UDP_PORT}" for b in BACKENDS),
                  "--proto", "udp")
        yield lab
    finally:
        lab.teardown()


# Opens every connection first and holds them all, then asks on each: all are live at once.
# Reports per connection the backend that answered and the client address it saw; after
# all are open it waits for a line on stdin, so the test can look at the flows meanwhile.
CONCURRENT_SNIPPET = r"""
import asyncio, json, sys
spec = json.loads(sys.argv[1])

async def one(i, opened, go):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(spec["host"], spec["port"]), 10)
    except Exception as exc:
        opened.append(None)
        return {"ok": False, "error": f"connect: {exc!r}"}
    # All connections are held open until the test has looked at them (a line on stdin).
    opened.append(i)
    await go.wait()
    try:
        w.write(f"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), 10)
    except Exception as exc:
        return {"ok": False, "error": f"request: {exc!r}"}
    finally:
        w.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    return {"ok": head[0].startswith("HTTP/1.1 200"), "backend": headers.get("X-Backend"),
            "seen_as": headers.get("X-Client-Addr")}

async def main():
    opened, go = [], asyncio.Event()
    tasks = [asyncio.create_task(one(i, opened, go)) for i in range(spec["count"])]
    while len(opened) < spec["count"]:
        await asyncio.sleep(0.01)
    print(json.dumps({"opened": sum(1 for o in opened if o is not None)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    go.set()
    for result in await asyncio.gather(*tasks):
        print(json.dumps(result), flush=True)

asyncio.run(main())
"""


def test_nat_mode_cannot_answer_here_the_backends_have_no_route_to_the_client(
        one_arm: OneArm) -> None:
    proc = one_arm.run("cl", sys.executable, "-I", "-S", "-c",
                       "import socket,sys\n"
                       f"s=socket.create_connection(('{NAT_VIP}',{HTTP_PORT}),timeout=2)\n",
                       check=False)
    assert proc.returncode != 0 and "timed out" in proc.stderr, proc.stderr


def test_hundreds_of_concurrent_connections_through_full_nat_all_succeed(one_arm: OneArm) -> None:
    spec = {"host": FULLNAT_VIP, "port": HTTP_PORT, "count": CONCURRENT}
    client = subprocess.Popen(
        ["ip", "netns", "exec", one_arm.ns("cl"), sys.executable, "-I", "-S", "-c",
         CONCURRENT_SNIPPET, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        opened = json.loads(client.stdout.readline() or "{}")
        if opened.get("opened") != CONCURRENT:
            out, err = client.communicate("go\n", timeout=60)
            pytest.fail(f"{opened} of {CONCURRENT} connections opened: {out[-500:]} {err[-300:]}")

        # All open at once: each is a flow with its own source port, and each backend holds
        # its connections from the balancer's own address.
        flows = [f for f in json.loads(one_arm.lbctl("flows", "list", "--vip", f"{FULLNAT_VIP}:{HTTP_PORT}", "--limit", "100000", "--json").stdout)
                 if f["vip"] == FULLNAT_VIP and f["forwarding"] == "fullnat" and f["proto"] == "tcp"]
        assert len(flows) >= CONCURRENT
        assert {f["snat"] for f in flows} == {LB_BACKEND_SIDE}
        per_backend = Counter((f["backend"], f["snat_port"]) for f in flows)
        assert max(per_backend.values()) == 1, "two flows share a source port to one backend"
        peers = set()
        for i in range(len(BACKENDS)):
            out = one_arm.run(f"b{i}", "ss", "-Htn", "state", "established",
                              f"sport = :{HTTP_PORT}").stdout
            peers |= {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}
        assert peers == {LB_BACKEND_SIDE}

        out, err = client.communicate("go\n", timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    results = [json.loads(line) for line in out.splitlines()[0:] if line.startswith("{\"ok\"")]
    failed = [r for r in results if not r["ok"]]
    assert len(results) == CONCURRENT and not failed, f"{len(failed)} failed: {failed[:3]} {err[-300:]}"
    assert {r["seen_as"].rsplit(":", 1)[0] for r in results} == {LB_BACKEND_SIDE}
    # A source port is claimed per backend: two backends may see the same one, one backend never.
    assert len({(r["backend"], r["seen_as"]) for r in results}) == CONCURRENT
    assert set(Counter(r["backend"] for r in results)) == {f"b{i}" for i in range(len(BACKENDS))}


def test_udp_through_full_nat_is_answered_from_the_vip(one_arm: OneArm) -> None:
    code = ("import socket\n"
            "answers = []\n"
            "for i in range(20):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
            f"    s.connect(('{FULLNAT_VIP}', {UDP_PORT})); s.send(b'ping%d' % i)\n"
            "    answers.append(s.recv(100).decode())\n"
            "print('\\n'.join(answers))\n")
    out = one_arm.run("cl", sys.executable, "-I", "-S", "-c", code).stdout.split("\n")
    answers = [a for a in out if a]
    assert len(answers) == 20 and all(a.split()[1] == f"ping{i}" for i, a in enumerate(answers))


def test_stats_and_vip_list_show_full_nat(one_arm: OneArm) -> None:
    vips = {(v["vip"], v["proto"]): v for v in json.loads(one_arm.lbctl("vip", "list", "--json").stdout)}
    fullnat = vips[(f"{FULLNAT_VIP}:{HTTP_PORT}", "tcp")]
    assert (fullnat["forwarding"], fullnat["snat"], fullnat["snat_ports"]) == ("fullnat", "fib", "1024-32767")
    assert fullnat["new_flows"] >= CONCURRENT
    table = one_arm.lbctl("flows", "list").stdout
    assert f"{LB_BACKEND_SIDE}:" in table


def test_doctor_suggests_full_nat_for_the_nat_vip_and_passes_the_full_nat_one(one_arm: OneArm) -> None:
    one_arm.run("cl", sys.executable, "-I", "-S", "-c",
                "import socket\n"
                "for i in range(5):\n"
                f"    try: socket.create_connection(('{NAT_VIP}', {HTTP_PORT}), timeout=1)\n"
                "    except OSError: pass\n", check=False)
    deadline = time.monotonic() + 30
    while True:
        proc = one_arm.lbctl("doctor", "--json", check=False)
        checks = [c for c in json.loads(proc.stdout)["checks"] if c["name"] == "replies"]
        nat_bad = [c for c in checks if not c["ok"] and "full-NAT" not in c["evidence"]]
        if nat_bad or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert proc.returncode == 1 and nat_bad, checks
    assert all("--forwarding fullnat" in c["fix"] for c in nat_bad)
    # The full-NAT VIP's flows were all answered: nothing flags it.
    assert not [c for c in checks if not c["ok"] and "full-NAT" in c["evidence"]]
    fullnat_only = json.loads(one_arm.lbctl("doctor", f"{FULLNAT_VIP}:{HTTP_PORT}", "--json",
                                            check=False).stdout)
    assert [c for c in fullnat_only["checks"] if c["name"] == "replies" and not c["ok"]] == []


def test_explain_names_the_snat_source_of_a_new_and_of_a_tracked_flow(one_arm: OneArm) -> None:
    client = subprocess.Popen(
        ["ip", "netns", "exec", one_arm.ns("cl"), sys.executable, "-I", "-S", "-c",
         ("import socket,sys\n"
         f"s=socket.create_connection(('{FULLNAT_VIP}',{HTTP_PORT}),timeout=5)\n"
         "print(s.getsockname()[1], flush=True)\nsys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        port = int(client.stdout.readline())
        ans = json.loads(one_arm.lbctl("explain", f"{CLIENT}:{port}", f"{FULLNAT_VIP}:{HTTP_PORT}",
                                       "--json").stdout)
        assert (ans["forwarding"], ans["snat"], ans["snat_ports"]) == ("fullnat", LB_BACKEND_SIDE,
                                                                       "1024-32767")
        tracked = ans["tracked_flow"]
        flows = json.loads(one_arm.lbctl("flows", "list", "--client", f"{CLIENT}:{port}",
                                         "--json").stdout)
        assert tracked["snat"] == f"{flows[0]['snat']}:{flows[0]['snat_port']}"
        text = one_arm.lbctl("explain", f"{CLIENT}:{port}", f"{FULLNAT_VIP}:{HTTP_PORT}").stdout
        assert f"from {tracked['snat']}" in text and "full-NAT" in text
    finally:
        client.communicate("\n", timeout=10)


def test_trace_shows_a_full_nat_connection_both_ways(one_arm: OneArm) -> None:
    from xdp.maps import LbMaps, pin_dir_for
    from xdp.tracing import TraceSwitch

    vip = f"{FULLNAT_VIP}:{HTTP_PORT}"
    proc = subprocess.Popen([sys.executable, "-m", "lbctl", "-n", one_arm.ns("lb"), "trace", "--vip",
                             vip, "--count", "4", "--json"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with LbMaps(pin_dir_for(one_arm.ns("lb"))) as maps:
                if int(TraceSwitch(maps["trace_ctl"]).read().enabled) == proc.pid:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        one_arm.run("cl", sys.executable, "-I", "-S", "-c",
                    "import socket\n"
                    f"s = socket.create_connection(('{FULLNAT_VIP}', {HTTP_PORT}), timeout=5)\n"
                    "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); s.recv(1000)\n")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    client = events[0]["in"].split(" ->")[0]
    backend = events[0]["backend"]
    snat = events[0]["out"].split(" ->")[0]
    assert snat.startswith(f"{LB_BACKEND_SIDE}:") and client.startswith(f"{CLIENT}:")
    # SYN, SYN-ACK, the handshake's ACK, the request: one interface, both ways rewritten.
    assert [(e["iface"], e["outcome"]) for e in events] == [
        ("eth0", "new flow"), ("eth0", "reverse NAT"), ("eth0", "flow hit"), ("eth0", "flow hit")]
    assert [(e["in"], e["out"]) for e in events] == [
        (f"{client} -> {vip} tcp", f"{snat} -> {backend} tcp"),
        (f"{backend} -> {snat} tcp", f"{vip} -> {client} tcp"),
        (f"{client} -> {vip} tcp", f"{snat} -> {backend} tcp"),
        (f"{client} -> {vip} tcp", f"{snat} -> {backend} tcp")]
