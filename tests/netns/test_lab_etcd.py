"""The multi-node lab as `lbctl lab up --nodes 2` builds it: an etcd in the router's namespace
holds the one document both nodes' agents follow (`--config etcd://... --node-name lbK`);
`cluster status` lists both on the pushed revision, a push reaches both (the traffic shows it),
a broken push changes nothing anywhere, a half-built lab is removed, and `lab down` leaves no
process, namespace or file behind."""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from agentlab import wait_for

from lbctl.agent import read_published
from lbctl.lab_cluster import ClusterLab, lab_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces, runs BIRD, etcd and XDP"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs Debian's etcd-server (lbctl/setup.sh installs it)"),
]

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbctl", *args], capture_output=True, text=True, check=False,
                          cwd=REPO, timeout=600, env=env)


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[ClusterLab, str]]:
    prefix = f"sc{secrets.token_hex(2)}"
    try:
        proc = cli("lab", "up", "--nodes", "2", "--prefix", prefix)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        lab = lab_for(prefix)
        assert isinstance(lab, ClusterLab) and lab.source == "etcd"
        yield lab, proc.stdout
    finally:
        lab_for(prefix).down()


@pytest.fixture
def lab(built: tuple[ClusterLab, str]) -> ClusterLab:
    return built[0]


def served(lab: ClusterLab, count: int = 60) -> set[str]:
    return set(lab.http_get(lab.vip, lab.http_port, count=count, new_connection=True, timeout_s=5.0))


def test_lab_up_prints_the_etcd_and_every_node_reports_the_pushed_revision(built: tuple[ClusterLab, str]):
    lab, out = built
    assert f"etcd: {lab.etcd_url}" in out, out
    assert f"lbctl -n {lab.router.netns} cluster status --etcd {lab.etcd_url_here}" in out, out
    st = json.loads(cli("lab", "status", "--prefix", lab.prefix, "--json").stdout)
    assert st["up"] and st["etcd"] == str(lab.etcd_url) and st["etcd_pid"]
    assert all(st["agents"].values()), st["agents"]
    # The operator's command, as lab up prints it.
    proc = cli("-n", lab.router.netns, "cluster", "status", "--etcd", str(lab.etcd_url_here))
    assert proc.returncode == 0, proc.stderr
    # A node announces once it has applied the revision and its backends' health has settled
    # (a node coming into service), and publishes that on its next report: wait for both.
    def announcing() -> dict | None:
        st = lab.cluster_status()
        nodes = st["nodes"]
        done = len(nodes) == 2 and all(n["bgp"]["announced"] == [lab.vip] for n in nodes)
        return st if done else None
    status = wait_for(announcing, "both nodes to publish their VIP as announced", timeout_s=90.0)
    latest = status["latest_revision"]
    assert latest > 0
    nodes = {n["name"]: n for n in status["nodes"]}
    assert sorted(nodes) == ["lb1", "lb2"]
    for name, n in nodes.items():
        assert n["applied_revision"] == latest and n["current"], n
        assert f"{name}  " in proc.stdout and f"{latest}/{latest}" in proc.stdout
        assert n["bgp"]["announced"] == [lab.vip]
    # Same document, same backends: the same ring on both.
    assert nodes["lb1"]["rings"] == nodes["lb2"]["rings"] and nodes["lb1"]["rings"]
    # Each agent runs from etcd, not from a file of its own.
    for node in lab.nodes:
        cmdline = Path(f"/proc/{lab.agent_pid(node)}/cmdline").read_bytes().split(b"\0")
        assert str(lab.etcd_url).encode() in cmdline and node.name.encode() in cmdline
        assert not lab.node_config_path(node).exists()


def test_a_push_reaches_every_node_and_the_traffic_follows(lab: ClusterLab):
    base = lab.node_config(lab.nodes[0])
    before = lab.cluster_status()
    assert served(lab) == {"be1", "be2", "be3"}
    changed = copy.deepcopy(base)
    changed["vips"][0]["backends"][2]["state"] = "drain"     # be3 takes no new connections
    try:
        revision = lab.push(changed)
        assert revision > before["latest_revision"]
        st = lab.wait_revision(revision)
        rings = {n["name"]: n["rings"] for n in st["nodes"]}
        assert rings["lb1"] == rings["lb2"] != {n["name"]: n["rings"] for n in before["nodes"]}["lb1"]
        # Both nodes left be3 out: new connections, spread over both nodes by the router,
        # never reach it.
        assert served(lab) == {"be1", "be2"}
    finally:
        lab.wait_revision(lab.push(base))
    assert served(lab) == {"be1", "be2", "be3"}


