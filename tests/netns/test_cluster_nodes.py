"""Two balancer nodes, each a whole lab of its own (client, balancer, three backends), run
`lbctl agent --config etcd://...` against one REAL etcd in a management namespace: a push
reaches both, a broken push changes nothing anywhere, `cluster status` shows both, and with
etcd killed both keep forwarding real traffic and catch up when it returns (a node cut off
while a revision was pushed catches up too)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentlab import REPO_ROOT, wait_for, write_config
from labcli import lab_up, lbctl

from lbctl.etcdlocal import LocalEtcd
from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and loads XDP"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs Debian's etcd-server (lbctl/setup.sh installs it)"),
]

HEALTH = "{check: http, path: /healthz, expect: 200-399, interval: 300ms, timeout: 250ms, rise: 2, fall: 2}"
ALL = {"be1": {}, "be2": {}, "be3": {}}
PREFIX = "/eccluster"


@dataclass
class Node:
    lab: Lab
    mgmt_if: str           # the balancer's interface on the management network
    etcd_addr: str         # where this node dials etcd
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict[str, Any]:
        return json.loads(lbctl(self.lab, "status", "--json").stdout)

    def cluster(self) -> dict[str, Any]:
        agent = self.status()["agent"]
        assert agent is not None, f"the agent of {self.lab.lb.netns} is not running: {self.log()[-2000:]}"
        return agent["cluster"]


@dataclass
class Cluster:
    etcd: LocalEtcd
    netns: str               # the management namespace etcd runs in
    nodes: list[Node]
    tmp: Path
    lab: Lab                 # any node's lab: they are built alike, so one document fits all

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.etcd.client_port}{PREFIX}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`lbctl -n <management namespace> ARGS`: an operator's shell next to etcd."""
        proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", self.netns, *args], capture_output=True,
                              text=True, timeout=60, check=False, cwd=REPO_ROOT)
        if check:
            assert proc.returncode == 0, f"lbctl {' '.join(args)}: {proc.stderr}"
        return proc

    def push(self, backends: dict[str, dict[str, Any]], name: str) -> int:
        path = write_config(self.tmp / name, self.lab, backends, HEALTH)
        out = self.cli("cluster", "push", "-f", str(path), "--etcd", self.url).stdout
        assert out.startswith("stored revision "), out
        return int(out.split()[2])

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("cluster", "status", "--etcd", self.url, "--json").stdout)

    def all_applied(self, revision: int) -> bool:
        return all(n.cluster()["applied_revision"] == revision for n in self.nodes)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def served_by(lab: Lab, count: int = 60) -> Counter:
    return Counter(lab.http_get(lab.vip, lab.http_port, count=count, timeout_s=3.0))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    mgmt = f"ec{secrets.token_hex(3)}-etcd"
    with ExitStack() as stack:
        labs = [stack.enter_context(lab_up("ec", attach=False)) for _ in range(2)]
        _ip("netns", "add", mgmt)
        stack.callback(_ip, "netns", "del", mgmt)
        _ip("-n", mgmt, "link", "set", "lo", "up")
        # A management network: one veth from etcd's namespace to each balancer, as nodes
        # reach a real etcd over their management interfaces.
        for i, lab in enumerate(labs):
            _ip("link", "add", f"m{i}", "netns", mgmt, "type", "veth", "peer", "name", "ecm0", "netns", lab.lb.netns)
            _ip("-n", mgmt, "addr", "add", f"10.250.{i}.1/24", "dev", f"m{i}")
            _ip("-n", mgmt, "link", "set", f"m{i}", "up")
            _ip("-n", lab.lb.netns, "addr", "add", f"10.250.{i}.2/24", "dev", "ecm0")
            _ip("-n", lab.lb.netns, "link", "set", "ecm0", "up")
        etcd = stack.enter_context(LocalEtcd(netns=mgmt, addr="0.0.0.0", prefix=PREFIX, base_dir=tmp / "etcd"))
        c = Cluster(etcd, mgmt, [], tmp, labs[0])
        first = c.push(ALL, "first.yaml")
        for i, lab in enumerate(labs):
            log_path = tmp / f"agent{i}.log"
            log = stack.enter_context(open(log_path, "a"))   # closed by the stack
            # No --node-name: a node in a namespace is named after it.
            proc = subprocess.Popen([sys.executable, "-m", "lbctl", "-n", lab.lb.netns, "agent", "--config",
                                     f"etcd://10.250.{i}.1:{etcd.client_port}{PREFIX}",
                                     "--metrics-addr", f"127.0.0.1:{9800 + secrets.randbelow(150)}"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
            stack.callback(_stop, proc)
            c.nodes.append(Node(lab, "ecm0", f"10.250.{i}.1", proc, log_path))
        for n in c.nodes:
            wait_for(lambda n=n: "metrics on http://" in n.log() or n.proc.poll() is not None,
                     "the agent to start", timeout_s=240.0)
            assert n.proc.poll() is None, n.log()[-3000:]
        wait_for(lambda: c.all_applied(first), "both nodes on the first revision")
        yield c


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def backend_rows(lab: Lab) -> list[tuple[str, str, int]]:
    rows = json.loads(lbctl(lab, "backend", "list", "--json").stdout)
    return sorted((r["backend"], r["state"], r["weight"]) for r in rows)


def test_a_push_reaches_every_node_and_traffic_follows_it(cluster: Cluster):
    for n in cluster.nodes:
        assert set(served_by(n.lab)) == {"be1", "be2", "be3"}
    rev = cluster.push({"be1": {}, "be2": {}, "be3": {"state": "drain"}}, "drain-be3.yaml")
    wait_for(lambda: cluster.all_applied(rev), "both nodes on the drain revision")
    for n in cluster.nodes:
        assert set(served_by(n.lab)) == {"be1", "be2"}
        text = lbctl(n.lab, "status").stdout
        assert f"node '{n.lab.lb.netns}', revision {rev} applied" in text
    # Every node built the same ring from the same document, and says so in one value.
    fps = [n.status()["agent"] for n in cluster.nodes]
    records = {r["name"]: r for r in cluster.status()["nodes"]}
    assert set(records) == {n.lab.lb.netns for n in cluster.nodes}
    rings = [records[n.lab.lb.netns]["rings"] for n in cluster.nodes]
    assert rings[0] == rings[1] and len(rings[0]) == 1
    assert fps[0] is not None and fps[1] is not None
    # The back-to-all revision, so later tests start from every backend.
    rev = cluster.push(ALL, "all.yaml")
    wait_for(lambda: cluster.all_applied(rev), "both nodes back on every backend")


def test_a_broken_push_changes_nothing_anywhere(cluster: Cluster):
    before = cluster.status()
    maps_before = [backend_rows(n.lab) for n in cluster.nodes]
    path = write_config(cluster.tmp / "broken.yaml", cluster.nodes[0].lab, ALL, HEALTH)
    path.write_text(path.read_text().replace(":80,", ":99999,", 1).replace(":80}", ":99999}", 1))
    proc = cluster.cli("cluster", "push", "-f", str(path), "--etcd", cluster.url, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "99999" in proc.stderr and "hint:" in proc.stderr
    after = cluster.status()
    assert after["latest_revision"] == before["latest_revision"]
    assert [backend_rows(n.lab) for n in cluster.nodes] == maps_before
    for n in cluster.nodes:
        assert n.cluster()["applied_revision"] == before["latest_revision"]
        assert n.cluster()["rejected_revision"] is None
        assert set(served_by(n.lab)) == {"be1", "be2", "be3"}


def test_cluster_status_is_one_table_of_every_node(cluster: Cluster):
    # With a bgp block each node's BIRD runs and its state reaches the table. The peer is the
    # lab client's address, where no BGP speaker listens: the session stays down, which the
    # BGP column must say (the routing side itself is proven by tests/netns/test_bgp_lab.py).
    path = write_config(cluster.tmp / "bgp.yaml", cluster.lab, ALL, HEALTH)
    path.write_text(path.read_text() + f"bgp: {{local_as: 65010, peers: [{{addr: {cluster.lab.client.addr}, as: 65000}}]}}\n")
    latest = int(cluster.cli("cluster", "push", "-f", str(path), "--etcd", cluster.url).stdout.split()[2])
    wait_for(lambda: cluster.all_applied(latest), "both nodes on the bgp revision")
    wait_for(lambda: all((r.get("bgp") or {}).get("summary") for r in cluster.status()["nodes"]),
             "both records to carry their BGP state")
    text = cluster.cli("cluster", "status", "--etcd", cluster.url).stdout
    print(text)    # with -s: the table as an operator sees it (docs/scale-out.md shows one)
    out = text.splitlines()
    assert out[0] == f"latest revision {latest} at {PREFIX}/config"
    assert out[1].split() == ["NODE", "REVISION", "HEALTH", "RINGS", "BGP", "LAST", "SEEN"]
    rows = {line.split()[0]: line for line in out[2:]}
    assert set(rows) == {n.lab.lb.netns for n in cluster.nodes}
    for line in rows.values():
        assert f"{latest}/{latest}" in line and "BEHIND" not in line
        assert "3/3 up" in line and "MISMATCH" not in line and f"{cluster.nodes[0].lab.vip}:80/tcp" in line
        assert "0/1 established" in line
    for rec in cluster.status()["nodes"]:
        assert rec["bgp"]["peers"] == [{"addr": cluster.lab.client.addr, "as": 65000}]
        assert [s["peer"] for s in rec["bgp"]["sessions"]] == [cluster.lab.client.addr]
    # Back to the document without BGP, as the next test expects.
    rev = cluster.push(ALL, "no-bgp.yaml")
    wait_for(lambda: cluster.all_applied(rev), "both nodes without BGP")


def test_etcd_killed_nodes_keep_serving_and_catch_up_when_it_returns(cluster: Cluster):
    start = cluster.status()["latest_revision"]
    cluster.etcd.kill()
    for n in cluster.nodes:
        wait_for(lambda n=n: not n.cluster()["etcd_reachable"], "the node to notice etcd is gone")
        assert "etcd UNREACHABLE since" in lbctl(n.lab, "status").stdout
        assert "etcd unreachable" in n.log() and f"serving revision {start}" in n.log()
    # Real traffic through each balancer, with etcd gone: nothing of the data plane needs it.
    for n in cluster.nodes:
        assert set(served_by(n.lab)) == {"be1", "be2", "be3"}
        assert n.cluster()["applied_revision"] == start
    cluster.etcd.start()
    wait_for(lambda: all(n.cluster()["etcd_reachable"] for n in cluster.nodes), "both nodes back on etcd")
    rev = cluster.push({"be1": {}, "be2": {"state": "drain"}, "be3": {}}, "after-outage.yaml")
    wait_for(lambda: cluster.all_applied(rev), "both nodes on the revision pushed after the restart")
    for n in cluster.nodes:
        assert set(served_by(n.lab)) == {"be1", "be3"}
    # A node cut off from etcd while a revision is pushed catches up when it is back.
    cut, other = cluster.nodes
    _ip("-n", cut.lab.lb.netns, "link", "set", cut.mgmt_if, "down")
    try:
        missed = cluster.push(ALL, "while-cut.yaml")
        wait_for(lambda: other.cluster()["applied_revision"] == missed, "the connected node to apply")
        wait_for(lambda: not cut.cluster()["etcd_reachable"], "the cut node to notice")
        assert cut.cluster()["applied_revision"] == rev
        assert set(served_by(cut.lab)) == {"be1", "be3"}         # its last applied state, served
        assert set(served_by(other.lab)) == {"be1", "be2", "be3"}
    finally:
        _ip("-n", cut.lab.lb.netns, "link", "set", cut.mgmt_if, "up")
    wait_for(lambda: cut.cluster()["applied_revision"] == missed, "the cut node to catch up")
    assert set(served_by(cut.lab)) == {"be1", "be2", "be3"}
    assert "answers again" in cut.log()
