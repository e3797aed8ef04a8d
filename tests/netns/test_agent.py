"""`lbctl agent` on a real lab: health checks take a dead or broken backend out of the ring and
bring it back, metrics say so, operator drain wins, all-failing keeps the last healthy set,
SIGHUP applies a good file and refuses a broken one, SIGTERM and kill -9 leave forwarding, and
a restarted agent moves nothing."""
from __future__ import annotations

import configparser
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import (
    AgentProc,
    KeepAliveLoad,
    load_verdict,
    start_server,
    stop_server,
    wait_for,
    write_config,
)
from labcli import lab_up, lbctl

from lbctl.config import load_text
from lbctl.lab import Lab, LabTrafficError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and loads XDP"),
]

# Fast checks keep the test short; the rules are the same at any interval.
HEALTH = "{check: http, path: /healthz, expect: 200-399, interval: 300ms, timeout: 250ms, rise: 2, fall: 2}"
ALL = {"be1": {}, "be2": {}, "be3": {}}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_up("ag", attach=False) as the_lab:
        yield the_lab


@pytest.fixture
def agent_factory(lab: Lab, tmp_path: Path) -> Iterator:
    started: list[AgentProc] = []

    def start(config: Path, *extra: str) -> AgentProc:
        a = AgentProc(lab, config, tmp_path / f"agent{len(started)}.log", 9800 + secrets.randbelow(150), *extra)
        started.append(a)
        a.wait_ready()
        return a
    yield start
    for a in started:
        # Gracefully, as a user stops it: the agent then removes its files under /run/lbctl
        # (a killed one leaves agent.json and its lock behind for every later run to see).
        a.stop(signal.SIGTERM)


def backend_label(lab: Lab, name: str) -> str:
    return f"{lab.host(name).addr}:{lab.http_port}"


def health_up(agent: AgentProc, lab: Lab, name: str) -> float | None:
    return agent.sample("lbctl_backend_health_up", backend=backend_label(lab, name))


def served_by(lab: Lab, count: int = 60) -> Counter:
    return Counter(lab.http_get(lab.vip, lab.http_port, count=count, timeout_s=3.0))


def backend_rows(lab: Lab) -> dict[str, dict]:
    """Backend name -> what `lbctl backend list` says of it (without the moving counters)."""
    rows = json.loads(lbctl(lab, "backend", "list", "--json").stdout)
    by_addr = {b.addr: b.name for b in lab.backends}
    keep = ("state", "weight", "health", "backend_id")
    return {by_addr[r["addr"]]: {k: r[k] for k in keep} for r in rows}


def test_a_dead_backend_leaves_the_ring_a_500_keeps_it_out_and_it_comes_back(lab, agent_factory, tmp_path):
    config = write_config(tmp_path / "lb.yaml", lab, ALL, HEALTH)
    agent = agent_factory(config)
    assert set(served_by(lab)) == {"be1", "be2", "be3"}

    stop_server(lab, "be2")
    wait_for(lambda: health_up(agent, lab, "be2") == 0.0, "metrics to say be2 is down")
    rows = backend_rows(lab)
    assert (rows["be2"]["state"], rows["be2"]["health"]) == ("drain", "down")
    assert "is DOWN, reason: Layer4 connection problem (Connection refused)" in agent.log()
    # Every new connection succeeds, so none reached the dead server.
    assert set(served_by(lab)) == {"be1", "be3"}
    # Export while the agent runs gives its file back (be2 active, the health block), not the
    # drained snapshot the checks made.
    exported = load_text(lbctl(lab, "export").stdout)
    assert exported.vips == load_text(config.read_text()).vips

    # The port answers again, but the service says 500: still down.
    broken = start_server(lab, "be2", status_500=True)
    wait_for(lambda: agent.sample("lbctl_backend_check_last_error", backend=backend_label(lab, "be2"),
                                  error="Layer7 wrong status (500)") == 1.0, "the 500 to show in metrics")
    assert health_up(agent, lab, "be2") == 0.0
    assert backend_rows(lab)["be2"]["state"] == "drain"
    broken.kill()
    broken.wait()

    start_server(lab, "be2")
    wait_for(lambda: health_up(agent, lab, "be2") == 1.0, "be2 to pass rise checks")
    assert "is UP, reason: Layer7 check passed (status 200)" in agent.log()
    wait_for(lambda: backend_rows(lab)["be2"]["state"] == "active", "be2 back in the ring")
    assert "be2" in served_by(lab, 90)


