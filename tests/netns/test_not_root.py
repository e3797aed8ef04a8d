"""Without root every command says so in one line, exits 77 and touches nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root to drop to an unprivileged user with setpriv")


@pytest.mark.parametrize("args", [
    ["status"], ["attach", "lo"], ["detach", "--all"], ["vip", "add", "10.0.0.10:80"],
    ["backend", "add", "10.0.0.10:80", "10.0.1.1:80"], ["stats"], ["vip", "list"],
])
def test_unprivileged_user_gets_one_line_and_exit_77(args):
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "lbctl", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 77, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0] and "hint" in lines[0]
