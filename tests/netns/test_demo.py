"""The demo end to end, as the README's first command runs it: real lab, real XDP, cleaned up."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo_balances_then_avoids_a_removed_backend_and_cleans_up():
    prefix = "td" + secrets.token_hex(2)
    try:
        proc = subprocess.run([sys.executable, "-m", "lbctl", "demo", "--prefix", prefix],
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert "300 new connections to 10.77.0.10:80" in out
        assert "be2: no new connection reached it" in out
        assert "redirect" in out and "drop_no_backend" in out      # the stats table was shown
        assert not any(ns.startswith(prefix + "-") for ns in namespaces())
        assert not os.path.exists(f"/sys/fs/bpf/lbctl/{prefix}-lb")
    finally:
        from lbctl.lab import Lab

        Lab(prefix).down()
