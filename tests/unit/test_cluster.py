"""`lbctl cluster` and the etcd side of a node against a REAL etcd process on loopback (no
root): a broken push stores nothing, a node follows revisions, refuses a broken one and keeps
its last, rides out an etcd outage and catches up, and `cluster status` shows every node."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl import cluster
from lbctl.cluster import ClusterNode
from lbctl.config import DesiredState
from lbctl.errors import ConfigError
from lbctl.etcd import EtcdClient, EtcdUrl, parse_etcd_url
from lbctl.etcdlocal import LocalEtcd

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="needs Debian's etcd-server (lbctl/setup.sh installs it)")

WAIT_S = 60.0   # a bound for a condition on a loaded machine, never a speed check

GOOD = """\
interfaces: []
vips:
  - vip: 10.0.0.10:80
    backends:
      - {addr: 10.0.1.11:8080}
      - {addr: 10.0.1.12:8080}
"""
GOOD_2 = GOOD + "      - {addr: 10.0.1.13:8080, weight: 2}\n"
BROKEN = GOOD.replace("10.0.1.12:8080", "10.0.1.12:99999")


def wait_for(cond: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.fixture
def etcd() -> Iterator[LocalEtcd]:
    with LocalEtcd(prefix="/ectest") as e:
        yield e


def lbctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbctl", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- addresses ------------------------------------------------------------------------------
def test_etcd_addresses_parse_with_defaults_and_refuse_what_is_not_one():
    assert parse_etcd_url("etcd://10.0.0.5:2379/lbctl") == EtcdUrl("10.0.0.5", 2379, "/lbctl")
    assert parse_etcd_url("etcd://db1") == EtcdUrl("db1", 2379, "/lbctl")
    assert parse_etcd_url("etcd://[::1]:2379/a/b/") == EtcdUrl("::1", 2379, "/a/b")
    assert str(parse_etcd_url("etcd://[::1]:2379/a")) == "etcd://[::1]:2379/a"
    for bad in ("http://10.0.0.5:2379/lbctl", "etcd://10.0.0.5:70000/x", "etcd://h:1/a b", "etcd:///x"):
        with pytest.raises(ConfigError, match="hint: e.g. etcd://"):
            parse_etcd_url(bad)


# -- push -----------------------------------------------------------------------------------
def test_a_broken_push_is_one_line_exit_2_and_stores_nothing(etcd: LocalEtcd, tmp_path: Path):
    url = str(etcd.url())
    ok = lbctl("cluster", "push", "-f", str(write(tmp_path, "good.yaml", GOOD)), "--etcd", url)
    assert ok.returncode == 0, ok.stderr
    assert "stored revision" in ok.stdout
    client = EtcdClient(etcd.url())
    before, store_rev = client.get(etcd.url().config_key)
    bad = lbctl("cluster", "push", "-f", str(write(tmp_path, "bad.yaml", BROKEN)), "--etcd", url)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml:6" in lines[0] and "99999" in lines[0] and "hint:" in lines[0]
    after, store_rev_after = client.get(etcd.url().config_key)
    assert after == before and store_rev_after == store_rev    # not one write, anywhere


def test_push_stores_a_new_revision_and_an_identical_push_writes_nothing(etcd: LocalEtcd, tmp_path: Path):
    url = etcd.url()
    r1 = cluster.push(url, str(write(tmp_path, "a.yaml", GOOD)))
    r2 = cluster.push(url, str(write(tmp_path, "b.yaml", GOOD_2)))
    assert (r1.unchanged, r2.unchanged, r2.previous, r2.vips) == (False, False, r1.revision, 1)
    assert r2.revision > r1.revision
    r3 = cluster.push(url, str(tmp_path / "b.yaml"))
    assert r3.unchanged and r3.revision == r2.revision
    kv, _ = EtcdClient(url).get(url.config_key)
    assert kv is not None and kv.value.decode() == GOOD_2 and kv.mod_revision == r2.revision


def test_push_to_an_etcd_that_does_not_answer_says_where_it_looked(tmp_path: Path):
    proc = lbctl("cluster", "push", "-f", str(write(tmp_path, "a.yaml", GOOD)), "--etcd", "etcd://127.0.0.1:9/x")
    assert proc.returncode == 10
    assert proc.stderr.count("\n") == 1 and "cannot reach etcd at 127.0.0.1:9" in proc.stderr


# -- a node ---------------------------------------------------------------------------------
class Node:
    """ClusterNode as the agent drives it, in a thread of its own: adopt records each state."""

    def __init__(self, url: EtcdUrl, name: str, fail_apply: Callable[[DesiredState], bool] | None = None,
                 rings: dict[str, str] | None = None):
        self.node = ClusterNode(url, name, check_interfaces=False)
        self.adopted: list[tuple[int, DesiredState]] = []
        self.fail_apply = fail_apply or (lambda state: False)
        self.rings = rings or {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tasks: list[asyncio.Task] = []

    async def _adopt(self, state: DesiredState, revision: int) -> bool:
        if self.fail_apply(state):
            return False
        self.adopted.append((revision, state))
        return True

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        state, rev = self.node.first_state()
        self.adopted.append((rev, state))
        self.node.applied(rev)
        self._tasks = [self._loop.create_task(self.node.follow(self._adopt)),
                       self._loop.create_task(self.node.publish(lambda: {"rings": self.rings, "bgp": None,
                                                                          "health": {"10.0.0.10:80/tcp": {
                                                                              "up": 2, "total": 2}}}))]
        self._loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        self._loop.close()

    def start(self) -> Node:
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        for t in self._tasks:
            self._loop.call_soon_threadsafe(t.cancel)
        self._thread.join(30)
        self.node.withdraw()

    @property
    def applied(self) -> int:
        return self.node.view.applied_revision


@pytest.fixture
def nodes() -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(*args: Any, **kw: Any) -> Node:
        n = Node(*args, **kw).start()
        started.append(n)
        return n
    yield start
    for n in started:
        n.stop()


def test_nodes_follow_each_revision_and_refuse_a_broken_one_keeping_their_last(etcd, tmp_path, nodes):
    url = etcd.url()
    r1 = cluster.push(url, str(write(tmp_path, "a.yaml", GOOD))).revision
    a, b = nodes(url, "n1"), nodes(url, "n2")
    wait_for(lambda: a.applied == r1 and b.applied == r1, "both nodes on the first revision")
    r2 = cluster.push(url, str(write(tmp_path, "b.yaml", GOOD_2))).revision
    wait_for(lambda: a.applied == r2 and b.applied == r2, "both nodes on the second revision")
    assert len(a.adopted[-1][1].vips[next(iter(a.adopted[-1][1].vips))].spec.backends) == 3
    # A document that bypassed `cluster push` (another tool wrote the key) is validated by
    # each node all the same: refused, said so, and the node stays where it was.
    r3 = EtcdClient(url).put(url.config_key, BROKEN)
    wait_for(lambda: a.node.view.rejected_revision == r3 and b.node.view.rejected_revision == r3,
             "both nodes to refuse the broken revision")
    assert (a.applied, b.applied) == (r2, r2)
    assert "99999" in (a.node.view.rejected_error or "")
    assert [rev for rev, _ in a.adopted] == [r1, r2]
    want = {"n1": (r2, r3, False), "n2": (r2, r3, False)}
    wait_for(lambda: {n["name"]: (n["applied_revision"], n["rejected_revision"], n["current"])
                      for n in cluster.status(url)["nodes"]} == want, "both records to say so")
    assert cluster.status(url)["latest_revision"] == r3
    # The next good revision is applied and clears the refusal.
    r4 = cluster.push(url, str(write(tmp_path, "c.yaml", GOOD))).revision
    wait_for(lambda: a.applied == r4 and b.applied == r4, "both nodes on the fixed revision")
    assert a.node.view.rejected_revision == 0


def test_a_revision_whose_apply_fails_is_refused_and_the_next_one_applies(etcd, tmp_path, nodes):
    url = etcd.url()
    r1 = cluster.push(url, str(write(tmp_path, "a.yaml", GOOD))).revision
    # The node's maps cannot take the three-backend document (as when a map is full).
    n = nodes(url, "n1", fail_apply=lambda state: len(next(iter(state.vips.values())).spec.backends) == 3)
    wait_for(lambda: n.applied == r1, "the first revision")
    r2 = cluster.push(url, str(write(tmp_path, "b.yaml", GOOD_2))).revision
    wait_for(lambda: n.node.view.rejected_revision == r2, "the failed apply to be refused")
    assert n.applied == r1
    r3 = cluster.push(url, str(write(tmp_path, "c.yaml", GOOD))).revision
    wait_for(lambda: n.applied == r3, "the next revision")


def test_a_node_rides_out_an_etcd_outage_and_catches_up_after_it(etcd, tmp_path, nodes):
    url = etcd.url()
    r1 = cluster.push(url, str(write(tmp_path, "a.yaml", GOOD))).revision
    n = nodes(url, "n1")
    wait_for(lambda: n.applied == r1 and n.node.view.reachable, "the first revision")
    etcd.kill()
    wait_for(lambda: not n.node.view.reachable, "the node to notice etcd is gone")
    assert n.applied == r1                      # still what it applied: nothing dropped
    assert n.node.view.unreachable_since is not None
    wait_for(lambda: "cannot reach etcd" in (n.node.view.last_error or ""), "a retry to be refused")
    etcd.start()
    r2 = cluster.push(url, str(write(tmp_path, "b.yaml", GOOD_2))).revision
    wait_for(lambda: n.applied == r2 and n.node.view.reachable, "the node to catch up after the restart")
    wait_for(lambda: [x["name"] for x in cluster.status(url)["nodes"]] == ["n1"], "the record back")


def test_a_node_started_before_anything_was_pushed_waits_and_takes_the_first_push(etcd, tmp_path, nodes):
    url = etcd.url()
    n = nodes(url, "n1")
    wait_for(lambda: n.node.view.reachable, "the node to reach etcd")
    assert n.adopted == []
    r1 = cluster.push(url, str(write(tmp_path, "a.yaml", GOOD))).revision
    wait_for(lambda: n.applied == r1, "the first push")


def test_cluster_status_is_one_table_of_nodes_and_flags_a_ring_mismatch(etcd, tmp_path, nodes):
    url = etcd.url()
    r1 = cluster.push(url, str(write(tmp_path, "a.yaml", GOOD))).revision
    nodes(url, "lb1", rings={"10.0.0.10:80/tcp": "aaaa"})
    nodes(url, "lb2", rings={"10.0.0.10:80/tcp": "aaaa"})
    odd = nodes(url, "lb3", rings={"10.0.0.10:80/tcp": "bbbb"})
    wait_for(lambda: len(cluster.status(url)["nodes"]) == 3, "three records")
    wait_for(lambda: all(n["applied_revision"] == r1 for n in cluster.status(url)["nodes"]), "revisions")
    out = lbctl("cluster", "status", "--etcd", str(url))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"latest revision {r1} at {url.config_key}"
    assert lines[1].split() == ["NODE", "REVISION", "HEALTH", "RINGS", "BGP", "LAST", "SEEN"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"lb1", "lb2", "lb3"}
    assert f"{r1}/{r1}" in rows["lb1"] and "2/2 up" in rows["lb1"] and "aaaa" in rows["lb1"]
    assert "MISMATCH" in rows["lb3"] and "MISMATCH" not in rows["lb1"]
    data = json.loads(lbctl("cluster", "status", "--etcd", str(url), "--json").stdout)
    assert {n["name"]: n["ring_mismatch"] for n in data["nodes"]} == \
        {"lb1": [], "lb2": [], "lb3": ["10.0.0.10:80/tcp"]}
    # A node that stops cleanly takes its record with it (its lease is revoked).
    odd.stop()
    wait_for(lambda: [n["name"] for n in cluster.status(url)["nodes"]] == ["lb1", "lb2"], "lb3 gone")


def test_agent_takes_a_file_or_etcd_not_both():
    both = lbctl("agent", "-f", "x.yaml", "--config", "etcd://127.0.0.1:2379/lbctl")
    neither = lbctl("agent")
    name_alone = lbctl("agent", "-f", "x.yaml", "--node-name", "lb1")
    for proc in (both, neither, name_alone):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "hint:" in proc.stderr
