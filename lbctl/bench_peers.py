"""`lbctl bench peers`: lbctl's XDP balancer against nftables DNAT, HAProxy and no balancer at
all, measured in one run on one namespace lab, with a JSON record, a markdown table and plots."""
from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbctl.errors import LbctlError
from lbctl.lab import Lab, LabError

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
RUN_ROOT = Path("/run/lbctl/bench")
BPF_PIN_ROOT = Path("/sys/fs/bpf/lbctl")
NETNS_DIR = Path("/run/netns")

# The order the issue lists them in; each is measured in turn, round after round.
SETUPS: tuple[str, ...] = ("xdp-native", "xdp-generic", "nftables", "haproxy", "direct")
SETUP_TITLES = {
    "xdp-native": "lbctl XDP (native)",
    "xdp-generic": "lbctl XDP (generic)",
    "nftables": "nftables DNAT",
    "haproxy": "HAProxy mode tcp",
    "direct": "direct (no balancer)",
}
WORKLOADS: tuple[str, ...] = ("short", "keepalive", "bulk", "pps")
WORKLOAD_TITLES = {
    "short": "short connections (new TCP connection per request)",
    "keepalive": "keep-alive requests",
    "bulk": "bulk TCP (iperf3, one stream)",
    "pps": "packet rate (60-byte UDP, 4096 flows)",
}

# Ports inside the lab. nginx listens beside the lab's own Python server (port 80), which
# stays up so the lab's readiness checks keep holding.
HTTP_VIP_PORT = 80
NGINX_PORT = 8080
BULK_PORT = 5201
PPS_PORT = 9999  # nothing listens: packets are dropped by the sink past the balancer
PPS_FLOWS = 4096
PPS_PAYLOAD_BYTES = 18  # 14 + 20 + 8 + 18 = 60-byte frames, the Ethernet minimum sans FCS

# One thread per backend, so a direct run gives each backend one thread's connections.
WRK_THREADS = 3
WRK_CONNECTIONS = 63
# The balancer kept up with the generator if it forwarded this share of what was offered;
# the figure is then the generator's limit, not the balancer's.
GENERATOR_BOUND_SHARE = 0.95
# Above this share of failed requests a run is reported as failed, not averaged in.
MAX_ERROR_SHARE = 0.01
TEST_RUN_CALLS = 20_000


class BenchError(LbctlError):
    """The benchmark could not run or could not finish; nothing partial is presented."""

    exit_code = 1


class ToolMissingError(BenchError):
    """A tool the requested setups need is not installed."""

    exit_code = 69


# ---------------------------------------------------------------- tools

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


def missing_tools(
    setups: Sequence[str],
    which: Callable[[str], str | None] = shutil.which,
    has_module: Callable[[str], bool] | None = None,
) -> list[str]:
    """What the given setups need and this host lacks, as 'tool (package)' strings."""
    has_module = has_module or _has_module
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
    has_module: Callable[[str], bool] | None = None,
) -> None:
    """Refuse to start, naming every missing piece, rather than produce a partial table."""
    missing = missing_tools(setups, which, has_module)
    if missing:
        raise ToolMissingError(
            "cannot run the benchmark: missing " + ", ".join(missing)
            + "; hint: bash lbctl/bench-setup.sh installs them all"
        )


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def resolve_setups(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(SETUPS)
    unknown = [s for s in only if s not in SETUPS]
    if unknown:
        raise BenchError(
            f"unknown setup(s) {', '.join(unknown)}; hint: choose from {', '.join(SETUPS)}"
        )
    return [s for s in SETUPS if s in only]


# ---------------------------------------------------------------- parsing (pure)

# wrk calls done() once at the end; the JSON line it prints is what the harness reads.
# With BENCH_WRK_ADDRS="a:p,b:p,..." each wrk thread connects to the next address in turn:
# the direct runs spread one wrk (same threads, same connections) over the backends.
WRK_LUA = r"""
local addrs = nil
local threads = 0
setup = function(thread)
  local spec = os.getenv("BENCH_WRK_ADDRS")
  if spec == nil or spec == "" then return end
  if addrs == nil then
    addrs = {}
    for host, port in string.gmatch(spec, "([^,:]+):(%d+)") do
      table.insert(addrs, wrk.lookup(host, port)[1])
    end
  end
  thread.addr = addrs[(threads % #addrs) + 1]
  threads = threads + 1
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, " ..
    "\"errors\": {\"connect\": %d, \"read\": %d, \"write\": %d, \"status\": %d, " ..
    "\"timeout\": %d}, \"p50_us\": %d, \"p99_us\": %d, \"mean_us\": %.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: requests completed over duration_s, latency percentiles, error counts."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_share(self) -> float:
        total = self.requests + self.errors
        return self.errors / total if total else 1.0


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_WRK_TEXT_RE = {
    "requests": re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.MULTILINE),
    "p50": re.compile(r"^\s*50%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE),
    "p99": re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE),
    "socket": re.compile(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
    "non2xx": re.compile(r"Non-2xx or 3xx responses: (\d+)"),
}


def parse_wrk(text: str) -> WrkResult:
    """Read wrk's output: the WRKJSON line of WRK_LUA if present, else wrk's own text
    (which needs --latency for the percentiles). Raises BenchError if neither is there."""
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1e3,
                p99_ms=data["p99_us"] / 1e3,
                errors=sum(int(v) for v in data["errors"].values()),
            )
    found = {k: r.search(text) for k, r in _WRK_TEXT_RE.items()}
    if not (found["requests"] and found["p50"] and found["p99"]):
        raise BenchError(f"cannot read wrk's output: {text.strip()[-300:]!r}")
    req = found["requests"]
    errors = 0
    if found["socket"]:
        errors += sum(int(g) for g in found["socket"].groups())
    if found["non2xx"]:
        errors += int(found["non2xx"].group(1))
    return WrkResult(
        requests=int(req.group(1)),
        duration_s=float(req.group(2)) * _UNIT_MS[req.group(3)] / 1e3,
        p50_ms=float(found["p50"].group(1)) * _UNIT_MS[found["p50"].group(2)],
        p99_ms=float(found["p99"].group(1)) * _UNIT_MS[found["p99"].group(2)],
        errors=errors,
    )


def parse_iperf3(text: str) -> dict[str, float]:
    """iperf3 -J output -> the receiver's bits/s and the sender's retransmits."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"cannot read iperf3's JSON output: {exc}: {text.strip()[-300:]!r}") \
            from exc
    if data.get("error"):
        raise BenchError(f"iperf3 failed: {data['error']}")
    try:
        end = data["end"]
        received = end["sum_received"]
        return {
            "bits_per_second": float(received["bits_per_second"]),
            "seconds": float(received["seconds"]),
            "retransmits": float(end.get("sum_sent", {}).get("retransmits", 0)),
        }
    except (KeyError, TypeError) as exc:
        raise BenchError(f"iperf3's JSON output lacks end.sum_received: {exc}") from exc


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements: spread_pct is (max - min) / median."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "spread_pct": None,
                "values": []}
    med = statistics.median(vals)
    return {
        "n": len(vals),
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "spread_pct": (max(vals) - min(vals)) / med * 100 if med else None,
        "values": vals,
    }


