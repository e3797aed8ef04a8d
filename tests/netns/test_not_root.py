"""Without root every command says so in one line, exits 77 and touches nothing."""
from __future__ import annotations

import importlib.metadata
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root to drop to an unprivileged user with setpriv")

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
# Checkout directories the unprivileged run does not import from.
NOT_RUNTIME = {"tests", "docs", "vagrant", "bench"}


def _runtime_distributions(name: str = "lbctl") -> list[importlib.metadata.Distribution]:
    """lbctl's installed dependencies, transitively, for this interpreter and platform."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in found:
            continue
        found[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    del found[name]
    return list(found.values())


@pytest.fixture(scope="module")
def world_readable_copy() -> Iterator[Path]:
    """The checkout's code and lbctl's Python dependencies copied where any user can read them.

    The clone (and its venv) may live in /root, which uid 65534 cannot enter: a run straight
    from the checkout would fail on the import, not on the root check under test.
    """
    top = Path(tempfile.mkdtemp(prefix="lbctl-not-root-"))
    try:
        src, site = top / "src", top / "site"
        for entry in REPO.iterdir():
            if (entry.is_dir() and not entry.name.startswith(".") and entry.name not in NOT_RUNTIME
                    and not entry.name.endswith(".egg-info")):
                shutil.copytree(entry, src / entry.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for dist in _runtime_distributions():
            for file in dist.files or []:
                if ".." in file.parts or file.suffix == ".pyc":
                    continue  # scripts outside site-packages; bytecode is rebuilt
                dest = site / file
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(dist.locate_file(file), dest)
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top)


# A lab prefix of this test's own: whatever the commands would build carries it.
LAB_PREFIX = f"mp{secrets.token_hex(3)}"


def _as_nobody(copy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lbctl ARGS` as uid 65534, from the world-readable copy."""
    # The venv's python may sit in /root too: run the interpreter it was made from.
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(copy),
        "PYTHONPATH": f"{copy / 'src'}{os.pathsep}{copy / 'site'}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           str(python), "-m", "lbctl", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=copy, env=env)


@pytest.mark.parametrize("args", [
    ["status"], ["attach", "lo"], ["detach", "--all"], ["vip", "add", "10.0.0.10:80"],
    ["backend", "add", "10.0.0.10:80", "10.0.1.1:80"], ["stats"], ["vip", "list"],
    ["lab", "up", "--prefix", LAB_PREFIX], ["lab", "down", "--prefix", LAB_PREFIX],
    ["demo", "--prefix", LAB_PREFIX],
    # The root check comes before the arguments are looked at: no other error shows first.
    ["lab", "up", "--prefix", "bad/prefix"],
])
def test_unprivileged_user_gets_one_line_and_exit_77(world_readable_copy: Path,
                                                     args: list[str]) -> None:
    proc = _as_nobody(world_readable_copy, *args)
    assert proc.returncode == 77, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0] and "hint" in lines[0]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert LAB_PREFIX not in netns


def test_other_lab_errors_are_one_line_with_their_own_exit_code(world_readable_copy: Path) -> None:
    proc = _as_nobody(world_readable_copy, "lab", "status", "--prefix", "bad/prefix")
    assert proc.returncode == 7, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad lab prefix 'bad/prefix'" in lines[0] and "hint" in lines[0]
