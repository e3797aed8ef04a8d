"""What the peer bench needs installed, checked before anything starts, and the versions it ran."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Callable, Sequence

from lbctl.bench.errors import BenchError, ToolMissingError
from lbctl.bench.spec import SETUPS

# tool -> (Debian package, which setups need it; None = every setup)
TOOLS: dict[str, tuple[str, frozenset[str] | None]] = {
    "ip": ("iproute2", None),
    "nsenter": ("util-linux", None),
    "ethtool": ("ethtool", None),
    "nginx": ("nginx", None),
    "wrk": ("wrk", None),
    "iperf3": ("iperf3", None),
    "nft": ("nftables", frozenset({"nftables"})),
    "haproxy": ("haproxy", frozenset({"haproxy"})),
}
# Python modules: matplotlib draws the plots, bcc compiles the packet generator and sink.
MODULES: dict[str, str] = {
    "matplotlib": "pip install matplotlib (into the venv)",
    "bcc": "apt-get install python3-bpfcc",
}


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing_tools(
    setups: Sequence[str],
    which: Callable[[str], str | None] = shutil.which,
    has_module: Callable[[str], bool] = _has_module,
) -> list[str]:
    """What the given setups need and this host lacks, as 'tool (package)' strings."""
    missing = []
    for tool, (package, needed_by) in TOOLS.items():
        if needed_by is not None and not needed_by & set(setups):
            continue
        if which(tool) is None:
            missing.append(f"{tool} ({package})")
    for module, how in MODULES.items():
        if not has_module(module):
            missing.append(f"python module {module} ({how})")
    return missing


def check_tools(
    setups: Sequence[str],
    which: Callable[[str], str | None] = shutil.which,
    has_module: Callable[[str], bool] = _has_module,
) -> None:
    """Refuse to start, naming every missing piece, rather than produce a partial table."""
    missing = missing_tools(setups, which, has_module)
    if missing:
        raise ToolMissingError(
            "cannot run the benchmark: missing " + ", ".join(missing)
            + "; hint: bash lbctl/bench-setup.sh installs them all"
        )


def resolve_setups(only: Sequence[str] | None) -> list[str]:
    """The setups to run, in SETUPS order; every one when `only` is empty."""
    if not only:
        return list(SETUPS)
    unknown = [s for s in only if s not in SETUPS]
    if unknown:
        raise BenchError(
            f"unknown setup(s) {', '.join(unknown)}; hint: choose from {', '.join(SETUPS)}"
        )
    return [s for s in SETUPS if s in only]


def tool_versions() -> dict[str, str]:
    """The first line each peer prints about its version, for the record."""
    probes = {
        "nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"], "wrk": ["wrk", "--version"],
        "iperf3": ["iperf3", "--version"], "nft": ["nft", "--version"],
    }
    out = {}
    for tool, argv in probes.items():
        try:
            proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (proc.stdout + proc.stderr).strip().splitlines()
        out[tool] = text[0][:80] if text else "?"
    return out