def test_operator_drain_wins_over_passing_checks(lab, agent_factory, tmp_path):
    agent = agent_factory(write_config(tmp_path / "lb.yaml", lab,
                                       {"be1": {}, "be2": {"state": "drain"}, "be3": {}}, HEALTH))
    wait_for(lambda: health_up(agent, lab, "be2") == 1.0, "be2's checks to run")
    rows = backend_rows(lab)
    assert (rows["be2"]["state"], rows["be2"]["health"]) == ("drain", "up")
    assert set(served_by(lab)) == {"be1", "be3"}


def test_all_backends_failing_keeps_the_last_healthy_set_and_says_so(lab, agent_factory, tmp_path):
    agent = agent_factory(write_config(tmp_path / "lb.yaml", lab, {"be1": {}, "be2": {}}, HEALTH))
    stop_server(lab, "be1")
    wait_for(lambda: backend_rows(lab)["be1"]["state"] == "drain", "be1 out of the ring")
    stop_server(lab, "be2")
    wait_for(lambda: health_up(agent, lab, "be2") == 0.0, "be2 to fail too")
    vip = {"vip": f"{lab.vip}:{lab.http_port}"}
    wait_for(lambda: agent.sample("lbctl_vip_all_backends_failing", **vip) == 1.0, "the all-failing flag")
    # be2 was the last healthy backend: it stays in the ring rather than the VIP dropping all.
    rows = backend_rows(lab)
    assert (rows["be1"]["state"], rows["be2"]["state"]) == ("drain", "active")
    assert agent.sample("lbctl_vip_backends_in_ring", **vip) == 1.0
    assert "ALL 2 backends fail their checks; keeping the last healthy set in the ring" in agent.log()
    assert "every backend fails its checks" in lbctl(lab, "status").stdout

    start_server(lab, "be1")
    wait_for(lambda: agent.sample("lbctl_vip_all_backends_failing", **vip) == 0.0, "the fallback to end")
    wait_for(lambda: backend_rows(lab)["be2"]["state"] == "drain", "be2 out once be1 is back")
    assert set(served_by(lab, 30)) == {"be1"}


def test_sighup_applies_a_good_file_and_refuses_a_broken_one(lab, agent_factory, tmp_path):
    config = write_config(tmp_path / "lb.yaml", lab, {"be1": {}, "be2": {}}, None)
    agent = agent_factory(config)
    before = backend_rows(lab)

    good = config.read_text()
    config.write_text(good + "bogus: 1\n")
    agent.send(signal.SIGHUP)
    wait_for(lambda: agent.sample("lbctl_config_reloads_total", result="error") == 1.0, "the refused reload")
    assert f"reload refused, the running configuration stays: {config}:" in agent.log()
    assert backend_rows(lab) == before

    write_config(config, lab, {"be1": {"weight": 3}, "be3": {}}, None)
    agent.send(signal.SIGHUP)
    wait_for(lambda: agent.sample("lbctl_config_reloads_total", result="ok") == 1.0, "the good reload")
    rows = backend_rows(lab)
    assert set(rows) == {"be1", "be3"} and rows["be1"]["weight"] == 3
    assert set(served_by(lab)) == {"be1", "be3"}


