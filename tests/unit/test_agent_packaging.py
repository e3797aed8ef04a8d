"""The shipped systemd unit and example config: what a packager relies on, read as systemd and
lbctl would read them."""
from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from lbctl.config import load_file

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(PACKAGING / "lbctl.service")
    return parser


def test_the_unit_starts_after_the_network_is_online_and_restarts_on_failure():
    u = unit()
    assert "network-online.target" in u["Unit"]["After"].split()
    assert "network-online.target" in u["Unit"]["Wants"].split()
    assert u["Service"]["Restart"] == "on-failure"
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_the_unit_mounts_bpffs_when_missing_before_the_agent_starts():
    pre = unit()["Service"]["ExecStartPre"]
    assert "mount -t bpf bpf /sys/fs/bpf" in pre and "mountpoint -q /sys/fs/bpf" in pre


def test_the_unit_runs_the_agent_on_the_example_config_and_reloads_with_sighup():
    s = unit()["Service"]
    argv = shlex.split(s["ExecStart"])
    assert argv[1:4] == ["agent", "-f", "/etc/lbctl/lbctl.yaml"]
    assert argv[0].endswith("/lbctl")
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # A bad file will not get better by restarting.
    assert "2" in s["RestartPreventExitStatus"].split()


def test_the_example_config_loads():
    state = load_file(str(PACKAGING / "lbctl.yaml"), check_interfaces=False)
    assert state.interfaces == ("eth0", "eth1")
    assert len(state.vips) == 2
