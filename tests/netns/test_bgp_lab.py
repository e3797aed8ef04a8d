"""BGP on the two-node lab (router with BIRD and ECMP, two nodes each with an agent and its own
BIRD): both nodes' routes become one route with two next hops; drain, a VIP without healthy
backends, a detached data plane, a link down (hold timer) and a stopped or killed agent each
take a node's route away, and the way back restores it."""
from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import wait_for

from lbctl import bgp
from lbctl.lab_cluster import ClusterLab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces, runs BIRD and XDP"),
]

REPO = Path(__file__).resolve().parents[2]
SECOND_VIP = "10.77.0.11"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    lab = ClusterLab(f"bg{secrets.token_hex(2)}", nodes=2, source="file")   # node-local changes
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def both_up(cluster: ClusterLab) -> ClusterLab:
    """Each test starts from both nodes announcing (a test that broke one restores it here)."""
    for n in cluster.nodes:
        cluster.run(n, ["ip", "link", "set", "eth0", "up"], check=True)
        if cluster.agent_pid(n) is None:
            cluster.start_agent(n)
        cluster.wait_agent(n)
    cluster.wait_route(2, timeout_s=60.0)
    return cluster


def lbctl(lab: ClusterLab, node_name: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    node = lab.host(node_name)
    proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", node.netns, *args], capture_output=True,
                          text=True, check=False, cwd=REPO, timeout=120)
    if ok:
        assert proc.returncode == 0, f"lbctl {' '.join(args)}: {proc.stderr}{proc.stdout}"
    return proc


def status(lab: ClusterLab, node_name: str) -> dict:
    return json.loads(lbctl(lab, node_name, "status", "--json").stdout)


def router_routes(lab: ClusterLab) -> dict[str, list[str]]:
    """VIP /32 routes in the router's kernel table -> next hops."""
    out = lab.run(lab.router, ["ip", "-j", "route", "show", "proto", "bird"], check=True).stdout
    routes: dict[str, list[str]] = {}
    for r in json.loads(out or "[]"):
        hops = [h["gateway"] for h in r.get("nexthops", [])] or [r["gateway"]]
        routes[r["dst"]] = sorted(hops)
    return routes


def test_both_nodes_announce_one_route_with_two_next_hops(both_up: ClusterLab):
    lab = both_up
    assert router_routes(lab) == {lab.vip: [n.addr for n in lab.nodes]}
    views = [status(lab, n.name) for n in lab.nodes]
    for n, st in zip(lab.nodes, views):
        assert st["bgp"]["announced"] == [lab.vip]
        assert st["bgp"]["router_id"] == n.addr          # defaulted from eth0's address
        assert [s["established"] for s in st["bgp"]["sessions"]] == [True]
    # Same backends, same ring on both nodes: the fingerprints agree and are printed.
    fingerprints = [[v["ring"] for v in st["vip_modes"]] for st in views]
    assert fingerprints[0] == fingerprints[1] and fingerprints[0][0]
    text = lbctl(lab, "lb1", "status").stdout
    assert fingerprints[0][0] in text and "Established" in text and f"announced {lab.vip}/32" in text


def test_node_drain_withdraws_and_undrain_announces_again(both_up: ClusterLab):
    lab = both_up
    out = lbctl(lab, "lb1", "node", "drain").stdout
    assert "announcing nothing" in out
    wait_for(lambda: router_routes(lab).get(lab.vip) == [lab.nodes[1].addr], "the router to drop lb1")
    assert "DRAINED" in lbctl(lab, "lb1", "status").stdout
    # The flag outlives the agent: a restarted agent starts drained.
    lab.stop_agent(lab.nodes[0])
    lab.start_agent(lab.nodes[0])
    lab.wait_agent(lab.nodes[0])
    wait_for(lambda: status(lab, "lb1")["bgp"]["drain_applied"], "the restarted agent's first announcement")
    assert status(lab, "lb1")["bgp"]["announced"] == []
    assert router_routes(lab).get(lab.vip) == [lab.nodes[1].addr]
    out = lbctl(lab, "lb1", "node", "undrain").stdout
    assert f"announcing {lab.vip}/32" in out
    lab.wait_route(2)