@dataclass(frozen=True)
class PpsVerdict:
    """One packet-rate run: what the generator offered and what got past the balancer."""

    sent: int
    forwarded: int
    seconds: float
    balancer_cpu_s: float | None = None

    @property
    def sent_pps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def forwarded_pps(self) -> float:
        return self.forwarded / self.seconds if self.seconds > 0 else 0.0

    @property
    def drop_share(self) -> float:
        return 1.0 - self.forwarded / self.sent if self.sent else 0.0

    @property
    def generator_bound(self) -> bool:
        """The balancer forwarded (nearly) all it was offered: it may do more than this."""
        return self.sent > 0 and self.forwarded >= GENERATOR_BOUND_SHARE * self.sent

    @property
    def cpu_s_per_mpkt(self) -> float | None:
        if self.balancer_cpu_s is None or self.forwarded <= 0:
            return None
        return self.balancer_cpu_s / (self.forwarded / 1e6)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "sent_pps": self.sent_pps,
            "forwarded_pps": self.forwarded_pps,
            "drop_share": self.drop_share,
            "generator_bound": self.generator_bound,
            "cpu_s_per_mpkt": self.cpu_s_per_mpkt,
        }


# ---------------------------------------------------------------- summary, ratios, goals (pure)

# metric -> (workload, key in a run record, unit, higher is better)
METRICS: dict[str, tuple[str, str, str, bool]] = {
    "short_rate": ("short", "rate", "conn/s", True),
    "short_p50_ms": ("short", "p50_ms", "ms", False),
    "short_p99_ms": ("short", "p99_ms", "ms", False),
    "keepalive_rate": ("keepalive", "rate", "req/s", True),
    "keepalive_p50_ms": ("keepalive", "p50_ms", "ms", False),
    "keepalive_p99_ms": ("keepalive", "p99_ms", "ms", False),
    "bulk_gbps": ("bulk", "gbps", "Gbit/s", True),
    "pps_forwarded": ("pps", "forwarded_pps", "pkt/s", True),
    "pps_sent": ("pps", "sent_pps", "pkt/s", True),
    "pps_drop_share": ("pps", "drop_share", "share", False),
    "pps_cpu_s_per_mpkt": ("pps", "cpu_s_per_mpkt", "CPU-s/Mpkt", False),
}


