"""lbctl/setup.sh installs every program that lbctl, the lab, the demo and the tests run: each
executable named in the code maps (dpkg -S) to a package setup.sh installs or to one that even
a minimal Debian has (Priority: required), so a fresh host never meets `exec of "sysctl" failed`.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "lbctl" / "setup.sh"
BENCH_SETUP = REPO / "lbctl" / "bench-setup.sh"
SCANNED = ("lbctl", "xdp", "tests")
# The PATH a root shell has on Debian: where the README's commands look for programs.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Calls that execute their argv argument (subprocess and the project's own wrappers:
# Lab.run/_must run argv in a namespace, bench's _spawn starts a server).
EXEC_CALLS = {"run", "Popen", "check_output", "check_call", "call", "_must", "_spawn",
              "execv", "execvp", "execvpe", "execl", "execlp", "spawnv", "spawnvp"}
# Variables that hold an argv built for later (a launcher runs them, a helper prefixes them).
ARGV_NAME = re.compile(r"^(argv|cmd|command|prefix)$|_(argv|cmd|command)$")
COMMAND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Use:
    """One executable named by the code: where, and which package list may cover it."""

    program: str
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def is_test(self) -> bool:
        return self.path.relative_to(REPO).parts[0] == "tests"

    @property
    def is_bench(self) -> bool:
        return any(part.startswith("bench") for part in self.path.relative_to(REPO).parts)


# ------------------------------------------------------------------ the scanner

def _unwrap(argv: list[str | None]) -> Iterator[str]:
    """The programs an argv runs: its first element and, through wrappers, the wrapped one."""
    while argv and argv[0] is not None:
        head = argv[0]
        if not COMMAND_NAME.match(head):
            return  # a path or a computed name: not a PATH lookup
        yield head
        rest = argv[1:]
        if head == "ip" and rest[:2] == ["netns", "exec"]:
            argv = rest[3:]  # ip netns exec NS CMD...
        elif head == "nsenter" and "--" in rest:
            argv = rest[rest.index("--") + 1:]
        elif head in ("env", "setpriv", "timeout", "unshare", "taskset", "chroot", "sudo"):
            # Options and VAR=value (and timeout's duration, taskset's mask) come first.
            i = 0
            while i < len(rest) and rest[i] is not None and (
                rest[i].startswith("-") or "=" in rest[i]
                or (head in ("timeout", "taskset") and i == 0)
            ):
                i += 1
            argv = rest[i:]
        else:
            return


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: Path, tree: ast.AST) -> None:
        self.path = path
        self.uses: list[Use] = []
        # Every list literal assigned to a name anywhere in the file: a cheap, generous
        # resolution of `[*prefix, ...]` and of argv variables passed later.
        self.lists: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        self.lists.setdefault(t.id, []).append(node.value)

    def _flatten(self, node: ast.expr, depth: int = 0) -> list[list[str | None]]:
        """The argv shapes an expression may hold (constant elements, None for the rest)."""
        if depth > 4:
            return []
        if isinstance(node, ast.Name):
            return [a for v in self.lists.get(node.id, []) for a in self._flatten(v, depth + 1)]
        if isinstance(node, ast.IfExp):
            return self._flatten(node.body, depth + 1) + self._flatten(node.orelse, depth + 1)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return [a + b for a in self._flatten(node.left, depth + 1)
                    for b in self._flatten(node.right, depth + 1) or [[None]]]
        if not isinstance(node, (ast.List, ast.Tuple)):
            return []
        shapes: list[list[str | None]] = [[]]
        for elt in node.elts:
            if isinstance(elt, ast.Starred):
                inner = self._flatten(elt.value, depth + 1) or [[None]]
                shapes = [s + i for s in shapes for i in inner]
            elif isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                shapes = [s + [elt.value] for s in shapes]
            else:
                shapes = [s + [None] for s in shapes]
        return shapes

    def _record(self, node: ast.expr, line: int) -> None:
        for argv in self._flatten(node):
            for program in _unwrap(argv):
                self.uses.append(Use(program, self.path, line))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in EXEC_CALLS:
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "args")]:
                self._record(arg, node.lineno)
        elif (name == "which" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            self.uses.append(Use(node.args[0].value, self.path, node.lineno))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and ARGV_NAME.search(t.id) for t in node.targets):
            self._record(node.value, node.lineno)
        self.generic_visit(node)


def scan_source(path: Path, text: str) -> list[Use]:
    tree = ast.parse(text, filename=str(path))
    scanner = _Scanner(path, tree)
    scanner.visit(tree)
    return scanner.uses


def scan(roots: Iterable[Path]) -> list[Use]:
    uses = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if ".venv" not in path.parts:
                uses += scan_source(path, path.read_text())
    return uses


# ------------------------------------------------------------------ the package side


def setup_packages() -> dict[str, set[str]]:
    """What setup.sh installs, as it reports it: {"demo": {...}, "test": {...}}."""
    proc = subprocess.run(["bash", str(SETUP), "packages"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, f"setup.sh packages: {proc.stderr}"
    lists: dict[str, set[str]] = {"demo": set(), "test": set()}
    for line in proc.stdout.splitlines():
        purpose, package = line.split()
        lists[purpose].add(package)
    assert lists["demo"], "setup.sh packages listed nothing"
    return lists


def _usrmerge_aliases(path: str) -> list[str]:
    """dpkg records /bin/ip even where /bin is a link to /usr/bin: ask for both spellings."""
    if path.startswith("/usr/"):
        return [path, path[len("/usr"):]]
    return [path, "/usr" + path]


def _owners(paths: list[str]) -> set[str]:
    proc = subprocess.run(["dpkg-query", "-S", *paths], capture_output=True, text=True,
                          timeout=30, check=False)
    owners = set()
    for line in proc.stdout.splitlines():
        if line.startswith("diversion "):
            continue
        pkgs, _, _ = line.partition(": ")
        owners |= {p.strip().split(":")[0] for p in pkgs.split(",")}
    return owners


@cache
def package_of(program: str) -> str | None:
    """The Debian package that installed `program` on this host (None: not on PATH, or not
    from dpkg). The owner of the name found on PATH wins over that of a symlink's target
    (/usr/bin/ruby is package ruby's, /usr/bin/ruby3.1 is ruby3.1's)."""
    found = shutil.which(program, path=SYSTEM_PATH)
    if found is None:
        return None
    for path in (found, os.path.realpath(found)):
        owners = _owners(_usrmerge_aliases(path))
        if owners:
            # Several owners only for shared directories, never for an executable.
            return owners.pop() if len(owners) == 1 else None
    return None


@cache
def in_minimal_debian(package: str) -> bool:
    """Essential or Priority: required: what debootstrap --variant=minbase installs."""
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Priority} ${Essential}", package],
                          capture_output=True, text=True, timeout=30, check=False)
    fields = proc.stdout.split()
    return proc.returncode == 0 and (fields[:1] == ["required"] or fields[1:] == ["yes"])


def why_not_covered(use: Use, lists: dict[str, set[str]], bench_setup: str) -> str | None:
    """None if the program comes from an allowed package, else what is wrong and the fix."""
    allowed = set(lists["demo"])
    if use.is_test:
        allowed |= lists["test"]
    package = package_of(use.program)
    if package is None:
        if use.is_bench and re.search(rf"/{re.escape(use.program)}\b", bench_setup):
            return None  # bench-setup.sh installs it by path; absent until `make bench`
        return (f"{use.program} ({use.where}) is not installed from a Debian package here; "
                f"hint: add its package to {'test_pkgs' if use.is_test else 'pkgs'} in "
                "lbctl/setup.sh and run it")
    if package in allowed or in_minimal_debian(package):
        return None
    if use.is_bench and re.search(rf"\b{re.escape(package)}\b", bench_setup):
        return None
    where = "test_pkgs" if use.is_test else "pkgs"
    return (f"{use.program} ({use.where}) comes from Debian package {package}, which a minimal "
            f"Debian lacks and lbctl/setup.sh does not install; hint: add {package} to {where}")


# ------------------------------------------------------------------ the tests

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-query") is None,
                                reason="maps programs to packages with dpkg-query (Debian only)")


@needs_dpkg
def test_every_program_the_code_runs_is_installed_by_setup_or_in_minimal_debian() -> None:
    lists = setup_packages()
    bench_setup = BENCH_SETUP.read_text() if BENCH_SETUP.exists() else ""
    uses = scan(REPO / d for d in SCANNED)
    problems = {}
    for use in uses:
        key = (use.program, use.is_test, use.is_bench)
        if key not in problems:
            problems[key] = why_not_covered(use, lists, bench_setup)
    assert [p for p in problems.values() if p] == []


def test_scanner_finds_the_programs_the_lab_runs() -> None:
    # A scanner that finds nothing would pass the test above vacuously.
    found = {u.program for u in scan([REPO / "lbctl", REPO / "tests"])}
    assert {"ip", "sysctl", "ethtool", "nsenter", "setpriv"} <= found


def test_scanner_sees_through_wrappers_and_prefix_variables(tmp_path: Path) -> None:
    source = '''
import subprocess, sys
prefix = ["ip", "netns", "exec", ns]
subprocess.run([*prefix, "sysctl", "-w", "x=1"])
lab.run("lb", ["ethtool", "-K", "eth0", "gro", "on"])
argv = ["nsenter", f"--net={path}", "--", "tcpdump", "-i", "eth0"]
proc = subprocess.Popen(["env", "A=1", "setpriv", "--reuid=1", "ping", "-c1", host])
subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", "pass"])
subprocess.run(["/usr/sbin/iptables", "-L"])
runner.invoke(cli, ["status"])
'''
    found = {u.program for u in scan_source(tmp_path / "x.py", source)}
    # Not the python run in a namespace, not a path, not a CLI argument list.
    assert found == {"ip", "sysctl", "ethtool", "nsenter", "tcpdump", "env", "setpriv", "ping"}


@needs_dpkg
def test_a_program_from_an_uninstalled_package_is_reported() -> None:
    # procps is "important", not "required": minbase lacks sysctl, the issue this guards.
    assert package_of("sysctl") == "procps"
    assert not in_minimal_debian("procps")
    assert in_minimal_debian("util-linux") and in_minimal_debian("coreutils")
    use = Use("sysctl", REPO / "lbctl" / "lab.py", 1)
    why = why_not_covered(use, {"demo": {"iproute2"}, "test": {"procps"}}, "")
    assert why is not None and "procps" in why and "hint" in why
    # A test may use a package of the test list; the product may not.
    test_use = Use("sysctl", REPO / "tests" / "netns" / "x.py", 1)
    assert why_not_covered(test_use, {"demo": set(), "test": {"procps"}}, "") is None
    missing = Use("no-such-program-lbctl", REPO / "lbctl" / "lab.py", 1)
    assert "not installed" in (why_not_covered(missing, {"demo": set(), "test": set()}, "") or "")
