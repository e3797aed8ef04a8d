"""The suite's own leak check (tests/conftest.py): a session that leaves a namespace or /run
state it created fails, and one that cleans up, or whose leftovers are someone else's, passes."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the check only runs as root, on namespaces and /run"),
]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

_INNER = '''
import secrets, subprocess
from pathlib import Path

def test_makes_things():
    ns = "fd" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    Path("/run/lbctl").mkdir(exist_ok=True)
    Path(f"/run/lbctl/{ns}.lock").touch()
    print(f"MADE {ns}")
    if CLEAN:
        subprocess.run(["ip", "netns", "del", ns], check=True)
        Path(f"/run/lbctl/{ns}.lock").unlink()
'''


def _run_inner(pytester: pytest.Pytester, clean: bool) -> tuple[pytest.RunResult, str]:
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_inner=f"CLEAN = {clean}\n" + _INNER)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    made = re.findall(r"MADE (fd[0-9a-f]+)", result.stdout.str())
    assert len(made) == 1, result.stdout.str()
    return result, made[0]


def _remove(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    Path(f"/run/lbctl/{ns}.lock").unlink(missing_ok=True)


def test_a_session_that_leaves_its_namespace_fails_and_names_it(pytester: pytest.Pytester) -> None:
    result, ns = _run_inner(pytester, clean=False)
    try:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
        out = result.stdout.str()
        assert f"/run/netns/{ns}" in out and f"/run/lbctl/{ns}.lock" in out, out
    finally:
        _remove(ns)


def test_a_session_that_cleans_up_passes(pytester: pytest.Pytester) -> None:
    result, ns = _run_inner(pytester, clean=True)
    _remove(ns)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()


def test_what_another_session_made_meanwhile_is_not_counted(pytester: pytest.Pytester) -> None:
    # A name this session never drew, created while it runs, as a parallel run would.
    other = "fd" + secrets.token_hex(3)
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_inner=f'''
import subprocess
def test_other_session_creates_a_namespace():
    subprocess.run(["ip", "netns", "add", "{other}"], check=True)
''')
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    finally:
        _remove(other)