def summarize_setup(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per metric, the summary of the successful runs; pps also says if generator-bound."""
    out: dict[str, Any] = {}
    for metric, (workload, key, _unit, _better) in METRICS.items():
        ok = [r for r in runs.get(workload, []) if r.get("ok")]
        out[metric] = summarize([r[key] for r in ok if r.get(key) is not None])
    pps_ok = [r for r in runs.get("pps", []) if r.get("ok")]
    out["pps_generator_bound"] = bool(pps_ok) and any(r["generator_bound"] for r in pps_ok)
    return out


def _median(summary: dict[str, Any], setup: str, metric: str) -> float | None:
    value = summary.get(setup, {}).get(metric, {}).get("median")
    return None if value is None else float(value)


def ratio(summary: dict[str, Any], setup: str, against: str, metric: str) -> float | None:
    num, den = _median(summary, setup, metric), _median(summary, against, metric)
    if num is None or den is None or den == 0:
        return None
    return num / den


RATIO_METRICS = ("short_rate", "keepalive_rate", "bulk_gbps", "pps_forwarded")
RATIO_BASES = ("nftables", "haproxy")


def ratio_table(summary: dict[str, Any], setups: Sequence[str]) -> list[dict[str, Any]]:
    """One row per setup: each throughput metric as a ratio to nftables and to HAProxy."""
    rows = []
    for setup in setups:
        row: dict[str, Any] = {"setup": setup}
        for metric in RATIO_METRICS:
            for base in RATIO_BASES:
                row[f"{metric}/{base}"] = ratio(summary, setup, base, metric)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Goal:
    name: str
    metric: str
    against: str
    target: float  # the ratio to reach (>=), or the largest gap allowed when `within`
    within: bool = False  # "within X% of": ratio >= 1 - target


GOALS: tuple[Goal, ...] = (
    Goal("short connections: XDP within 10% of direct", "short_rate", "direct", 0.10, True),
    Goal("short connections: XDP >= 1.2x nftables DNAT", "short_rate", "nftables", 1.2),
    Goal("short connections: XDP vs HAProxy tcp (reported)", "short_rate", "haproxy", 0.0),
    Goal("keep-alive: XDP >= 0.95x direct", "keepalive_rate", "direct", 0.95),
    Goal("packet rate: XDP >= 3x nftables DNAT", "pps_forwarded", "nftables", 3.0),
)


def evaluate_goals(summary: dict[str, Any], setup: str = "xdp-native") -> list[dict[str, Any]]:
    """Each goal with the measured ratio and whether it was met (None: not measured)."""
    out = []
    for goal in GOALS:
        r = ratio(summary, setup, goal.against, goal.metric)
        threshold = 1.0 - goal.target if goal.within else goal.target
        met = None if r is None else r >= threshold
        caveat = ""
        if goal.metric == "pps_forwarded" and (
            summary.get(setup, {}).get("pps_generator_bound")
            or summary.get(goal.against, {}).get("pps_generator_bound")
        ):
            caveat = "generator-bound: the ratio is a lower bound"
        out.append({
            "goal": goal.name, "setup": setup, "against": goal.against, "metric": goal.metric,
            "ratio": r, "threshold": threshold, "met": met if goal.target else None,
            "caveat": caveat,
        })
    return out


# ---------------------------------------------------------------- markdown and plots (pure-ish)

DOC_BEGIN = "<!-- bench:begin (generated by lbctl bench peers; edits inside are overwritten) -->"
DOC_END = "<!-- bench:end -->"


def _fmt_num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if unit == "Gbit/s":
        return f"{value:.2f}"
    if unit == "ms":
        return f"{value:.2f}"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(s: dict[str, Any] | None, unit: str = "") -> str:
    """'median (±spread%)' or '-'."""
    if not s or s.get("median") is None:
        return "-"
    text = _fmt_num(s["median"], unit)
    if s.get("n", 0) > 1 and s.get("spread_pct") is not None:
        text += f" (±{s['spread_pct'] / 2:.0f}%)"
    return text


def _ratio_cell(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render_markdown(results: dict[str, Any], plot_names: Sequence[str] = ()) -> str:
    """The generated part of docs/benchmarks.md: tables from one results record."""
    setups = [s for s in SETUPS if s in results["setups"]]
    summary = {s: results["setups"][s]["summary"] for s in setups}
    lines = [
        DOC_BEGIN,
        "",
        (f"Run of {results['started'][:16].replace('T', ' ')} UTC, "
         f"{results['repeats']} repeat(s) per figure{' (quick run)' if results['quick'] else ''};"
         f" kernel {results['host']['kernel']}, {results['host']['cpus']} CPUs shared by "
         "every namespace (and by other jobs on the machine); record: "
         f"`bench/results/{results['file']}`."),
        "Cells are medians, (±x%) half the min-max spread over the repeats.",
        "",
        ("| setup | short conn/s | short p50 / p99 ms | keep-alive req/s | keep-alive p50 / p99 ms"
         " | bulk Gbit/s | packets forwarded/s | dropped | balancer CPU-s per Mpkt |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        s = summary[setup]
        runs = results["setups"][setup]["runs"]
        failed = {w: sum(1 for r in runs.get(w, []) if not r.get("ok")) for w in WORKLOADS}
        pps = _cell(s["pps_forwarded"])
        if s["pps_forwarded"]["median"] is not None and s.get("pps_generator_bound"):
            pps += " generator-bound"
        if setup == "haproxy":
            pps = "n/a (no UDP)"
        drop = "-" if s["pps_drop_share"]["median"] is None else \
            f"{s['pps_drop_share']['median']:.0%}"
        note = "".join(f" ({n} {w} run(s) failed)" for w, n in failed.items() if n)
        lines.append(
            f"| {SETUP_TITLES[setup]}{note} | {_cell(s['short_rate'])} | "
            f"{_fmt_num(s['short_p50_ms']['median'], 'ms')} / "
            f"{_fmt_num(s['short_p99_ms']['median'], 'ms')} | {_cell(s['keepalive_rate'])} | "
            f"{_fmt_num(s['keepalive_p50_ms']['median'], 'ms')} / "
            f"{_fmt_num(s['keepalive_p99_ms']['median'], 'ms')} | "
            f"{_cell(s['bulk_gbps'], 'Gbit/s')} | {pps} | {drop} | "
            f"{_fmt_num(s['pps_cpu_s_per_mpkt']['median'], 'ms')} |"
        )
    lines += [
        "",
        "Ratios of the medians (throughput; higher is better):",
        "",
        ("| setup | short vs nftables | short vs HAProxy | keep-alive vs nftables | "
         "keep-alive vs HAProxy | bulk vs nftables | bulk vs HAProxy | packets/s vs nftables |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ratio_table(summary, setups):
        lines.append(
            f"| {SETUP_TITLES[row['setup']]} | {_ratio_cell(row['short_rate/nftables'])} | "
            f"{_ratio_cell(row['short_rate/haproxy'])} | "
            f"{_ratio_cell(row['keepalive_rate/nftables'])} | "
            f"{_ratio_cell(row['keepalive_rate/haproxy'])} | "
            f"{_ratio_cell(row['bulk_gbps/nftables'])} | {_ratio_cell(row['bulk_gbps/haproxy'])} | "
            f"{_ratio_cell(row['pps_forwarded/nftables'])} |"
        )
    lines += ["", "Goals (reported, not asserted), lbctl XDP native against each peer:", "",
              "| goal | ratio | target | met |", "|---|---|---|---|"]
    for g in results.get("goals", []):
        target = "-" if not g["threshold"] else f">= {g['threshold']:.2f}x"
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        if g["caveat"]:
            met += f" ({g['caveat']})"
        lines.append(f"| {g['goal']} | {_ratio_cell(g['ratio'])} | {target} | {met} |")
    xdp_cost = [
        (s, results["setups"][s].get("xdp_cost")) for s in setups
        if results["setups"][s].get("xdp_cost")
    ]
    if xdp_cost:
        lines += ["", "The XDP program's own cost per packet:", "",
                  ("| setup | under real traffic (run-time stats, packet-rate load) | "
                   "BPF_PROG_TEST_RUN (UDP flow hit, median of 20k runs) |"), "|---|---|---|"]
        for s, cost in xdp_cost:
            live = cost.get("live_ns_per_packet")
            test = cost.get("test_run_ns_per_packet")
            lines.append(
                f"| {SETUP_TITLES[s]} | {'-' if live is None else f'{live:.0f} ns'} | "
                f"{'-' if test is None else f'{test:.0f} ns'} |")
    l7 = results.get("l7", {})
    lines += ["", f"lbctl L7 next to HAProxy `mode http`: {l7.get('note', 'not measured')}"]
    if plot_names:
        lines.append("")
        for name in plot_names:
            lines.append(f"![{name}]({name})")
    lines += ["", DOC_END]
    return "\n".join(lines) + "\n"


def update_doc(doc_text: str, block: str) -> str:
    """Replace the generated block in the document (or append one): prose around it stays."""
    start, end = doc_text.find(DOC_BEGIN), doc_text.find(DOC_END)
    if start != -1 and end != -1 and end > start:
        return doc_text[:start] + block.rstrip("\n") + doc_text[end + len(DOC_END):]
    return doc_text.rstrip("\n") + "\n\n" + block


# metric, file name, title, y label
PLOTS = (
    ("short_rate", "benchmarks-short.png",
     "Short connections (new TCP connection per HTTP request)", "connections/s"),
    ("keepalive_rate", "benchmarks-keepalive.png", "Keep-alive HTTP requests", "requests/s"),
    ("bulk_gbps", "benchmarks-bulk.png", "Bulk TCP (iperf3, one stream)", "Gbit/s"),
    ("pps_forwarded", "benchmarks-pps.png", "Packet rate: 60-byte UDP over 4096 flows",
     "packets forwarded/s"),
    ("pps_cpu_s_per_mpkt", "benchmarks-cpu.png",
     "Balancer CPU per million packets forwarded (lower is better)", "CPU-seconds / Mpkt"),
)


def plot_results(results: dict[str, Any], out_dir: Path) -> list[str]:
    """One PNG bar chart per metric (median, min-max whiskers); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    setups = [s for s in SETUPS if s in results["setups"]]
    colors = {"xdp-native": "#1f77b4", "xdp-generic": "#6baed6", "nftables": "#ff7f0e",
              "haproxy": "#2ca02c", "direct": "#7f7f7f"}
    for metric, name, title, ylabel in PLOTS:
        rows = [(s, results["setups"][s]["summary"][metric]) for s in setups]
        rows = [(s, m) for s, m in rows if m.get("median") is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
        xs = range(len(rows))
        meds = [m["median"] for _, m in rows]
        lo = [m["median"] - m["min"] for _, m in rows]
        hi = [m["max"] - m["median"] for _, m in rows]
        bars = ax.bar(xs, meds, yerr=[lo, hi], capsize=4,
                      color=[colors[s] for s, _ in rows])
        for bar, (s, _m) in zip(bars, rows):
            if metric == "pps_forwarded" and results["setups"][s]["summary"].get(
                    "pps_generator_bound"):
                bar.set_hatch("//")
        unit = "Gbit/s" if metric in ("bulk_gbps", "pps_cpu_s_per_mpkt") else ""
        # Labels sit above the whisker, where they cannot be crossed out by it.
        for x, med, (_s, m) in zip(xs, meds, rows):
            ax.annotate(_fmt_num(med, unit),
                        (x, m["max"]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([SETUP_TITLES[s].replace(" (", "\n(") for s, _ in rows], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _pos, unit=unit: _fmt_num(v, unit)))
        sub = f"{results['started'][:10]}, median of {results['repeats']}, whiskers min-max"
        if metric == "pps_forwarded":
            sub += "; hatched: generator-bound"
        ax.set_title(f"{title}\n{sub}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(top=max(m["max"] for _, m in rows) * 1.15)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        names.append(name)
    return names


# ---------------------------------------------------------------- BPF helpers (in namespaces)

# Packet generator: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES runs this program on
# frames the kernel builds from one template and sends what it returns XDP_TX for out of the
# interface given as ingress (here: the client's veth, so they arrive at the balancer).
# Live frames are recycled without being reset, and the balancer rewrites them in place
# (veth hands the page over), so every run writes the whole header back from the template.
GEN_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

/* A literal: bcc describes map value types to Python from their text, sizeof and all. */
#define GEN_HDR_LEN 42
_Static_assert(GEN_HDR_LEN == sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr),
               "template covers Ethernet, IPv4 without options and UDP");

struct gen_template { u8 bytes[GEN_HDR_LEN]; };
BPF_ARRAY(gen_template_map, struct gen_template, 1);
BPF_PERCPU_ARRAY(gen_seq, u32, 1);

int gen_udp(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    if (data + GEN_HDR_LEN > end)
        return XDP_ABORTED;
    u32 zero = 0;
    struct gen_template *t = gen_template_map.lookup(&zero);
    u32 *seq = gen_seq.lookup(&zero);
    if (!t || !seq)
        return XDP_ABORTED;
    __builtin_memcpy(data, t->bytes, GEN_HDR_LEN);
    u32 n = *seq + 1;
    *seq = n;
    /* One source port per flow; the UDP checksum is 0 (none), so nothing else changes. */
    struct udphdr *udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
    udp->source = bpf_htons(GEN_FLOW_BASE + n % GEN_FLOWS);
    return XDP_TX;
}
"""

# Sink on the switch side of the balancer's backend link: forwarded benchmark packets end
# there (counted by the interface), so the backends' own cost stays out of the figure.
SINK_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

int sink_udp(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end)
        return XDP_PASS;
    if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    return udp->dest == bpf_htons(SINK_PORT) ? XDP_DROP : XDP_PASS;
}
"""

_LIVE_REPEAT_MAX = 2**31 - 1  # the generator stops on a timer signal long before this


def build_udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, sport: int,
                    dport: int, payload: bytes = bytes(PPS_PAYLOAD_BYTES)) -> bytes:
    """An Ethernet/IPv4/UDP frame with a valid IP checksum and no UDP checksum (0)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def _mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _iface_mac(ifname: str) -> str:
    """The MAC of ifname in this process's network namespace (/sys may be another's)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        return str(ipr.link("get", ifname=ifname)[0].get("IFLA_ADDRESS"))


def _helper_gen(ifname: str, dst_mac: str, src_ip: str) -> None:
    """Long-lived generator in the client's namespace: 'run DST_IP DPORT SECONDS' lines."""
    from bcc import BPF  # type: ignore[import-not-found]

    from xdp import libbpf

    bpf = BPF(text=GEN_PROGRAM, cflags=[f"-DGEN_FLOWS={PPS_FLOWS}", "-DGEN_FLOW_BASE=1024"])
    fn = bpf.load_func(b"gen_udp", BPF.XDP)
    ifindex = socket.if_nametoindex(ifname)
    src_mac = _mac_bytes(_iface_mac(ifname))
    signal.signal(signal.SIGALRM, lambda *_: None)  # only to interrupt the test run
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        _, dst_ip, dport, seconds = cmd
        frame = build_udp_frame(_mac_bytes(dst_mac), src_mac, src_ip, dst_ip, 1024, int(dport))
        table = bpf[b"gen_template_map"]
        leaf = table.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), frame, ctypes.sizeof(leaf))
        table[ctypes.c_int(0)] = leaf
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, float(seconds))
        err = libbpf.prog_test_run_live(fn.fd, frame, ifindex, _LIVE_REPEAT_MAX)
        elapsed = time.monotonic() - t0
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"seconds": elapsed, "errno": err}), flush=True)