def test_a_broken_push_changes_nothing_anywhere(lab: ClusterLab):
    before = lab.cluster_status()
    # Refused by `cluster push` itself: one line, exit 2, nothing stored.
    bad = yaml.safe_dump(lab.node_config(lab.nodes[0]), sort_keys=False).replace("hold_time: 3", "hold_time: 1")
    proc = lab.push_text(bad)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "hold_time" in proc.stderr, proc.stderr
    assert lab.cluster_status()["latest_revision"] == before["latest_revision"]
    # Valid for `cluster push` but not on the nodes (an interface they do not have): stored,
    # refused by each node, which keeps serving its revision and announcing it.
    elsewhere = lab.node_config(lab.nodes[0])
    elsewhere["interfaces"] = ["eth7"]
    elsewhere["vips"][0]["backends"] = elsewhere["vips"][0]["backends"][:1]
    proc = lab.push_text(yaml.safe_dump(elsewhere, sort_keys=False))
    assert proc.returncode == 0, proc.stderr
    refused = lab.cluster_status()["latest_revision"]

    def all_refused() -> dict | None:
        st = lab.cluster_status()
        return st if all(n.get("rejected_revision") == refused for n in st["nodes"]) else None

    st = wait_for(all_refused, "both nodes to refuse the revision")
    old = {n["name"]: n for n in before["nodes"]}
    for n in st["nodes"]:
        assert n["applied_revision"] == before["latest_revision"], n
        assert "eth7" in n["rejected_error"], n
        assert n["rings"] == old[n["name"]]["rings"]
    assert lab.vip_next_hops() == [n.addr for n in lab.nodes]
    assert served(lab) == {"be1", "be2", "be3"}
    lab.wait_revision(lab.push(lab.node_config(lab.nodes[0])))


def applied(lab: ClusterLab, name: str) -> int | None:
    return {n["name"]: n.get("applied_revision") for n in lab.cluster_status()["nodes"]}.get(name)


def heavier_be3(lab: ClusterLab) -> dict:
    """A document whose ring no node can have by its checks alone (those only take backends
    out): be3 weighs 3."""
    doc = lab.node_config(lab.nodes[0])
    doc["vips"][0]["backends"][2]["weight"] = 3
    return doc


def test_a_node_back_from_a_link_down_announces_only_with_the_current_revision(lab: ClusterLab):
    """lb1 is cut off (its link: BGP and etcd alike) while a push changes the ring; when the
    link returns, its BGP session comes back in seconds but its etcd retry may wait longer.
    The router must not get lb1 back before lb1's maps hold the new ring."""
    lb1, lb2 = lab.nodes
    log_path = lab.run_dir / "lb1-agent.log"
    lab.run(lb1, ["ip", "link", "set", "eth0", "down"], check=True)
    try:
        lab.wait_route(1)
        revision = lab.push(heavier_be3(lab))
        wait_for(lambda: applied(lab, "lb2") == revision, "lb2 to apply the revision")
        wait_for(lambda: ((read_published(lb1.netns) or {}).get("cluster") or {}).get("etcd_reachable") is False,
                 "lb1 to find etcd unreachable")
        mark = len(log_path.read_text())
        assert lab.ring_fingerprints(lb1) != lab.ring_fingerprints(lb2)
    finally:
        lab.run(lb1, ["ip", "link", "set", "eth0", "up"], check=True)
    # The first moment the router holds lb1 again, lb1's maps already hold lb2's ring.
    wait_for(lambda: lb1.addr in lab.vip_next_hops(), "the router to take lb1 back", timeout_s=90.0, step_s=0.05)
    assert lab.ring_fingerprints(lb1) == lab.ring_fingerprints(lb2)
    log = log_path.read_text()[mark:]
    assert f"revision {revision} applied" in log and f"BGP: announcing {lab.vip}/32" in log, log
    assert log.index(f"revision {revision} applied") < log.index(f"BGP: announcing {lab.vip}/32"), log
    lab.wait_revision(lab.push(lab.node_config(lb1)))


def test_a_restarted_node_announces_only_after_applying_the_newer_revision(lab: ClusterLab):
    """lb1's agent stops; a push changes the ring meanwhile; the restarted agent finds etcd
    ahead of the maps its predecessor left and applies before it announces."""
    lb1, lb2 = lab.nodes
    lab.wait_route(2, timeout_s=90.0)
    log_path = lab.run_dir / "lb1-agent.log"
    lab.stop_agent(lb1)
    lab.wait_route(1)
    revision = lab.push(heavier_be3(lab))
    wait_for(lambda: applied(lab, "lb2") == revision, "lb2 to apply the revision")
    assert lab.ring_fingerprints(lb1) != lab.ring_fingerprints(lb2)    # the maps lb1's agent left
    mark = len(log_path.read_text())
    lab.start_agent(lb1)
    wait_for(lambda: lb1.addr in lab.vip_next_hops(), "the router to take lb1 back", timeout_s=120.0, step_s=0.05)
    assert lab.ring_fingerprints(lb1) == lab.ring_fingerprints(lb2)
    log = log_path.read_text()[mark:]
    assert log.index(f"revision {revision} applied") < log.index(f"BGP: announcing {lab.vip}/32"), log
    lab.wait_revision(lab.push(lab.node_config(lb1)))
    lab.wait_route(2, timeout_s=90.0)


