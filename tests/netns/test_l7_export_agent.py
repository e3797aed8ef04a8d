"""`lbctl export` while `lbctl agent` serves a mode: l7 VIP (no XDP, `interfaces: []`): the
export holds the L7 VIP with its whole l7 block, applying the export changes nothing, and
exporting again gives the same text; `lbctl status` lists the proxy's backends."""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import AgentProc
from labcli import lab_up, lbctl

from lbctl.config import load_text
from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces"),
]

L7 = """\
      workers: 1
      balancing: least_outstanding
      pool: {max_size: 8, min_idle: 2, idle_timeout: 30s, warmup: eager}
      limits: {header_timeout: 5s, max_body_bytes: 1048576, connect_timeout: 500ms}
      ejection: {failures: 3, cooldown: 5s}
      cache: {max_bytes: 1048576}
      http2: {max_concurrent_streams: 32}
      groups: {stable: [@be1, @be2], canary: [@be3]}
      routes:
        - {host: api.example.com, path_prefix: /v2/, group: canary}
        - {path_prefix: /, split: {stable: 90, canary: 10}}
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_up("h2", attach=False) as the_lab:
        yield the_lab


def test_export_apply_export_round_trips_an_agents_l7_vip(lab: Lab, tmp_path: Path):
    addr = {n: f"{lab.host(n).addr}:{lab.http_port}" for n in ("be1", "be2", "be3")}
    block = L7
    for name, a in addr.items():
        block = block.replace(f"@{name}", a)
    config = tmp_path / "lb.yaml"
    config.write_text(
        f"interfaces: []\nvips:\n  - vip: {lab.vip}:{lab.http_port}\n    mode: l7\n"
        "    health: {check: http, path: /, interval: 1s, timeout: 500ms}\n"
        f"    l7:\n{block}    backends:\n"
        f"      - {{addr: {addr['be1']}, weight: 3}}\n      - {{addr: {addr['be2']}, state: drain}}\n"
        f"      - {{addr: {addr['be3']}}}\n")
    agent = AgentProc(lab, config, tmp_path / "agent.log", 9800 + secrets.randbelow(150))
    try:
        agent.wait_ready()
        exported = lbctl(lab, "export").stdout
        assert "mode: l7" in exported and "split: {stable: 90, canary: 10}" in exported
        assert load_text(exported, "export").vips == load_text(config.read_text(), "file").vips
        path = tmp_path / "exported.yaml"
        path.write_text(exported)
        applied = lbctl(lab, "apply", "-f", str(path)).stdout
        assert applied.splitlines()[0] == "no changes", applied
        assert f"note: {lab.vip}:{lab.http_port} is mode l7" in applied
        assert lbctl(lab, "export").stdout == exported
        # status shows the proxy's backends with the workers' shared ejection state.
        status = lbctl(lab, "status").stdout
        assert "EJECTIONS" in status and all(a in status for a in addr.values()), status
        rows = json.loads(lbctl(lab, "status", "--json").stdout)["l7_backends"]
        assert {r["backend"]: r["state"] for r in rows} == {addr["be1"]: "active", addr["be2"]: "drain",
                                                          addr["be3"]: "active"}
        assert all(r["ejected_s"] == 0 and r["ejections"] == 0 for r in rows)
    finally:
        status = agent.stop()
    assert status == 0, agent.log()[-2000:]