def _helper_sink(ifname: str) -> None:
    """Long-lived sink in the switch's namespace: 'attach' / 'detach' lines."""
    from bcc import BPF  # type: ignore[import-not-found]

    from xdp import libbpf

    bpf = BPF(text=SINK_PROGRAM, cflags=[f"-DSINK_PORT={PPS_PORT}"])
    fn = bpf.load_func(b"sink_udp", BPF.XDP)
    ifindex = socket.if_nametoindex(ifname)
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "attach":
                libbpf.xdp_attach(ifindex, fn.fd, libbpf.XDP_FLAGS_DRV_MODE)
            elif cmd == "detach":
                libbpf.xdp_detach(ifindex, libbpf.XDP_FLAGS_DRV_MODE)
            else:
                break
            print("ok", flush=True)
    finally:
        libbpf.xdp_detach(ifindex, libbpf.XDP_FLAGS_DRV_MODE)


def _helper_testrun(prog_pin: str, ifname: str, src_ip: str, dst_ip: str, dport: int) -> None:
    """The BPF_PROG_TEST_RUN figure of the pinned balancer program on a tracked UDP flow.

    One run per call: with repeat > 1 the kernel hands every repetition the buffer the last
    one rewrote, so after the first DNAT the program would only see a backend-bound packet
    and time its "not a VIP" pass. Each call's duration includes the kernel's two clock
    reads around the run.
    """
    from xdp import libbpf

    fd = libbpf.obj_get(prog_pin)
    try:
        ifindex = socket.if_nametoindex(ifname)
        mac = _mac_bytes(_iface_mac(ifname))
        frame = build_udp_frame(mac, b"\x02\x00\x00\x00\x00\x01", src_ip, dst_ip, 40000, dport)
        libbpf.prog_test_run(fd, frame, ingress_ifindex=ifindex)  # creates the flow
        durations: list[int] = []
        verdicts: dict[int, int] = {}
        for _ in range(TEST_RUN_CALLS):
            res = libbpf.prog_test_run(fd, frame, ingress_ifindex=ifindex)
            durations.append(res.duration_ns)
            verdicts[res.retval] = verdicts.get(res.retval, 0) + 1
        print(json.dumps({"ns_per_packet": statistics.median(durations),
                          "retval": max(verdicts, key=verdicts.__getitem__),
                          "verdicts": verdicts, "calls": TEST_RUN_CALLS}))
    finally:
        libbpf.close(fd)


# ---------------------------------------------------------------- the run

@dataclass(frozen=True)
class Durations:
    http_s: int
    bulk_s: int
    pps_s: int

    @classmethod
    def for_run(cls, quick: bool) -> Durations:
        return cls(http_s=3, bulk_s=3, pps_s=3) if quick else cls(http_s=6, bulk_s=5, pps_s=5)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[str]


@dataclass
class _State:
    """What the run has started, so cleanup can undo exactly that."""

    procs: list[_Proc] = field(default_factory=list)
    xdp_attached: bool = False
    haproxy: _Proc | None = None
    vip_on_lo: bool = False
    nft_table: bool = False
    stats_fd: int | None = None


