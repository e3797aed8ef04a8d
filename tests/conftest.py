"""Suite-wide rules: root-only tests skip with a reason off CI, in CI nothing may skip, and a
session that leaves behind namespaces, pins or /run state it created fails."""
from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Where the suite's tests leave traces when they do not clean up: `ip netns list`, the lab's
# and the instances' /run state, and the pins.
FOOTPRINT_DIRS = (Path("/run/netns"), Path("/run/lbctl"), Path("/run/lbctl/lab"),
                  Path("/sys/fs/bpf"), Path("/sys/fs/bpf/lbctl"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (as root) a skip hides a missing install step: report it as a failure."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may skip: {reason}"


# The Vagrant lab's test boots five VMs (tens of minutes under software emulation): it runs
# only when asked for by name, `-m vagrant_lab`; otherwise it is deselected, not skipped, so
# CI (where a skip fails) neither runs it nor counts it.
ON_REQUEST_MARKERS = ("vagrant_lab",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    asked = config.getoption("markexpr") or ""
    wanted = [m for m in ON_REQUEST_MARKERS if m not in asked]
    if not wanted:
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in wanted) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ---------------------------------------------------------------- leak check
# Other sessions run the same tests on this host at the same time, with the same letter
# prefixes: what this session made is told apart by the random part of each name. Every test
# name comes from secrets.token_hex in this process, so each token drawn here is recorded.
_tokens: set[str] = set()
_token_hex = secrets.token_hex


def _recording_token_hex(nbytes: int | None = None) -> str:
    token = _token_hex(nbytes)
    _tokens.add(token)
    return token


def _footprint() -> set[str]:
    found = set()
    for directory in FOOTPRINT_DIRS:
        try:
            found |= {str(directory / name) for name in os.listdir(directory)}
        except OSError:
            continue
    return found


def _made_here(path: str) -> bool:
    """A name is this session's if one of its tokens stands right after the name's start
    (letters, digits, '-', a short prefix) and before its end, a '-' or a '.'."""
    name = os.path.basename(path)
    return any(re.match(rf"[a-z0-9_-]{{0,16}}?{token}(?:[-.]|$)", name) for token in _tokens)


def pytest_sessionstart(session: pytest.Session) -> None:
    secrets.token_hex = _recording_token_hex
    session.config.stash[_BEFORE] = _footprint()


_BEFORE = pytest.StashKey[set[str]]()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):
    """After every fixture's teardown: what this session created and did not remove fails it."""
    result = yield
    secrets.token_hex = _token_hex
    before = session.config.stash.get(_BEFORE, None)
    if before is None or os.geteuid() != 0:
        return result
    leaked = sorted(p for p in _footprint() - before if _made_here(p))
    if leaked:
        writer = session.config.get_terminal_writer()
        writer.line(f"this test session left {len(leaked)} thing(s) it created behind "
                    "(a test that does not clean up):", red=True, bold=True)
        for path in leaked:
            writer.line(f"  {path}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
