"""Shared by the netns tests: the real lbctl CLI run against a lab's balancer, and a lab that
is always torn down (namespaces, servers, XDP and pins), even after a failure or Ctrl-C."""
from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lbctl.lab import Lab


def lbctl(lab: Lab, *args: str, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """`lbctl -n <lab's balancer> ARGS` in a child process, as a user types it."""
    proc = subprocess.run([sys.executable, "-m", "lbctl", "-n", lab.lb.netns, *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if check:
        assert proc.returncode == 0, f"lbctl {' '.join(args)}: {proc.stderr}"
    return proc


@contextmanager
def lab_up(letters: str, attach: bool = True) -> Iterator[Lab]:
    """A lab with a unique prefix (letters + 4 hex digits), the balancer attached on both arms."""
    lab = Lab(letters + secrets.token_hex(2))
    try:
        lab.up()
        if attach:
            lbctl(lab, "attach", *lab.lb_ifaces)
        yield lab
    finally:
        lbctl(lab, "detach", "--all", "--purge", check=False)
        lab.down()
