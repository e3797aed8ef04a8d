"""Without root every command says so in one line, exits 77 and touches nothing."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root to drop to an unprivileged user with setpriv")


# A lab prefix of this test's own: whatever the commands would build carries it.
LAB_PREFIX = f"mp{secrets.token_hex(3)}"


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "lbctl", *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("args", [
    ["status"], ["attach", "lo"], ["detach", "--all"], ["vip", "add", "10.0.0.10:80"],
    ["backend", "add", "10.0.0.10:80", "10.0.1.1:80"], ["stats"], ["vip", "list"],
    ["lab", "up", "--prefix", LAB_PREFIX], ["lab", "down", "--prefix", LAB_PREFIX],
    ["demo", "--prefix", LAB_PREFIX],
    # The root check comes before the arguments are looked at: no other error shows first.
    ["lab", "up", "--prefix", "bad/prefix"],
])
def test_unprivileged_user_gets_one_line_and_exit_77(args):
    proc = _as_nobody(*args)
    assert proc.returncode == 77, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0] and "hint" in lines[0]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert LAB_PREFIX not in netns


def test_other_lab_errors_are_one_line_with_their_own_exit_code():
    proc = _as_nobody("lab", "status", "--prefix", "bad/prefix")
    assert proc.returncode == 7, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad lab prefix 'bad/prefix'" in lines[0] and "hint" in lines[0]