def test_a_vip_without_a_healthy_backend_is_withdrawn(both_up: ClusterLab):
    lab = both_up
    node = lab.nodes[0]
    base = lab.node_config(node)
    second = copy.deepcopy(base["vips"][0])
    second["vip"] = f"{SECOND_VIP}:{lab.http_port}"
    config = copy.deepcopy(base)
    config["vips"].append(second)
    try:
        lab.reload_agent(node, config)
        wait_for(lambda: router_routes(lab).get(SECOND_VIP) == [node.addr], "lb1 to announce the second VIP")
        # Its checks now go to a port nobody listens on: every backend fails, the VIP goes,
        # the first VIP (same backends, checked on the right port) stays.
        second["health"]["port"] = 81
        lab.reload_agent(node, config)
        wait_for(lambda: SECOND_VIP not in router_routes(lab), "lb1 to withdraw the VIP without healthy backends")
        assert router_routes(lab)[lab.vip] == [n.addr for n in lab.nodes]
        withheld = status(lab, "lb1")["bgp"]["withheld"]
        assert "0 of 3 backends healthy, min_healthy 1" in withheld[SECOND_VIP]
        # min_healthy: with the checks healthy again but 3 of 3 required and one backend out
        # by the operator, the VIP stays withdrawn.
        second["health"].pop("port")
        second["min_healthy"] = 3
        second["backends"][2]["state"] = "drain"
        lab.reload_agent(node, config)
        wait_for(lambda: "2 of 3 backends healthy, min_healthy 3"
                 in status(lab, "lb1")["bgp"]["withheld"].get(SECOND_VIP, ""), "the min_healthy reason")
        assert SECOND_VIP not in router_routes(lab)
    finally:
        lab.reload_agent(node, base)
    wait_for(lambda: SECOND_VIP not in status(lab, "lb1")["bgp"]["withheld"], "lb1 back on the lab's file")


def test_a_data_plane_that_is_not_attached_is_withdrawn(both_up: ClusterLab):
    lab = both_up
    node = lab.nodes[1]
    lbctl(lab, "lb2", "detach", "--all", "--force")
    wait_for(lambda: router_routes(lab).get(lab.vip) == [lab.nodes[0].addr], "the router to drop lb2")
    assert "not attached" in status(lab, "lb2")["bgp"]["withheld"][lab.vip]
    # SIGHUP re-applies the file, which attaches again: the self-check passes, the route is back.
    lab.reload_agent(node, lab.node_config(node))
    # Attaching again compiles the program (bcc): 15-18 s on a loaded 2-core machine.
    lab.wait_route(2, timeout_s=120.0)


def test_link_down_ends_the_session_by_its_hold_timer(both_up: ClusterLab):
    lab = both_up
    log = lab.run_dir / "router-bird.log"
    before = log.read_text().count("node_lb1: Error: Hold timer expired")
    lab.run(lab.nodes[0], ["ip", "link", "set", "eth0", "down"], check=True)
    try:
        wait_for(lambda: router_routes(lab).get(lab.vip) == [lab.nodes[1].addr], "the router to drop lb1")
        # No notification can cross a dead link: the router dropped the route because lb1's
        # keepalives stopped for the hold time.
        assert log.read_text().count("node_lb1: Error: Hold timer expired") == before + 1
    finally:
        lab.run(lab.nodes[0], ["ip", "link", "set", "eth0", "up"], check=True)
    lab.wait_route(2, timeout_s=60.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill-9"])
def test_an_agent_that_stops_or_dies_takes_its_routes_away(both_up: ClusterLab, sig: int):
    lab = both_up
    node = lab.nodes[1]
    conf = f"/run/lbctl/{node.netns}/{bgp.CONF_FILE}"
    lab.stop_agent(node, sig)
    wait_for(lambda: router_routes(lab).get(lab.vip) == [lab.nodes[0].addr], "the router to drop lb2")
    # Its BIRD went with it (kill -9 included: the parent-death signal), and closed the session
    # itself: the router did not have to wait for the hold timer.
    wait_for(lambda: not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, conf)],
             "lb2's BIRD to exit")
    tail = (lab.run_dir / "router-bird.log").read_text().splitlines()[-3:]
    assert any("node_lb2: Received: Administrative shutdown" in line for line in tail), tail
    # The data plane stays attached: stopping the agent is not detaching.
    assert status(lab, "lb2")["attached"]
    if sig == signal.SIGTERM:
        # A graceful stop leaves nothing of the agent's or its BIRD's in /run (kill -9 keeps
        # the log for the post-mortem).
        assert not Path(conf).parent.exists(), sorted(p.name for p in Path(conf).parent.iterdir())


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text.encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_bird_that_dies_is_started_again_by_its_agent(both_up: ClusterLab):
    lab = both_up
    node = lab.nodes[0]
    pid = int(Path(f"/run/lbctl/{node.netns}/{bgp.PID_FILE}").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: lab.vip_next_hops() == [lab.nodes[1].addr], "the router to drop lb1")
    # The agent notices within its announce interval and starts a new BIRD, which announces again.
    lab.wait_route(2, timeout_s=60.0)
    assert int(Path(f"/run/lbctl/{node.netns}/{bgp.PID_FILE}").read_text()) != pid
    assert "BGP: BIRD exited" in (lab.run_dir / f"{node.name}-agent.log").read_text()