def test_stop_and_kill_leave_forwarding_and_a_restart_moves_nothing(lab, agent_factory, tmp_path):
    config = write_config(tmp_path / "lb.yaml", lab, ALL, HEALTH)
    agent = agent_factory(config)
    stop_server(lab, "be3")
    wait_for(lambda: backend_rows(lab)["be3"]["state"] == "drain", "be3 out of the ring")
    ring_before = backend_rows(lab)

    load = KeepAliveLoad(lab, connections=64)
    try:
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        assert set(served_by(lab)) == {"be1", "be2"}, "forwarding goes on without the agent"
        again = agent_factory(config)
        assert "apply (start): the maps already hold this state; nothing moved" in again.log()
        assert again.sample("lbctl_ring_slots_moved_total") == 0.0
        assert again.sample("lbctl_plans_applied_total") == 0.0
        assert backend_rows(lab) == ring_before
        verdict = load_verdict(load.finish())
    finally:
        load.close()
    assert verdict["errors"] == [] and verdict["non2xx"] == 0 and verdict["moved"] == []
    assert verdict["requests"] > 0

    assert again.stop(signal.SIGTERM) == 0
    assert "stopped; the data plane keeps forwarding" in again.log()
    assert set(served_by(lab)) == {"be1", "be2"}


def test_detach_on_exit_and_one_agent_per_instance(lab, agent_factory, tmp_path):
    config = write_config(tmp_path / "lb.yaml", lab, {"be1": {}}, None)
    agent = agent_factory(config, "--detach-on-exit")
    second = AgentProc(lab, config, tmp_path / "second.log", 9999)
    assert second.proc.wait(timeout=60) == 2
    assert f"an agent already runs for instance '{lab.lb.netns}'" in second.log()
    assert agent.stop(signal.SIGTERM) == 0
    assert json.loads(lbctl(lab, "status", "--json").stdout)["attached"] == []


def unit_command_lines(lab: Lab, config: Path, metrics_port: int) -> tuple[list[str], list[str]]:
    """ExecStartPre and ExecStart of packaging/lbctl.service, pointed at this lab: the
    installed lbctl becomes this checkout's, run inside the lab's balancer namespace."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(Path(__file__).resolve().parents[2] / "packaging" / "lbctl.service")
    service = parser["Service"]
    start = shlex.split(service["ExecStart"])
    assert start[0].endswith("/lbctl") and start[1] == "agent"
    argv = [sys.executable, "-m", "lbctl", "-n", lab.lb.netns, *start[1:]]
    argv[argv.index("/etc/lbctl/lbctl.yaml")] = str(config)
    argv[argv.index("--metrics-addr") + 1] = f"127.0.0.1:{metrics_port}"
    return shlex.split(service["ExecStartPre"]), argv


def test_simulated_reboot_the_unit_brings_the_vips_back(lab, tmp_path):
    config = write_config(tmp_path / "lb.yaml", lab, ALL, HEALTH)
    lbctl(lab, "apply", "-f", str(config), timeout_s=180.0)
    assert set(served_by(lab)) == {"be1", "be2", "be3"}
    # A boot: no program, no maps, nothing attached.
    lbctl(lab, "detach", "--all", "--purge", "--force")   # as a reboot would: flows and all
    assert json.loads(lbctl(lab, "status", "--json").stdout)["maps"] is False
    with pytest.raises(LabTrafficError):
        lab.http_get(lab.vip, lab.http_port, count=1, timeout_s=1.0)

    pre, start = unit_command_lines(lab, config, 9800 + secrets.randbelow(150))
    assert subprocess.run(pre, check=False).returncode == 0
    log = tmp_path / "unit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(start, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "metrics on http://" in log.read_text() or proc.poll() is not None, "the agent",
                 timeout_s=180.0)
        assert proc.poll() is None, log.read_text()
        assert set(served_by(lab)) == {"be1", "be2", "be3"}
        rows = json.loads(lbctl(lab, "vip", "list", "--json").stdout)
        assert [r["vip"] for r in rows] == [f"{lab.vip}:{lab.http_port}"]
    finally:
        # As systemd stops the unit (SIGTERM): the agent removes its files under /run/lbctl,
        # which a SIGKILL left behind (agent.json and the lock, caught by the session's check).
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
