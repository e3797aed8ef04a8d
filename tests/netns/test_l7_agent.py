"""`lbctl agent` serving a mode: l7 VIP on a real lab with no XDP (`interfaces: []`): the VIP
address goes on lo in the balancer's namespace, the proxy's workers balance per request over
the lab's servers, health checks take a stopped backend out, metrics count, and stopping the
agent takes the address off and leaves no worker."""
from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import AgentProc, stop_server, wait_for
from labcli import lab_up

from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces"),
]

HEALTH = "{check: http, path: /, interval: 300ms, timeout: 250ms, rise: 2, fall: 2}"

# 300 requests on one keep-alive connection from the client; prints backend -> count.
_KEEPALIVE = r"""
import collections, http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
conn.auto_open = 0
conn.connect()
seen, failed = collections.Counter(), 0
for _ in range(int(sys.argv[3])):
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    if resp.status == 200:
        seen[resp.getheader("X-Backend")] += 1
    else:
        failed += 1
print(json.dumps({"seen": seen, "failed": failed}))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_up("l7", attach=False) as the_lab:
        yield the_lab


def keepalive(lab: Lab, count: int) -> dict:
    proc = lab.run(lab.client, [sys.executable, "-I", "-S", "-c", _KEEPALIVE, lab.vip, str(lab.http_port),
                                str(count)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def agent_workers(lab: Lab) -> str:
    """Pids of the lab agent's L7 workers: their spec lies in its instance's run directory
    (other labs' workers on this machine are visible from any network namespace)."""
    return lab.run(lab.lb, ["pgrep", "-f", f"lbctl.l7.worker --spec /run/lbctl/{lab.lb.netns}/"]).stdout.strip()


def lo_addresses(lab: Lab) -> str:
    return lab.run(lab.lb, ["ip", "-o", "addr", "show", "dev", "lo"]).stdout


def test_agent_serves_an_l7_vip_without_xdp_and_cleans_up(lab: Lab, tmp_path: Path):
    backends = "\n".join(f"      - {{addr: {lab.host(n).addr}:{lab.http_port}, weight: {w}}}"
                         for n, w in (("be1", 3), ("be2", 2), ("be3", 1)))
    config = tmp_path / "lb.yaml"
    config.write_text(f"interfaces: []\nvips:\n  - vip: {lab.vip}:{lab.http_port}\n    mode: l7\n"
                      f"    health: {HEALTH}\n    l7: {{workers: 2}}\n    backends:\n{backends}\n")
    agent = AgentProc(lab, config, tmp_path / "agent.log", 9800 + secrets.randbelow(150))
    try:
        agent.wait_ready()
        assert f"inet {lab.vip}/32" in lo_addresses(lab)
        assert len(agent_workers(lab).split()) == 2, "l7.workers: 2"
        links = lab.run(lab.lb, ["ip", "-d", "link"]).stdout
        assert "xdp" not in links, "interfaces: [] must attach no XDP program"
        out = keepalive(lab, 300)
        assert out["failed"] == 0
        assert out["seen"] == {"be1": 150, "be2": 100, "be3": 50}
        wait_for(lambda: (agent.sample("lbctl_l7_requests_total") or 0) >= 300, "L7 request metrics")
        reuses = sum(v for (n, _), v in agent.metrics().items() if n == "lbctl_l7_upstream_reuses_total")
        connects = sum(v for (n, _), v in agent.metrics().items() if n == "lbctl_l7_upstream_connects_total")
        assert reuses >= 290 and connects <= 10, (reuses, connects)

        stop_server(lab, "be2")
        wait_for(lambda: "is DOWN" in agent.log(), "the check to take be2 down")
        out = keepalive(lab, 100)
        assert out["failed"] == 0 and "be2" not in out["seen"]
    finally:
        status = agent.stop(signal.SIGTERM)
    assert status == 0, agent.log()[-2000:]
    assert f"inet {lab.vip}/32" not in lo_addresses(lab)
    assert agent_workers(lab) == "", "the workers stop with the agent"
