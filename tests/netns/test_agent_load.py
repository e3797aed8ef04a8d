"""Under a keep-alive load (64 connections, 10 s or more): 100 backend changes made by
`lbctl apply` (adds, weight changes, drains and removals of other backends) and not one error,
non-2xx answer or connection that changes backend."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import KeepAliveLoad, load_verdict
from labcli import lab_up, lbctl

from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and loads XDP"),
]

ROUNDS = 26        # four backend changes per apply (fewer in the first two): 101 changes


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_up("ag", attach=False) as the_lab:
        yield the_lab


def config(lab: Lab, weights: dict[str, int], others: dict[str, str]) -> str:
    """The lab's real backends with these weights, plus `others` (addr -> state): backends no
    connection of the load uses, added, drained and removed around it."""
    rows = [f"      - {{addr: {lab.host(n).addr}:{lab.http_port}, weight: {w}}}" for n, w in weights.items()]
    rows += [f"      - {{addr: {addr}:{lab.http_port}, state: {state}}}" for addr, state in others.items()]
    return "\n".join([f"interfaces: [{', '.join(lab.lb_ifaces)}]", "vips:",
                      f"  - vip: {lab.vip}:{lab.http_port}", "    backends:", *rows]) + "\n"


def test_a_hundred_backend_changes_by_apply_under_load(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    weights = {"be1": 1, "be2": 1, "be3": 1}
    path.write_text(config(lab, weights, {}))
    lbctl(lab, "apply", "-f", str(path), timeout_s=180.0)

    load = KeepAliveLoad(lab, connections=64)
    changes = 0
    others: dict[str, str] = {}
    try:
        for i in range(ROUNDS):
            # Each round: add a backend, drain the previous one, remove the one before that,
            # and change the weight of a backend the load is using.
            others[f"10.77.2.{100 + i}"] = "active"
            if i >= 1:
                others[f"10.77.2.{100 + i - 1}"] = "drain"
            if i >= 2:
                del others[f"10.77.2.{100 + i - 2}"]
            name = ("be1", "be2", "be3")[i % 3]
            weights[name] = 1 + (weights[name] % 5)
            path.write_text(config(lab, weights, others))
            out = lbctl(lab, "apply", "-f", str(path)).stdout
            changes += sum(1 for line in out.splitlines() if line.startswith(("  + backend", "  ~ backend",
                                                                              "  - backend")))
        verdict = load_verdict(load.finish())
    finally:
        load.close()
    assert changes >= 100, changes
    assert verdict["errors"] == [], verdict["errors"][:5]
    assert verdict["non2xx"] == 0
    assert verdict["idle_connections"] == 0
    assert verdict["moved"] == [], f"{len(verdict['moved'])} connections changed backend"
    assert verdict["requests"] > 64 * 10