def router_routes6(lab: ClusterLab) -> dict[str, list[str]]:
    """IPv6 routes BIRD put in the router's kernel table -> next hops."""
    out = lab.run(lab.router, ["ip", "-j", "-6", "route", "show", "proto", "bird"], check=True).stdout
    return {r["dst"]: sorted(h["gateway"] for h in r.get("nexthops", [])) or [r["gateway"]]
            for r in json.loads(out or "[]")}


def node_cli(lab: ClusterLab, node_name: str, *args: str) -> str:
    proc = cli("-n", lab.host(node_name).netns, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_an_ipv6_vip_is_announced_as_a_128_and_withdrawn(lab: ClusterLab):
    """A VIP fd77::10 pushed to both nodes: the router holds fd77::10/128 via both nodes'
    IPv6 addresses on the segment, learnt over the same IPv4 sessions, which the new VIP did
    not restart; drain and removing the VIP withdraw it."""
    doc = lab.node_config(lab.nodes[0])
    doc["vips"].append({"vip": "[fd77::10]:80", "proto": "tcp", "forwarding": doc["vips"][0]["forwarding"],
                        "backends": [{"addr": "[fd77:2::11]:80"}, {"addr": "[fd77:2::12]:80"}]})
    both = [lab.node_addr6(n) for n in lab.nodes]
    assert both == ["fd77:2::21", "fd77:2::22"]
    router_log = lab.run_dir / "router-bird.log"
    restarts = router_log.read_text().count("Received: Other configuration change")
    try:
        lab.wait_revision(lab.push(doc))
        wait_for(lambda: router_routes6(lab).get("fd77::10") == both, "the router's /128 via both nodes")
        assert lab.vip_next_hops() == [n.addr for n in lab.nodes]
        assert router_log.read_text().count("Received: Other configuration change") == restarts
        assert "fd77::10/128" in node_cli(lab, "lb1", "status")
        assert "announcing nothing" in node_cli(lab, "lb1", "node", "drain")
        wait_for(lambda: router_routes6(lab).get("fd77::10") == both[1:], "the router to drop lb1's /128")
        node_cli(lab, "lb1", "node", "undrain")
        wait_for(lambda: router_routes6(lab).get("fd77::10") == both, "lb1's /128 back")
    finally:
        lab.wait_revision(lab.push(lab.node_config(lab.nodes[0])))
    wait_for(lambda: "fd77::10" not in router_routes6(lab), "the router to drop the /128")
    lab.wait_route(2, timeout_s=60.0)


def test_lab_down_leaves_nothing(lab: ClusterLab):
    pids = [lab.etcd_pid(), *(lab.agent_pid(n) for n in lab.nodes)]
    pids += [int((Path("/run/lbctl") / n.netns / "bird.pid").read_text()) for n in lab.nodes]
    pids.append(int((lab.run_dir / "router.pid").read_text()))
    assert all(pids), pids
    proc = cli("lab", "down", "--prefix", lab.prefix)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in pids if _running(p)]
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(lab.prefix)]
    assert not [p for p in os.listdir("/run/lbctl") if p.startswith(lab.prefix)]
    assert not (Path("/run/lbctl/lab") / lab.prefix).exists()
    assert not [p for p in os.listdir("/run/lbctl/lab") if p.startswith(lab.prefix)]
    assert not [p for p in os.listdir("/sys/fs/bpf/lbctl") if p.startswith(lab.prefix)]
    assert lab.status().down


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child of init waits there to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_lab_that_fails_half_built_removes_what_it_built(tmp_path: Path):
    """etcd refuses to start (an etcd that exits at once stands first on PATH): everything
    built before it (namespaces, servers, the router's BIRD) goes, in one line, exit 7."""
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'etcd: listen tcp 0.0.0.0:2379: bind: address already in use' >&2\nexit 1\n")
    fake.chmod(0o755)
    prefix = f"sc{secrets.token_hex(2)}"
    try:
        proc = cli("lab", "up", "--nodes", "2", "--prefix", prefix,
                   env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
        assert proc.returncode == 7, proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "etcd did not start" in proc.stderr and "address already in use" in proc.stderr
        assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix)]
        assert not (Path("/run/lbctl/lab") / prefix).exists()
        assert not [p for p in os.listdir("/run/lbctl/lab") if p.startswith(prefix)]
    finally:
        lab_for(prefix, nodes=2).down()