class _Progress:
    def __init__(self, total_steps: int, console: Any) -> None:
        self.total = total_steps
        self.done = 0
        self.t0 = time.monotonic()
        self.console = console

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        self.console.print(
            f"[dim]{elapsed:6.0f}s[/] [bold][{self.done}/{self.total}][/] {text}",
            highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.console.print(f"[dim]{elapsed:6.0f}s[/]        {text}", highlight=False,
                           soft_wrap=True)


class PeerBench:
    """One benchmark run on its own lab (unique prefix); `close()` removes all it started."""

    def __init__(self, setups: list[str], repeats: int, quick: bool, console: Any,
                 prefix: str | None = None) -> None:
        self.setups = setups
        self.repeats = repeats
        self.quick = quick
        self.durations = Durations.for_run(quick)
        self.console = console
        self.lab = Lab(prefix or f"bn{os.urandom(3).hex()}")
        self.run_dir = RUN_ROOT / self.lab.prefix
        self.state = _State()
        self.gen: _Proc | None = None
        self.sink: _Proc | None = None
        self.vip = self.lab.vip
        self.backends = [b.addr for b in self.lab.backends]
        self.lb_client_if, self.lb_backend_if = self.lab.lb_ifaces
        self.sw_port = f"p-{self.lab.lb.name}"  # the switch's end of the balancer's link

    # ------------------------------------------------------------ plumbing

    def _ns(self, host: str) -> str:
        return self.lab.switch_netns if host == "sw" else self.lab.host(host).netns

    def _must(self, host: str, argv: list[str], timeout_s: float = 60.0) -> str:
        proc = self.lab.run(host, argv, timeout=timeout_s)
        if proc.returncode != 0:
            raise BenchError(f"in netns {self._ns(host)}: '{' '.join(argv)}' exited "
                             f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
        return proc.stdout

    def _lbctl(self, *args: str) -> str:
        argv = [sys.executable, "-m", "lbctl", "-n", self.lab.lb.netns, *args]
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=180,
                              cwd=REPO_ROOT, env=self._env())
        if proc.returncode != 0:
            raise BenchError(f"'lbctl {' '.join(args)}' failed: "
                             f"{(proc.stderr or proc.stdout).strip()[-400:]}")
        return proc.stdout

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
        return env

    def _spawn(self, name: str, host: str, argv: list[str], *, pipe: bool = False,
               keep_mounts: bool = False) -> _Proc:
        ns = self._ns(host)
        prefix = (["nsenter", f"--net={NETNS_DIR / ns}", "--"] if keep_mounts
                  else ["ip", "netns", "exec", ns])
        log = open(self.run_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        popen = subprocess.Popen(
            [*prefix, *argv], cwd=REPO_ROOT, env=self._env(), text=True,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else log, stderr=log, start_new_session=True,
        )
        log.close()
        proc = _Proc(name, popen)
        self.state.procs.append(proc)
        return proc

    def _stop(self, proc: _Proc | None, timeout_s: float = 5.0) -> None:
        if proc is None:
            return
        p = proc.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=timeout_s)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.state.procs:
            self.state.procs.remove(proc)

    def _helper(self, proc: _Proc, command: str | None, timeout_s: float) -> str:
        """Send one line to a helper (None: just read) and return its answer line."""
        p = proc.popen
        assert p.stdin is not None and p.stdout is not None
        if command is not None:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise BenchError(f"{proc.name} helper did not answer {command!r} in "
                                 f"{timeout_s:.0f} s; log: {self._log_tail(proc.name)}")
        line = p.stdout.readline()
        if not line:
            raise BenchError(f"{proc.name} helper exited (code {p.poll()}); "
                             f"log: {self._log_tail(proc.name)}")
        return line.strip()

    def _log_tail(self, name: str) -> str:
        try:
            return (self.run_dir / f"{name}.log").read_text()[-400:].strip() or "(empty)"
        except FileNotFoundError:
            return "(no log)"

    def _wait_port(self, host: str, addr: str, port: int, timeout_s: float = 10.0) -> None:
        code = (
            "import socket,sys,time\n"
            "d=time.monotonic()+float(sys.argv[3])\n"
            "while True:\n"
            "  try:\n"
            "    socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close();break\n"
            "  except OSError as e:\n"
            "    if time.monotonic()>d: print(e); sys.exit(1)\n"
            "    time.sleep(0.05)\n"
        )
        proc = self.lab.run(host, [sys.executable, "-I", "-S", "-c", code, addr, str(port),
                                   str(timeout_s)], timeout=timeout_s + 10)
        if proc.returncode != 0:
            raise BenchError(f"nothing answers on {addr}:{port} from {host}: "
                             f"{proc.stdout.strip()}")

    def _link_stats(self, host: str, ifname: str) -> dict[str, int]:
        from pyroute2 import IPRoute

        with IPRoute(netns=self._ns(host), flags=0) as ipr:
            s = ipr.link("get", ifname=ifname)[0].get("IFLA_STATS64")
            return {k: int(s[k]) for k in ("rx_packets", "tx_packets", "rx_dropped",
                                           "tx_dropped")}

    def _sysfs_write(self, host: str, path: str, value: str) -> None:
        # `ip netns exec` mounts the namespace's own /sys, where its interfaces are.
        self._must(host, ["sh", "-c", f"echo {value} > {path}"])

    # ------------------------------------------------------------ lab-wide set-up

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lab.up()
        client, lb = self.lab.client.name, self.lab.lb.name
        # Short connections use a source port each: wide range, and reuse TIME_WAIT ports.
        for host in (client, lb):
            self._must(host, ["sysctl", "-q", "-w",
                              "net.ipv4.ip_local_port_range=1024 65000",
                              "net.ipv4.tcp_tw_reuse=1"])
        (self.run_dir / "wrk.lua").write_text(WRK_LUA)
        for b in self.lab.backends:
            conf = self.run_dir / f"nginx-{b.name}.conf"
            conf.write_text(_nginx_conf(b.name, self.run_dir))
            self._spawn(f"nginx-{b.name}", b.name,
                        ["nginx", "-c", str(conf), "-p", str(self.run_dir),
                         "-e", str(self.run_dir / f"nginx-{b.name}.err")])
        first = self.lab.backends[0]
        self._spawn("iperf3", first.name, ["iperf3", "-s", "-p", str(BULK_PORT)])
        for b in self.lab.backends:
            self._wait_port(client, b.addr, NGINX_PORT)
        self._wait_port(client, first.addr, BULK_PORT)
        lb_mac = self._link_mac(lb, self.lb_client_if)
        self.gen = self._spawn("gen", client, [sys.executable, "-m", "lbctl.bench_peers",
                                               "_helper", "gen", self.lab.client.ifname, lb_mac,
                                               self.lab.client.addr],
                               pipe=True, keep_mounts=True)
        self.sink = self._spawn("sink", "sw", [sys.executable, "-m", "lbctl.bench_peers",
                                               "_helper", "sink", self.sw_port],
                                pipe=True, keep_mounts=True)
        for helper in (self.gen, self.sink):
            answer = self._helper(helper, None, 120)
            if answer != "ready":
                raise BenchError(f"{helper.name} helper said {answer!r}")

    def _link_mac(self, host: str, ifname: str) -> str:
        from pyroute2 import IPRoute

        with IPRoute(netns=self._ns(host), flags=0) as ipr:
            return str(ipr.link("get", ifname=ifname)[0].get("IFLA_ADDRESS"))

    # ------------------------------------------------------------ setups

    def setup(self, name: str) -> None:
        if name in ("xdp-native", "xdp-generic"):
            mode = name.split("-")[1]
            self._lbctl("attach", self.lb_client_if, self.lb_backend_if, "--mode", mode)
            self.state.xdp_attached = True
            http_vip = f"{self.vip}:{HTTP_VIP_PORT}"
            bulk_vip = f"{self.vip}:{BULK_PORT}"
            pps_vip = f"{self.vip}:{PPS_PORT}"
            self._lbctl("vip", "add", http_vip)
            self._lbctl("vip", "add", bulk_vip)
            self._lbctl("vip", "add", pps_vip, "--proto", "udp")
            for addr in self.backends:
                self._lbctl("backend", "add", http_vip, f"{addr}:{NGINX_PORT}")
                self._lbctl("backend", "add", pps_vip, f"{addr}:{PPS_PORT}", "--proto", "udp")
            # iperf3's control and data connections must meet the same server: one backend.
            self._lbctl("backend", "add", bulk_vip, f"{self.backends[0]}:{BULK_PORT}")
        elif name == "nftables":
            # TIME_WAIT entries would otherwise fill the conntrack table over the short runs.
            self._must("lb", ["sysctl", "-q", "-w",
                              "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10"])
            self.state.nft_table = True
            self._must("lb", ["nft", "-f", str(self._write_nft())])
        elif name == "haproxy":
            self._must("lb", ["ip", "addr", "add", f"{self.vip}/32", "dev", "lo"])
            self.state.vip_on_lo = True
            conf = self.run_dir / "haproxy.cfg"
            conf.write_text(_haproxy_conf(self.vip, self.backends))
            self.state.haproxy = self._spawn("haproxy", "lb", ["haproxy", "-db", "-f", str(conf)])
            self._wait_port("client", self.vip, HTTP_VIP_PORT)
            self._wait_port("client", self.vip, BULK_PORT)
        elif name != "direct":
            raise BenchError(f"unknown setup {name!r}")
        if name != "direct":
            # The balancer's first packets resolve its neighbours; do it outside the timing.
            self.lab.http_get(self.vip, HTTP_VIP_PORT, count=3)

    def teardown(self, name: str) -> None:
        if self.state.xdp_attached:
            self._lbctl("detach", "--all", "--purge")
            self.state.xdp_attached = False
        if self.state.nft_table:
            self.lab.run("lb", ["nft", "delete", "table", "ip", "lbbench"])
            self.state.nft_table = False
        if self.state.haproxy is not None:
            self._stop(self.state.haproxy)
            self.state.haproxy = None
        if self.state.vip_on_lo:
            self.lab.run("lb", ["ip", "addr", "del", f"{self.vip}/32", "dev", "lo"])
            self.state.vip_on_lo = False

    def _write_nft(self) -> Path:
        path = self.run_dir / "lbbench.nft"
        path.write_text(_nft_ruleset(self.vip, self.backends))
        return path

    # ------------------------------------------------------------ workloads

    def run_wrk(self, setup: str, close: bool) -> dict[str, Any]:
        env = dict(os.environ)
        if setup == "direct":
            url = f"http://{self.backends[0]}:{NGINX_PORT}/"
            env["BENCH_WRK_ADDRS"] = ",".join(f"{a}:{NGINX_PORT}" for a in self.backends)
        else:
            url = f"http://{self.vip}:{HTTP_VIP_PORT}/"
            env.pop("BENCH_WRK_ADDRS", None)
        argv = ["ip", "netns", "exec", self.lab.client.netns, "wrk", f"-t{WRK_THREADS}",
                f"-c{WRK_CONNECTIONS}", f"-d{self.durations.http_s}s", "--latency",
                "-s", str(self.run_dir / "wrk.lua")]
        if close:
            argv += ["-H", "Connection: close"]
        proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env=env)
        try:
            out, _ = proc.communicate(timeout=self.durations.http_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        try:
            res = parse_wrk(out)
        except BenchError as exc:
            return {"ok": False, "error": str(exc)}
        ok = res.requests > 0 and res.error_share <= MAX_ERROR_SHARE
        rec = {"ok": ok, "rate": res.rate, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
               "requests": res.requests, "errors": res.errors, "seconds": res.duration_s,
               "url": url, "spread_over": env.get("BENCH_WRK_ADDRS", "")}
        if not ok:
            rec["error"] = f"{res.errors} errors for {res.requests} requests"
        return rec

    def run_bulk(self, setup: str) -> dict[str, Any]:
        target = self.backends[0] if setup == "direct" else self.vip
        proc = self.lab.run("client", ["iperf3", "-c", target, "-p", str(BULK_PORT),
                                       "-t", str(self.durations.bulk_s), "-J"],
                            timeout=self.durations.bulk_s + 60)
        try:
            res = parse_iperf3(proc.stdout)
        except BenchError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "gbps": res["bits_per_second"] / 1e9, **res}

    @contextlib.contextmanager
    def pps_path(self) -> Iterator[int | None]:
        """Set the path up for the packet-rate run; yield the balancer's NAPI thread pid.

        GRO on the balancer's client-side veth gives it a NAPI context even with no XDP
        program (the generator's XDP_TX frames need one to be accepted), and threaded NAPI
        moves that context into a kernel thread: the balancer then runs beside the
        generator instead of inside its system call, and its CPU time can be read.
        """
        assert self.sink is not None
        path = f"/sys/class/net/{self.lb_client_if}/threaded"
        self._must("lb", ["ethtool", "-K", self.lb_client_if, "gro", "on"])
        before = _napi_threads(self.lb_client_if)
        self._sysfs_write("lb", path, "1")
        new = _napi_threads(self.lb_client_if) - before
        napi_pid = next(iter(new)) if len(new) == 1 else None
        self._helper(self.sink, "attach", 30)
        try:
            yield napi_pid
        finally:
            self._helper(self.sink, "detach", 30)
            self.lab.run("lb", ["sh", "-c", f"echo 0 > {path}"])
            self.lab.run("lb", ["ethtool", "-K", self.lb_client_if, "gro", "off"])

    def run_pps(self, setup: str, napi_pid: int | None) -> dict[str, Any]:
        assert self.gen is not None
        dst = self.backends[0] if setup == "direct" else self.vip
        client_if, sw = self.lab.client.ifname, "sw"
        c0 = self._link_stats("client", client_if)
        f0 = self._link_stats(sw, self.sw_port)
        cpu0 = _thread_cpu_s(napi_pid) if napi_pid else None
        answer = json.loads(self._helper(
            self.gen, f"run {dst} {PPS_PORT} {self.durations.pps_s}",
            self.durations.pps_s + 60))
        cpu1 = _thread_cpu_s(napi_pid) if napi_pid else None
        c1 = self._link_stats("client", client_if)
        f1 = self._link_stats(sw, self.sw_port)
        # The client's veth counts what the peer accepted as tx and what its full ring
        # refused as tx_dropped: together, everything the generator sent.
        sent = (c1["tx_packets"] - c0["tx_packets"]) + (c1["tx_dropped"] - c0["tx_dropped"])
        verdict = PpsVerdict(
            sent=sent, forwarded=f1["rx_packets"] - f0["rx_packets"],
            seconds=float(answer["seconds"]),
            balancer_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        )
        ok = verdict.sent > 0 and verdict.forwarded > 0
        rec = {"ok": ok, **verdict.as_dict()}
        if not ok:
            rec["error"] = f"nothing forwarded (sent {verdict.sent}; errno {answer['errno']})"
        return rec

    def xdp_cost(self, napi_pid: int | None) -> dict[str, Any]:
        """Run-time statistics of the attached program under one packet-rate load, and its
        BPF_PROG_TEST_RUN figure."""
        from xdp import libbpf

        pin = BPF_PIN_ROOT / self.lab.lb.netns / "prog"
        out: dict[str, Any] = {}
        fd = libbpf.obj_get(str(pin))
        try:
            self.state.stats_fd = libbpf.enable_run_time_stats()
            try:
                i0 = libbpf.prog_info(fd)
                rec = self.run_pps("xdp", napi_pid)
                i1 = libbpf.prog_info(fd)
            finally:
                os.close(self.state.stats_fd)
                self.state.stats_fd = None
            runs = i1.run_cnt - i0.run_cnt
            out["live_runs"] = runs
            out["live_ns_per_packet"] = (i1.run_time_ns - i0.run_time_ns) / runs if runs else None
            out["live_forwarded_pps_with_stats"] = rec.get("forwarded_pps")
        finally:
            libbpf.close(fd)
        proc = self.lab.run("lb", [sys.executable, "-m", "lbctl.bench_peers", "_helper",
                                   "testrun", str(pin), self.lb_client_if,
                                   self.lab.client.addr, self.vip, str(PPS_PORT)],
                            keep_mounts=True, timeout=120, cwd=REPO_ROOT, env=self._env())
        if proc.returncode == 0:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            out["test_run_ns_per_packet"] = data["ns_per_packet"]
            out["test_run_retval"] = data["retval"]
            out["test_run_verdicts"] = data["verdicts"]
            if data["retval"] not in (3, 4):  # XDP_TX, XDP_REDIRECT: the forwarding path
                out["test_run_error"] = f"verdict {data['retval']}, not a forward"
                out["test_run_ns_per_packet"] = None
        else:
            out["test_run_error"] = (proc.stderr or proc.stdout).strip()[-300:]
        return out

    # ------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Undo everything, in any state, ignoring only what is already gone."""
        errors = []
        if self.state.stats_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.state.stats_fd)
            self.state.stats_fd = None
        for helper in (self.gen, self.sink):
            if helper is not None and helper.popen.poll() is None:
                with contextlib.suppress(OSError, subprocess.SubprocessError, AssertionError):
                    assert helper.popen.stdin is not None
                    helper.popen.stdin.write("quit\n")
                    helper.popen.stdin.flush()
                    helper.popen.wait(timeout=5)
        for proc in list(self.state.procs):
            try:
                self._stop(proc)
            except (OSError, subprocess.SubprocessError) as exc:  # keep cleaning; report later
                errors.append(f"{proc.name}: {exc}")
        if self.state.xdp_attached and (NETNS_DIR / self.lab.lb.netns).exists():
            try:
                self._lbctl("detach", "--all", "--purge")
            except (LbctlError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"detach: {exc}")
        try:
            self.lab.down()  # namespaces (and with them nft tables, addresses), pins
        except (LabError, OSError) as exc:
            errors.append(f"lab down: {exc}")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise BenchError("cleanup incomplete: " + "; ".join(errors))


