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
from collections.abc import Iterator

import onearm
import pytest
from onearm import HTTP_PORT, REPO_ROOT, Link, OneArm

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: builds network namespaces and loads XDP programs"),
]

# One bridge, two subnets on it: the backends' (10.78.1.0/24) and the client's (10.78.2.0/24).
# The balancer has an address in each on its one interface; the backends know only their own
# subnet (no default route), so a packet from the client's address cannot be answered by them.
LB_BACKEND_SIDE = "10.78.1.1"
LB_CLIENT_SIDE = "10.78.2.1"
CLIENT = "10.78.2.100"
BACKENDS = ("10.78.1.11", "10.78.1.12", "10.78.1.13")
BACKEND_ROLES = tuple(f"b{i}" for i in range(len(BACKENDS)))
NAT_VIP = "10.78.0.10"
FULLNAT_VIP = "10.78.0.11"
CONCURRENT = 240


@pytest.fixture(scope="module")
def one_arm() -> Iterator[OneArm]:
    links = (Link("lb", "sw", "eth0", (f"{LB_BACKEND_SIDE}/24", f"{LB_CLIENT_SIDE}/24")),
             Link("cl", "sw", "eth0", (f"{CLIENT}/24",)),
             *(Link(role, "sw", "eth0", (f"{addr}/24",)) for role, addr in zip(BACKEND_ROLES, BACKENDS)))
    lab = OneArm(f"fn{secrets.token_hex(3)}", False, links, BACKEND_ROLES, (NAT_VIP, FULLNAT_VIP),
                 LB_CLIENT_SIDE)
    with onearm.running(lab, ["eth0"], [(NAT_VIP, "nat", BACKENDS), (FULLNAT_VIP, "fullnat", BACKENDS)],
                 FULLNAT_VIP, BACKENDS):
        yield lab


def test_nat_mode_cannot_answer_here_the_backends_have_no_route_to_the_client(
        one_arm: OneArm) -> None:
    proc = one_arm.run("cl", sys.executable, "-I", "-S", "-c",
                       "import socket,sys\n"
                       f"s=socket.create_connection(('{NAT_VIP}',{HTTP_PORT}),timeout=2)\n",
                       check=False)
    assert proc.returncode != 0 and "timed out" in proc.stderr, proc.stderr


def test_hundreds_of_concurrent_connections_through_full_nat_all_succeed(one_arm: OneArm) -> None:
    onearm.check_concurrent(one_arm, FULLNAT_VIP, CONCURRENT, LB_BACKEND_SIDE, BACKEND_ROLES)


def test_udp_through_full_nat_is_answered_from_the_vip(one_arm: OneArm) -> None:
    onearm.check_udp_from_vip(one_arm, FULLNAT_VIP)


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
    with onearm.held_connection(one_arm, FULLNAT_VIP) as port:
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
