"""The demo end to end, as the README's first command runs it: real lab, real XDP, cleaned up.
Its claims are checked, not its wording: the tables add up, agree with the balancer's own
counters, the removed backend gets nothing afterwards, and nothing is left behind."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from lbctl import lab as lab_module
from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP"),
]

REQUESTS = 300  # the demo's default, as the README shows it
BACKENDS = {"be1": "10.77.2.11", "be2": "10.77.2.12", "be3": "10.77.2.13"}
BACKENDS6 = {"be1": "[fd77:2::11]", "be2": "[fd77:2::12]", "be3": "[fd77:2::13]"}
VIP6 = "[fd77::10]:80"
REMOVED = "be2"  # the demo removes the second backend


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def processes_naming(prefix: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if entry.isdigit() and f"{prefix}-".encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def distribution(out: str, heading: str) -> dict[str, int]:
    """The backend -> requests table printed under `heading` (rich draws it with box lines)."""
    start = out.index(heading)
    rows: dict[str, int] = {}
    for line in out[start:].splitlines()[1:]:
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 3 and cells[0] in BACKENDS:
            rows[cells[0]] = int(cells[1])
        elif rows and not re.match(r"^[\s│┃|┏┡└━─╇┳┩┓┴]*$|^\S*\s*backend", line):
            break  # the first line after the table
    assert set(rows) == set(BACKENDS), f"no complete table under {heading!r}:\n{out[start:]}"
    return rows


def backend_flows(out: str, vip: str, backends: dict[str, str] = BACKENDS) -> dict[str, int]:
    """New flows per backend of `vip` from the `lbctl stats` table the demo prints."""
    header = next(line.split() for line in out.splitlines()
                  if line.split()[:2] == ["VIP", "BACKEND"])
    flows = header.index("FLOWS")
    by_addr = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) == len(header) and cols[0] == vip:
            by_addr[cols[1].rsplit(":", 1)[0]] = int(cols[flows])
    return {name: by_addr[addr] for name, addr in backends.items() if addr in by_addr}


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbctl", "demo", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def assert_nothing_left(prefix: str) -> None:
    assert not any(ns.startswith(prefix + "-") for ns in namespaces())
    assert processes_naming(prefix) == []
    assert not Path(f"/sys/fs/bpf/lbctl/{prefix}-lb").exists()
    assert not (lab_module.RUN_ROOT / prefix).exists()
    assert not (lab_module.RUN_ROOT / f"{prefix}.lock").exists()


def test_demo_balances_then_avoids_a_removed_backend_and_cleans_up() -> None:
    prefix = "td" + secrets.token_hex(2)
    try:
        proc = run_demo("--prefix", prefix)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout

        before = distribution(out, f"{REQUESTS} new connections to 10.77.0.10:80")
        assert sum(before.values()) == REQUESTS
        assert all(n > 0 for n in before.values()), before  # Maglev spreads over all three
        # The table (from the backends' answers) agrees with the XDP program's own counters.
        assert backend_flows(out, "10.77.0.10:80") == before

        udp = re.search(r"(\d+) datagrams answered by (.*)", out)
        assert udp is not None, out
        answered = {n: int(c) for n, c in re.findall(r"(be\d) x(\d+)", udp.group(2))}
        assert sum(answered.values()) == int(udp.group(1))
        assert backend_flows(out, "10.77.0.10:9000") == answered

        # The IPv6 VIP over the same backends at their IPv6 addresses (NAT66).
        assert f"$ lbctl -n {prefix}-lb vip add '{VIP6}'" in out
        v6 = distribution(out, f"{REQUESTS} new IPv6 connections to {VIP6}")
        assert sum(v6.values()) == REQUESTS
        assert all(n > 0 for n in v6.values()), v6
        assert backend_flows(out, VIP6, BACKENDS6) == v6
        assert "the backends saw the client as fd77:1::2 (" in out

        after = distribution(out, f"after 'backend del' of {REMOVED}")
        assert after[REMOVED] == 0
        assert sum(after.values()) == REQUESTS
        assert f"{REMOVED}: no new connection reached it" in out
        assert_nothing_left(prefix)
    finally:
        Lab(prefix).down()


def test_demo_refuses_bad_arguments_before_building_anything() -> None:
    prefix = "td" + secrets.token_hex(2)
    # Exit 2: click refuses the argument; 7: the lab refuses the prefix (a LabError).
    for args, named, code in ((["--prefix", prefix, "--requests", "5"], "--requests", 2),
                              (["--prefix", prefix, "--mode", "fast"], "--mode", 2),
                              (["--prefix", f"{prefix}/x"], "bad lab prefix", 7)):
        proc = run_demo(*args)
        assert proc.returncode == code, proc.stderr
        assert named in proc.stderr and "Traceback" not in proc.stderr
        assert_nothing_left(prefix)