def _napi_threads(ifname: str) -> set[int]:
    """Pids of the kernel's threaded-NAPI threads for interfaces named ifname (any netns)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(f"napi/{ifname}-"):
            pids.add(int(entry))
    return pids


def _thread_cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of the whole line (11, 12 after the state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nginx_conf(name: str, run_dir: Path) -> str:
    return f"""# nginx for backend {name} of the lbctl benchmark lab
daemon off;
worker_processes 1;
pid {run_dir}/nginx-{name}.pid;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {run_dir}/nginx-{name}-tmp;
    proxy_temp_path {run_dir}/nginx-{name}-tmp;
    fastcgi_temp_path {run_dir}/nginx-{name}-tmp;
    uwsgi_temp_path {run_dir}/nginx-{name}-tmp;
    scgi_temp_path {run_dir}/nginx-{name}-tmp;
    server {{
        listen {NGINX_PORT} reuseport backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


def _haproxy_conf(vip: str, backends: Sequence[str]) -> str:
    servers = "\n".join(f"    server be{i + 1} {a}:{NGINX_PORT}" for i, a in enumerate(backends))
    return f"""# HAProxy mode tcp for the lbctl benchmark lab
global
    maxconn 8000
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind {vip}:{HTTP_VIP_PORT}
    default_backend web
backend web
    balance roundrobin
{servers}
listen bulk
    bind {vip}:{BULK_PORT}
    server be1 {backends[0]}:{BULK_PORT}
"""


def _nft_ruleset(vip: str, backends: Sequence[str]) -> str:
    http_map = ", ".join(f"{i} : {a} . {NGINX_PORT}" for i, a in enumerate(backends))
    udp_map = ", ".join(f"{i} : {a}" for i, a in enumerate(backends))
    n = len(backends)
    return f"""# nftables DNAT for the lbctl benchmark lab: conntrack un-NATs the replies
table ip lbbench {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {vip} tcp dport {HTTP_VIP_PORT} dnat ip to numgen inc mod {n} map {{ {http_map} }}
        ip daddr {vip} tcp dport {BULK_PORT} dnat ip to {backends[0]}:{BULK_PORT}
        ip daddr {vip} udp dport {PPS_PORT} dnat ip to numgen inc mod {n} map {{ {udp_map} }}
    }}
}}
"""


def _tool_versions() -> dict[str, str]:
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


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup in `finally` runs."""
    main_pid = os.getpid()

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            # A forked child (pyroute2 forks one per namespace) must die as it would have,
            # not unwind our stack into a second cleanup that deletes the lab under us.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_bench(repeats: int = 3, quick: bool = False, only: list[str] | None = None, *,
              write_doc: bool | None = None, console: Any = None) -> dict[str, Any]:
    """Measure every setup on every workload, `repeats` rounds (1 when quick), and record it.

    Writes bench/results/<timestamp>.json; a complete full run (not quick, every setup, no
    failed run) also renders docs/benchmarks.md's generated block and the
    docs/benchmarks-*.png plots (write_doc=False prevents that). Refuses to start when a
    tool is missing; cleans up whatever happens, Ctrl-C and SIGTERM included.
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (namespaces, XDP, nftables); hint: sudo")
    setups = resolve_setups(only)
    check_tools(setups)
    repeats = 1 if quick else max(1, repeats)
    if write_doc is None:
        write_doc = not quick and setups == list(SETUPS)
    xdp_setups = [s for s in setups if s.startswith("xdp-")]
    per_round = sum(4 if s != "haproxy" else 3 for s in setups)
    progress = _Progress(repeats * per_round + len(xdp_setups) + 2, console)

    started = dt.datetime.now(dt.timezone.utc)
    results: dict[str, Any] = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "quick": quick,
        "repeats": repeats,
        "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                 "loadavg_before": list(os.getloadavg()), "tools": _tool_versions()},
        "config": {"wrk_threads": WRK_THREADS, "wrk_connections": WRK_CONNECTIONS,
                   "pps_flows": PPS_FLOWS, "pps_frame_bytes": 42 + PPS_PAYLOAD_BYTES,
                   "generator_bound_share": GENERATOR_BOUND_SHARE,
                   **asdict(Durations.for_run(quick))},
        "setups": {s: {"title": SETUP_TITLES[s], "runs": {w: [] for w in WORKLOADS}}
                   for s in setups},
        "l7": {"status": "not implemented",
               "note": "not measured: lbctl has no L7 proxy yet, so there is nothing to set "
                       "beside HAProxy `mode http`."},
    }
    bench = PeerBench(setups, repeats, quick, console)
    interrupted = False
    with _signals_raise_interrupt():
        try:
            console.print(f"[bold]lbctl bench peers[/]: {', '.join(setups)}; {repeats} round(s); "
                          f"lab prefix {bench.lab.prefix}")
            bench.prepare()
            progress.step(f"lab {bench.lab.prefix} up: nginx on 3 backends, iperf3 on "
                          f"{bench.lab.backends[0].name}, generator and sink loaded")
            for rnd in range(1, repeats + 1):
                for setup in setups:
                    _measure_setup(bench, setup, rnd, results, progress)
            for setup in xdp_setups:
                bench.setup(setup)
                try:
                    with bench.pps_path() as napi_pid:
                        cost = bench.xdp_cost(napi_pid)
                finally:
                    bench.teardown(setup)
                results["setups"][setup]["xdp_cost"] = cost
                live, test = cost.get("live_ns_per_packet"), cost.get("test_run_ns_per_packet")
                progress.step(
                    f"{SETUP_TITLES[setup]}: program cost "
                    f"{'-' if live is None else f'{live:.0f}'} ns/packet under load "
                    f"(run-time stats), {'-' if test is None else test} ns in BPF_PROG_TEST_RUN")
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted: cleaning up[/]")
            raise
        finally:
            # A second Ctrl-C must not cut the cleanup short.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                bench.close()
            finally:
                signal.signal(signal.SIGINT, previous)
                if not interrupted:
                    progress.step("cleaned up: lab, processes, XDP, nft tables removed")

    for setup in setups:
        results["setups"][setup]["summary"] = summarize_setup(results["setups"][setup]["runs"])
    summary = {s: results["setups"][s]["summary"] for s in setups}
    results["ratios"] = ratio_table(summary, setups)
    results["goals"] = evaluate_goals(summary) if "xdp-native" in setups else []
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["host"]["loadavg_after"] = list(os.getloadavg())
    failed = [(s, w) for s in setups for w in WORKLOADS
              for r in results["setups"][s]["runs"][w] if not r.get("ok")]
    results["complete"] = not failed
    results["failed_runs"] = [f"{s}/{w}" for s, w in failed]

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "") + ".json"
    results["file"] = name
    (RESULTS_DIR / name).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    console.print(f"results: {RESULTS_DIR / name}")
    if write_doc and failed:
        console.print(f"[yellow]{DOC_PATH} left as it was: the run is incomplete[/]")
    elif write_doc:
        plots = write_docs(results)
        console.print(f"updated {DOC_PATH} and {len(plots)} plot(s)")
    _print_summary(results, console)
    if failed:
        console.print(f"[red]incomplete: {len(failed)} run(s) failed: "
                      f"{', '.join(results['failed_runs'])}[/]")
    return results


