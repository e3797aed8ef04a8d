"""The one-arm full-NAT lab, once for both families (test_fullnat_onearm.py: IPv4,
test_fullnat6_traffic.py: IPv6): namespaces on bridges, a balancer with an address in the
backends' subnet and one in the client's on the same interface, backends with no route beyond
their own subnet, lbctl.labserver in each, the real CLI; and the checks both families make
through it (concurrent connections each from its own SNAT port, UDP answered from the VIP)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 180.0       # the first attach compiles the program with bcc
HTTP_PORT, UDP_PORT = 80, 9000


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class Link:
    """A veth from `role`'s `ifname` (with `cidrs`) to a port on `switch`'s bridge."""

    role: str
    switch: str
    ifname: str
    cidrs: tuple[str, ...]


@dataclass
class OneArm:
    """`links` wire the namespaces (the balancer's role is "lb", the client's "cl");
    `servers` are the roles that run a lab server, named after them; the client reaches each
    of `vips` through `gateway`, the balancer's address on its side."""

    prefix: str
    ipv6: bool
    links: tuple[Link, ...]
    servers: tuple[str, ...]
    vips: tuple[str, ...]
    gateway: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        roles = [link.switch for link in self.links] + [link.role for link in self.links]
        return [self.ns(r) for r in dict.fromkeys(roles)]

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

    def _link(self, n: int, link: Link) -> None:
        port = f"p-{link.role}{n}"
        subprocess.run(["ip", "link", "add", link.ifname, "netns", self.ns(link.role), "type", "veth",
                        "peer", "name", port, "netns", self.ns(link.switch)], check=True)
        self.run(link.switch, "ip", "link", "set", port, "master", "br0", "up")
        for cidr in link.cidrs:
            if self.ipv6:
                # nodad: the address is usable at once (no tentative second of duplicate detection).
                self.run(link.role, "ip", "-6", "addr", "add", cidr, "dev", link.ifname, "nodad")
            else:
                self.run(link.role, "ip", "addr", "add", cidr, "dev", link.ifname)
        self.run(link.role, "ip", "link", "set", link.ifname, "up")
        if link.role != "lb":
            # Socket-made frames carry partial checksums; after XDP sends one back out, the
            # receiver would drop it.
            self.run(link.role, "ethtool", "-K", link.ifname, "tx", "off")
        else:
            # XDP_TX / XDP_REDIRECT into a veth deliver only with GRO (or XDP) on the peer.
            self.run(link.switch, "ethtool", "-K", port, "gro", "on")

    def build(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        for ns in self.namespaces:
            role = ns.rsplit("-", 1)[1]
            if not self.ipv6:
                self.run(role, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                         "net.ipv6.conf.default.disable_ipv6=1")
            self.run(role, "ip", "link", "set", "lo", "up")
        if self.ipv6:
            self.run("lb", "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        else:
            self.run("lb", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                     "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        for switch in dict.fromkeys(link.switch for link in self.links):
            self.run(switch, "ip", "link", "add", "br0", "type", "bridge")
            self.run(switch, "ip", "link", "set", "br0", "up")
        for n, link in enumerate(self.links):
            self._link(n, link)
        for vip in self.vips:
            self.run("cl", "ip", "-6" if self.ipv6 else "-4", "route", "add",
                     f"{vip}/{128 if self.ipv6 else 32}", "via", self.gateway)
        for role in self.servers:
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), "env", f"PYTHONPATH={REPO_ROOT}",
                 sys.executable, "-m", "lbctl.labserver", "--name", role,
                 *(["--bind", "::"] if self.ipv6 else []),
                 "--http-port", str(HTTP_PORT), "--udp-port", str(UDP_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for role in self.servers:
            deadline = time.monotonic() + 20
            while self.run(role, "ss", "-Htln", f"sport = :{HTTP_PORT}").stdout.strip() == "":
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server in {self.ns(role)} did not start")
                time.sleep(0.05)

    def teardown(self) -> None:
        for server in self.procs:
            server.terminate()
        for server in self.procs:
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
        if Path(f"/var/run/netns/{self.ns('lb')}").exists():
            self.lbctl("detach", "--all", "--purge", "--force", check=False)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@contextmanager
def running(lab: OneArm, ifaces: Sequence[str], http_vips: Sequence[tuple[str, str, Sequence[str]]],
            udp_vip: str, udp_backends: Sequence[str]) -> Iterator[OneArm]:
    """The lab built, the balancer attached on `ifaces`, each (vip, forwarding, backends) of
    `http_vips` added on HTTP_PORT and a full-NAT UDP VIP on UDP_PORT; torn down whatever
    happened."""
    try:
        lab.build()
        lab.lbctl("attach", *ifaces)
        for vip, mode, backends in http_vips:
            lab.lbctl("vip", "add", endpoint(vip, HTTP_PORT), "--forwarding", mode)
            lab.lbctl("backend", "add", endpoint(vip, HTTP_PORT), *(endpoint(b, HTTP_PORT) for b in backends))
        lab.lbctl("vip", "add", endpoint(udp_vip, UDP_PORT), "--proto", "udp", "--forwarding", "fullnat")
        lab.lbctl("backend", "add", endpoint(udp_vip, UDP_PORT), "--proto", "udp",
                  *(endpoint(b, UDP_PORT) for b in udp_backends))
        yield lab
    finally:
        lab.teardown()


@contextmanager
def held_connection(lab: OneArm, vip: str) -> Iterator[int]:
    """One connection from the client to [vip]:HTTP_PORT, held open for the body; yields the
    client's port."""
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("cl"), sys.executable, "-I", "-S", "-c",
         ("import socket,sys\n"
          f"s=socket.create_connection(('{vip}',{HTTP_PORT}),timeout=5)\n"
          "print(s.getsockname()[1], flush=True)\nsys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        yield int(client.stdout.readline())
    finally:
        client.communicate("\n", timeout=10)


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


def check_concurrent(lab: OneArm, vip: str, count: int, snat: str,
                                 backends: Sequence[str]) -> None:
    """`count` connections to [vip]:HTTP_PORT held open at once: each a full-NAT flow from
    `snat` with its own source port per backend, every backend role in `backends` holding its
    connections from `snat` only; then each asks once and is answered."""
    spec = {"host": vip, "port": HTTP_PORT, "count": count}
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("cl"), sys.executable, "-I", "-S", "-c",
         CONCURRENT_SNIPPET, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        opened = json.loads(client.stdout.readline() or "{}")
        if opened.get("opened") != count:
            out, err = client.communicate("go\n", timeout=60)
            pytest.fail(f"{opened} of {count} connections opened: {out[-500:]} {err[-300:]}")
        # All open at once: each is a flow with its own source port, and each backend holds
        # its connections from the balancer's own address.
        listed = lab.lbctl("flows", "list", "--vip", endpoint(vip, HTTP_PORT), "--limit", "100000",
                           "--json").stdout
        flows = [f for f in json.loads(listed) if f["forwarding"] == "fullnat" and f["proto"] == "tcp"]
        assert len(flows) >= count
        assert {f["snat"] for f in flows} == {snat}
        per_backend = Counter((f["backend"], f["snat_port"]) for f in flows)
        assert max(per_backend.values()) == 1, "two flows share a source port to one backend"
        peers = set()
        for role in backends:
            out = lab.run(role, "ss", "-Htn", "state", "established", f"sport = :{HTTP_PORT}").stdout
            peers |= {line.split()[-1].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()
                      if line.strip()}
        assert peers == {snat}
        out, err = client.communicate("go\n", timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{\"ok\"")]
    failed = [r for r in results if not r["ok"]]
    assert len(results) == count and not failed, f"{len(failed)} failed: {failed[:3]} {err[-300:]}"
    assert {r["seen_as"].rsplit(":", 1)[0] for r in results} == {snat}
    # A source port is claimed per backend: two backends may see the same one, one backend never.
    assert len({(r["backend"], r["seen_as"]) for r in results}) == count
    assert set(Counter(r["backend"] for r in results)) == set(backends)


def check_udp_from_vip(lab: OneArm, vip: str) -> None:
    """20 datagrams to [vip]:UDP_PORT, each from its own socket: each echoed, from the VIP."""
    family = "AF_INET6" if lab.ipv6 else "AF_INET"
    code = ("import socket\n"
            "answers = []\n"
            "for i in range(20):\n"
            f"    s = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.settimeout(3)\n"
            f"    s.connect(('{vip}', {UDP_PORT})); s.send(b'ping%d' % i)\n"
            "    data, peer = s.recvfrom(100)\n"
            "    answers.append(peer[0] + ' ' + data.decode())\n"
            "print('\\n'.join(answers))\n")
    answers = [a for a in lab.run("cl", sys.executable, "-I", "-S", "-c", code).stdout.split("\n") if a]
    assert len(answers) == 20
    assert all(a.split()[0] == vip and a.split()[2] == f"ping{i}" for i, a in enumerate(answers))
