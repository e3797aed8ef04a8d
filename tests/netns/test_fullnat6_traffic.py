"""Full-NAT over IPv6 with real traffic: IPv6 HTTP through a full-NAT VIP whose backends have
no route back to the client's network, one-arm (client and backends behind the balancer's one
interface, where NAT66 cannot answer) and across a second interface; each backend sees the
balancer's IPv6 address, every concurrent connection its own source port; UDP; the listings
and explain print the SNAT source as [v6]:port."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from test_fullnat_onearm import CONCURRENT_SNIPPET, HTTP_PORT, REPO_ROOT, UDP_PORT, OneArm

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

# One bridge carries the backends' subnet (fd00:78:1::/64) and the client's (fd00:78:2::/64);
# the balancer has an address in each on its one interface (eth0). A second bridge, on the
# balancer's eth1, holds one more backend in fd00:78:3::/64. No backend has a route beyond
# its own subnet: a packet from the client's address cannot be answered by any of them.
LB_BACKEND_SIDE, LB_CLIENT_SIDE, LB_FAR_SIDE = "fd00:78:1::1", "fd00:78:2::1", "fd00:78:3::1"
CLIENT = "fd00:78:2::100"
BACKENDS = ("fd00:78:1::11", "fd00:78:1::12", "fd00:78:1::13")
FAR_BACKEND = "fd00:78:3::11"
NAT_VIP, FULLNAT_VIP, FAR_VIP = "fd00:78::10", "fd00:78::11", "fd00:78::12"
CONCURRENT = 120


class OneArm6(OneArm):
    """test_fullnat_onearm's lab over IPv6, with a far backend behind a second interface."""

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in ("sw", "sw2", "lb", "cl", "far",
                                     *(f"b{i}" for i in range(len(BACKENDS))))]

    def _host(self, role: str, switch: str, ifname: str, cidrs: list[str]) -> None:
        port = f"p-{role}{ifname[-1]}"
        subprocess.run(["ip", "link", "add", ifname, "netns", self.ns(role), "type", "veth",
                        "peer", "name", port, "netns", self.ns(switch)], check=True)
        self.run(switch, "ip", "link", "set", port, "master", "br0", "up")
        for cidr in cidrs:
            # nodad: the address is usable at once (no tentative second of duplicate detection).
            self.run(role, "ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad")
        self.run(role, "ip", "link", "set", ifname, "up")
        if role != "lb":
            # Socket-made frames carry partial checksums; after XDP sends one back out, the
            # receiver would drop it.
            self.run(role, "ethtool", "-K", ifname, "tx", "off")
        else:
            # XDP_TX / XDP_REDIRECT into a veth deliver only with GRO (or XDP) on the peer.
            self.run(switch, "ethtool", "-K", port, "gro", "on")

    def build(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        for ns in self.namespaces:
            self.run(ns.rsplit("-", 1)[1], "ip", "link", "set", "lo", "up")
        self.run("lb", "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        for switch in ("sw", "sw2"):
            self.run(switch, "ip", "link", "add", "br0", "type", "bridge")
            self.run(switch, "ip", "link", "set", "br0", "up")
        self._host("lb", "sw", "eth0", [f"{LB_BACKEND_SIDE}/64", f"{LB_CLIENT_SIDE}/64"])
        self._host("lb", "sw2", "eth1", [f"{LB_FAR_SIDE}/64"])
        self._host("cl", "sw", "eth0", [f"{CLIENT}/64"])
        self._host("far", "sw2", "eth0", [f"{FAR_BACKEND}/64"])
        for i, addr in enumerate(BACKENDS):
            self._host(f"b{i}", "sw", "eth0", [f"{addr}/64"])
        for vip in (NAT_VIP, FULLNAT_VIP, FAR_VIP):
            self.run("cl", "ip", "-6", "route", "add", f"{vip}/128", "via", LB_CLIENT_SIDE)
        servers = [(f"b{i}", f"b{i}") for i in range(len(BACKENDS))] + [("far", "far")]
        for role, name in servers:
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), "env", f"PYTHONPATH={REPO_ROOT}",
                 sys.executable, "-m", "lbctl.labserver", "--name", name, "--bind", "::",
                 "--http-port", str(HTTP_PORT), "--udp-port", str(UDP_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for role, _ in servers:
            deadline = time.monotonic() + 20
            while self.run(role, "ss", "-Htln", f"sport = :{HTTP_PORT}").stdout.strip() == "":
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server in {self.ns(role)} did not start")
                time.sleep(0.05)


@pytest.fixture(scope="module")
def lab() -> Iterator[OneArm6]:
    built = OneArm6(f"fs{secrets.token_hex(3)}")
    try:
        built.build()
        built.lbctl("attach", "eth0", "eth1")
        for vip, mode, backends in ((NAT_VIP, "nat", BACKENDS), (FULLNAT_VIP, "fullnat", BACKENDS),
                                    (FAR_VIP, "fullnat", (FAR_BACKEND,))):
            built.lbctl("vip", "add", f"[{vip}]:{HTTP_PORT}", "--forwarding", mode)
            built.lbctl("backend", "add", f"[{vip}]:{HTTP_PORT}", *(f"[{b}]:{HTTP_PORT}" for b in backends))
        built.lbctl("vip", "add", f"[{FULLNAT_VIP}]:{UDP_PORT}", "--proto", "udp", "--forwarding", "fullnat")
        built.lbctl("backend", "add", f"[{FULLNAT_VIP}]:{UDP_PORT}", "--proto", "udp",
                    *(f"[{b}]:{UDP_PORT}" for b in BACKENDS))
        yield built
    finally:
        built.teardown()


def get(lab: OneArm6, vip: str, count: int = 1) -> list[dict[str, str]]:
    """`count` HTTP GETs from the client to [vip]:80, one connection each: who answered, and
    the peer address it saw."""
    code = ("import http.client, json\n"
            f"for i in range({count}):\n"
            f"    c = http.client.HTTPConnection('{vip}', {HTTP_PORT}, timeout=5); c.request('GET', '/')\n"
            "    r = c.getresponse(); r.read()\n"
            "    print(json.dumps({'status': r.status, 'backend': r.getheader('X-Backend'),\n"
            "                      'seen_as': r.getheader('X-Client-Addr')}))\n"
            "    c.close()\n")
    out = lab.run("cl", sys.executable, "-I", "-S", "-c", code, timeout_s=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_nat66_cannot_answer_here_the_backends_have_no_route_to_the_client(lab: OneArm6) -> None:
    proc = lab.run("cl", sys.executable, "-I", "-S", "-c",
                   "import socket\n"
                   f"socket.create_connection(('{NAT_VIP}', {HTTP_PORT}), timeout=2)\n", check=False)
    assert proc.returncode != 0 and "timed out" in proc.stderr, proc.stderr


def test_concurrent_ipv6_connections_through_one_arm_full_nat_all_succeed(lab: OneArm6) -> None:
    spec = {"host": FULLNAT_VIP, "port": HTTP_PORT, "count": CONCURRENT}
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("cl"), sys.executable, "-I", "-S", "-c",
         CONCURRENT_SNIPPET, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        opened = json.loads(client.stdout.readline() or "{}")
        if opened.get("opened") != CONCURRENT:
            out, err = client.communicate("go\n", timeout=60)
            pytest.fail(f"{opened} of {CONCURRENT} connections opened: {out[-500:]} {err[-300:]}")
        # All open at once: each a flow from the balancer's own address with its own port.
        flows = [f for f in json.loads(lab.lbctl("flows", "list", "--vip", f"[{FULLNAT_VIP}]:{HTTP_PORT}",
                                                 "--limit", "100000", "--json").stdout)
                 if f["forwarding"] == "fullnat" and f["proto"] == "tcp"]
        assert len(flows) >= CONCURRENT
        assert {f["snat"] for f in flows} == {LB_BACKEND_SIDE}
        assert max(Counter((f["backend"], f["snat_port"]) for f in flows).values()) == 1
        peers = set()
        for i in range(len(BACKENDS)):
            out = lab.run(f"b{i}", "ss", "-Htn", "state", "established", f"sport = :{HTTP_PORT}").stdout
            peers |= {line.split()[-1].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()
                      if line.strip()}
        assert peers == {LB_BACKEND_SIDE}
        out, err = client.communicate("go\n", timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{\"ok\"")]
    failed = [r for r in results if not r["ok"]]
    assert len(results) == CONCURRENT and not failed, f"{len(failed)} failed: {failed[:3]} {err[-300:]}"
    assert {r["seen_as"].rsplit(":", 1)[0] for r in results} == {LB_BACKEND_SIDE}
    assert len({(r["backend"], r["seen_as"]) for r in results}) == CONCURRENT
    assert set(Counter(r["backend"] for r in results)) == {f"b{i}" for i in range(len(BACKENDS))}


def test_a_backend_behind_another_interface_with_no_route_back_is_reached_through_full_nat(
        lab: OneArm6) -> None:
    answers = get(lab, FAR_VIP, 20)
    assert [a["status"] for a in answers] == [200] * 20
    assert {a["backend"] for a in answers} == {"far"}
    # The far backend sees the balancer's address on its own link, never the client's.
    assert {a["seen_as"].rsplit(":", 1)[0] for a in answers} == {LB_FAR_SIDE}
    assert lab.run("far", "ip", "-6", "route", "get", CLIENT, check=False).returncode != 0


def test_udp_over_ipv6_full_nat_is_answered_from_the_vip(lab: OneArm6) -> None:
    code = ("import socket\n"
            "answers = []\n"
            "for i in range(20):\n"
            "    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3)\n"
            f"    s.connect(('{FULLNAT_VIP}', {UDP_PORT})); s.send(b'ping%d' % i)\n"
            "    data, peer = s.recvfrom(100)\n"
            "    answers.append(peer[0] + ' ' + data.decode())\n"
            "print('\\n'.join(answers))\n")
    answers = [a for a in lab.run("cl", sys.executable, "-I", "-S", "-c", code).stdout.split("\n") if a]
    assert len(answers) == 20
    assert all(a.split()[0] == FULLNAT_VIP and a.split()[2] == f"ping{i}" for i, a in enumerate(answers))


def test_listings_and_explain_show_the_ipv6_snat_source(lab: OneArm6) -> None:
    vips = {(v["vip"], v["proto"]): v for v in json.loads(lab.lbctl("vip", "list", "--json").stdout)}
    row = vips[(f"[{FULLNAT_VIP}]:{HTTP_PORT}", "tcp")]
    assert (row["forwarding"], row["snat"], row["snat_ports"]) == ("fullnat", "fib", "1024-32767")
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("cl"), sys.executable, "-I", "-S", "-c",
         ("import socket,sys\n"
          f"s=socket.create_connection(('{FULLNAT_VIP}',{HTTP_PORT}),timeout=5)\n"
          "print(s.getsockname()[1], flush=True)\nsys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        port = int(client.stdout.readline())
        ans = json.loads(lab.lbctl("explain", f"[{CLIENT}]:{port}", f"[{FULLNAT_VIP}]:{HTTP_PORT}",
                                   "--json").stdout)
        assert (ans["forwarding"], ans["snat"]) == ("fullnat", LB_BACKEND_SIDE)
        flows = json.loads(lab.lbctl("flows", "list", "--client", f"[{CLIENT}]:{port}", "--json").stdout)
        assert ans["tracked_flow"]["snat"] == f"[{flows[0]['snat']}]:{flows[0]['snat_port']}"
        table = lab.lbctl("flows", "list", "--client", f"[{CLIENT}]:{port}").stdout
        assert f"[{LB_BACKEND_SIDE}]:{flows[0]['snat_port']}" in table
    finally:
        client.communicate("\n", timeout=10)
    vips = {(v["vip"], v["proto"]): v for v in json.loads(lab.lbctl("vip", "list", "--json").stdout)}
    assert vips[(f"[{FULLNAT_VIP}]:{HTTP_PORT}", "tcp")]["new_flows"] >= 1