def write_docs(results: dict[str, Any], doc_path: Path = DOC_PATH) -> list[str]:
    """Draw the plots beside doc_path and replace its generated block; returns plot names."""
    plots = plot_results(results, doc_path.parent)
    block = render_markdown(results, plots)
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    doc_path.write_text(update_doc(doc, block))
    return plots


def _measure_setup(bench: PeerBench, setup: str, rnd: int, results: dict[str, Any],
                   progress: _Progress) -> None:
    runs = results["setups"][setup]["runs"]
    title = f"round {rnd}/{bench.repeats} {SETUP_TITLES[setup]}"
    bench.setup(setup)
    try:
        rec = bench.run_wrk(setup, close=True)
        runs["short"].append(rec)
        progress.step(f"{title}: short connections " + _describe_http(rec, "conn/s"))
        rec = bench.run_wrk(setup, close=False)
        runs["keepalive"].append(rec)
        progress.step(f"{title}: keep-alive " + _describe_http(rec, "req/s"))
        rec = bench.run_bulk(setup)
        runs["bulk"].append(rec)
        progress.step(f"{title}: bulk " + (f"{rec['gbps']:.2f} Gbit/s" if rec["ok"]
                                           else f"[red]failed[/]: {rec['error']}"))
        if setup != "haproxy":  # HAProxy balances no UDP
            with bench.pps_path() as napi_pid:
                rec = bench.run_pps(setup, napi_pid)
            runs["pps"].append(rec)
            if rec["ok"]:
                text = (f"{rec['forwarded_pps'] / 1e3:.0f} kpps forwarded of "
                        f"{rec['sent_pps'] / 1e3:.0f} kpps sent ({rec['drop_share']:.0%} dropped)")
                if rec["generator_bound"]:
                    text += " [yellow]generator-bound[/]"
                if rec["cpu_s_per_mpkt"] is not None:
                    text += f", {rec['cpu_s_per_mpkt']:.2f} CPU-s/Mpkt"
            else:
                text = f"[red]failed[/]: {rec['error']}"
            progress.step(f"{title}: packet rate {text}")
    finally:
        bench.teardown(setup)


def _describe_http(rec: dict[str, Any], unit: str) -> str:
    if not rec.get("ok") and "rate" not in rec:
        return f"[red]failed[/]: {rec.get('error')}"
    text = f"{rec['rate']:,.0f} {unit}, p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms"
    if not rec["ok"]:
        text += f" [red]({rec['error']})[/]"
    return text


def _print_summary(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=None)
    for col in ("setup", "short conn/s", "keep-alive req/s", "bulk Gbit/s", "fwd pkt/s"):
        table.add_column(col, justify="right" if col != "setup" else "left")
    for setup, data in results["setups"].items():
        s = data["summary"]
        pps = _cell(s["pps_forwarded"]) + (" gen-bound" if s.get("pps_generator_bound") else "")
        table.add_row(SETUP_TITLES[setup], _cell(s["short_rate"]), _cell(s["keepalive_rate"]),
                      _cell(s["bulk_gbps"], "Gbit/s"), pps)
    console.print(table)
    for g in results.get("goals", []):
        met = {True: "[green]met[/]", False: "[red]missed[/]", None: "reported"}[g["met"]]
        if g["ratio"] is None:
            met = "not measured"
        console.print(f"  {g['goal']}: {_ratio_cell(g['ratio'])} {met}"
                      + (f" ({g['caveat']})" if g["caveat"] else ""))


# ---------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lbctl.bench_peers [--repeats N] [--quick] [--only a,b]`, until the CLI has
    `lbctl bench peers`; `_helper ...` runs the in-namespace helpers."""
    import argparse

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_helper"]:
        kind, rest = args[1], args[2:]
        if kind == "gen":
            _helper_gen(rest[0], rest[1], rest[2])
        elif kind == "sink":
            _helper_sink(rest[0])
        elif kind == "testrun":
            _helper_testrun(rest[0], rest[1], rest[2], rest[3], int(rest[4]))
        else:
            raise SystemExit(f"unknown helper {kind!r}")
        return 0
    parser = argparse.ArgumentParser(prog="python -m lbctl.bench_peers",
                                     description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, shorter runs")
    parser.add_argument("--only", default="", help=f"comma list of: {', '.join(SETUPS)}")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only redraw docs/benchmarks.md and its plots from a record")
    ns = parser.parse_args(args)
    if ns.render:
        plots = write_docs(json.loads(Path(ns.render).read_text()))
        print(f"updated {DOC_PATH} and {len(plots)} plot(s)")
        return 0
    only = [s for s in ns.only.split(",") if s] or None
    try:
        results = run_bench(ns.repeats, ns.quick, only, write_doc=False if ns.no_doc else None)
    except LbctlError as exc:
        print(f"lbctl bench peers: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
    return 0 if results["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
