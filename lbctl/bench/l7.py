"""`lbctl bench l7`: the L7 proxy (run by `lbctl agent` for a mode: l7 VIP) against HAProxy
`mode http` with the same nginx backends and the same wrk client, in alternating rounds on one
namespace lab: keep-alive and new-connection requests/s, p50/p99 latency and the balancer's CPU
per request; requests/s with the upstream pool on and off; keep-alive through a minimal proxy
on the same stack (lbctl.bench.l7_reference: what the features cost, apart from the stack);
time to first byte of the first requests after a start with `warmup: eager` and `lazy`. A JSON
record, a plot, a page block."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbctl.bench.configs import nginx_conf
from lbctl.bench.errors import BenchError
from lbctl.bench.parsers import WRK_LUA, parse_wrk, summarize
from lbctl.bench.runner import (
    PeerBench,
    _Proc,
    _Progress,
    _thread_cpu_s,
    check_outputs,
    host_record,
    rounds_then_cleanup,
    write_record,
)
from lbctl.bench.spec import MAX_ERROR_SHARE, NGINX_PORT
from lbctl.bench.tools import check_tools

# Ports on the VIP address, in the balancer's namespace.
L7_PORT = 80            # the L7 proxy, a default VIP (pool on, lazy)
HAPROXY_PORT = 81       # HAProxy mode http
L7_NOPOOL_PORT = 82     # the L7 proxy with pool.enabled: false (a new upstream connection a request)
REFERENCE_PORT = 83     # lbctl.bench.l7_reference: the same stack with no features (keep-alive only)
METRICS_PORT = 9810     # the agent's, inside the balancer's namespace
# The client the issue measured its figures with: two threads, 64 keep-alive connections.
WRK_THREADS = 2
WRK_CONNECTIONS = 64
# The first requests after a start: one alone, then a burst on this many new connections.
TTFB_BURST = 64
EAGER_MIN_IDLE = 16      # per backend per worker: more than a burst's share of one worker

# Which setup answers on which port; titles for tables and plots.
SETUPS = {"haproxy": HAPROXY_PORT, "l7": L7_PORT, "l7-nopool": L7_NOPOOL_PORT,
          "reference": REFERENCE_PORT}
TITLES = {"haproxy": "HAProxy mode http", "l7": "lbctl L7 (agent, default VIP)",
          "l7-nopool": "lbctl L7, pool off",
          "reference": "minimal proxy (reference, no features)"}
GOAL_RATIO = 0.9


def haproxy_http_conf(backends: Sequence[str]) -> str:
    """HAProxy mode http doing what the L7 proxy's default VIP does: keep-alive both sides,
    round robin per request, X-Forwarded-For, X-Forwarded-Proto and Forwarded added (2.6 has
    no `option forwarded`: the header is written by hand), the same timeouts."""
    servers = "\n".join(f"    server be{i + 1} {a}:{NGINX_PORT}" for i, a in enumerate(backends))
    return f"""# HAProxy mode http for the lbctl L7 benchmark
global
    maxconn 8000
    nbthread 2
defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 2s
    timeout client 60s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 60s
frontend web
    bind 0.0.0.0:{HAPROXY_PORT}
    http-request set-header X-Forwarded-Proto http
    http-request add-header Forwarded "for=%[src];proto=http;host=%[req.hdr(host)]"
    default_backend web
backend web
    balance roundrobin
{servers}
"""


def agent_conf(vip: str, backends: Sequence[str], *, warmup: str | None = None,
               nopool_vip: bool = True) -> str:
    """The agent's file: a default mode: l7 VIP (every limit, header rule and counter on) and,
    for the pool comparison, the same VIP on another port with the pool off. With warmup,
    only the first VIP, its pool eager (min_idle EAGER_MIN_IDLE) or lazy."""
    members = "".join(f"      - {{addr: {a}:{NGINX_PORT}}}\n" for a in backends)
    out = f"# lbctl agent file for the L7 benchmark\ninterfaces: []\nvips:\n" \
          f"  - vip: {vip}:{L7_PORT}\n    mode: l7\n"
    if warmup == "eager":
        out += f"    l7: {{pool: {{warmup: eager, min_idle: {EAGER_MIN_IDLE}}}}}\n"
    elif warmup == "lazy":
        out += "    l7: {pool: {warmup: lazy}}\n"
    out += "    backends:\n" + members
    if nopool_vip and warmup is None:
        out += f"  - vip: {vip}:{L7_NOPOOL_PORT}\n    mode: l7\n" \
               "    l7: {pool: {enabled: false}}\n    backends:\n" + members
    return out


# Run in the client's namespace: right after a start, one request alone, then TTFB_BURST new
# connections each sending one request at the same moment, then the same connections again
# (warm). Time to first byte of each, microseconds, one JSON line.
_TTFB_CLIENT = r"""
import json, selectors, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REQ = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: lbctl-bench\r\n\r\n"

def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed mid-response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError("status: %r" % head[:40])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed mid-body")
        body += chunk

def burst(socks):
    sel = selectors.DefaultSelector()
    t0 = {}
    for s in socks:
        t0[s] = time.perf_counter()
        s.sendall(REQ)
        sel.register(s, selectors.EVENT_READ)
    out = []
    deadline = time.monotonic() + 30
    while len(out) < len(socks):
        if time.monotonic() > deadline:
            raise OSError("no answer in 30 s")
        for key, _ in sel.select(1):
            out.append((time.perf_counter() - t0[key.fileobj]) * 1e6)
            sel.unregister(key.fileobj)
    for s in socks:
        read_response(s)
    return out

one = socket.create_connection((host, port), timeout=10)
first = burst([one])[0]
socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
cold = burst(socks)
warm = burst(socks)
print(json.dumps({"first_us": first, "burst_us": cold, "warm_us": warm}))
"""


@dataclass
class Agent:
    proc: _Proc
    log: Path


class L7Bench(PeerBench):
    """The peer bench's lab and process handling, with nginx backends, HAProxy mode http and
    `lbctl agent` serving mode: l7 VIPs instead of the L4 setups."""

    def __init__(self, repeats: int, quick: bool, console: Any, prefix: str | None = None):
        super().__init__(["haproxy"], repeats, quick, console,
                         prefix or f"b7{os.urandom(3).hex()}")
        self.agent: Agent | None = None
        self.haproxy: _Proc | None = None
        self.reference: _Proc | None = None

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lab.up()
        for host in (self.lab.client.name, self.lab.lb.name):
            self._must(host, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000",
                              "net.ipv4.tcp_tw_reuse=1"])
        (self.run_dir / "wrk.lua").write_text(WRK_LUA)
        for b in self.lab.backends:
            conf = self.run_dir / f"nginx-{b.name}.conf"
            conf.write_text(nginx_conf(b.name, self.run_dir))
            self._spawn(f"nginx-{b.name}", b.name,
                        ["nginx", "-c", str(conf), "-p", str(self.run_dir),
                         "-e", str(self.run_dir / f"nginx-{b.name}.err")])
        for b in self.lab.backends:
            self._wait_port(self.lab.client.name, b.addr, NGINX_PORT)
        conf = self.run_dir / "haproxy.cfg"
        conf.write_text(haproxy_http_conf(self.backends))
        self.haproxy = self._spawn("haproxy", "lb", ["haproxy", "-db", "-f", str(conf)])
        self.reference = self._spawn(
            "reference", "lb", [sys.executable, "-m", "lbctl.bench.l7_reference",
                                str(REFERENCE_PORT), ",".join(f"{a}:{NGINX_PORT}" for a in self.backends),
                                "--workers", str(os.cpu_count() or 1)])

    # ------------------------------------------------------------ the agent

    def start_agent(self, warmup: str | None = None) -> Agent:
        """`lbctl -n <lb> agent -f FILE`, as a user starts it; returns once the VIP answers
        TCP (its address is on lo and a worker listens), before any request went through."""
        name = f"agent-{warmup or 'default'}"
        conf = self.run_dir / f"{name}.yaml"
        conf.write_text(agent_conf(self.vip, self.backends, warmup=warmup))
        proc = self._spawn(name, "lb", [sys.executable, "-m", "lbctl", "-n", self.lab.lb.netns,
                                        "agent", "-f", str(conf), "--metrics-addr",
                                        f"127.0.0.1:{METRICS_PORT}"], keep_mounts=True)
        agent = Agent(proc, self.run_dir / f"{name}.log")
        self.agent = agent
        deadline = time.monotonic() + 120
        while "metrics on http://" not in self._log_tail_all(name):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the agent did not start: {self._log_tail(name)}")
            time.sleep(0.05)
        self._wait_port(self.lab.client.name, self.vip, L7_PORT)
        return agent

    def _log_tail_all(self, name: str) -> str:
        try:
            return (self.run_dir / f"{name}.log").read_text()
        except FileNotFoundError:
            return ""

    def stop_agent(self) -> None:
        if self.agent is not None:
            # SIGTERM to the agent alone: it stops its workers (they drain) and takes the VIP
            # address off lo, as under systemd.
            p = self.agent.proc.popen
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            self._stop(self.agent.proc)
            self.agent = None

    def workers(self) -> list[int]:
        """The agent's worker processes (its children running lbctl.l7.worker)."""
        if self.agent is None:
            return []
        return self._children(self.agent.proc.popen.pid, b"lbctl.l7.worker")

    def _children(self, parent: int, marker: bytes) -> list[int]:
        """Processes whose parent is `parent` and whose command line holds `marker`."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                if ppid == parent and marker in cmd:
                    pids.append(int(entry))
        return sorted(pids)

    def proxy_cpu_s(self, setup: str) -> float | None:
        """CPU seconds the proxy under test has used: HAProxy's process, or every L7 worker."""
        if setup == "haproxy":
            pids = [self.haproxy.popen.pid] if self.haproxy is not None else []
        elif setup == "reference":
            # The first worker and the ones it forked.
            pids = [] if self.reference is None else [self.reference.popen.pid, *self._children(
                self.reference.popen.pid, b"lbctl.bench.l7_reference")]
        else:
            pids = self.workers()
        if not pids:
            return None
        total = 0.0
        for pid in pids:
            cpu = _thread_cpu_s(pid)
            if cpu is None:
                return None
            total += cpu
        return total

    def metrics(self) -> dict[str, float]:
        """The agent's L7 counters, summed over labels: name -> value."""
        code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())")
        out = self._must("lb", [sys.executable, "-I", "-S", "-c", code])
        totals: dict[str, float] = {}
        for line in out.splitlines():
            if line.startswith("lbctl_l7_") and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                with contextlib.suppress(ValueError):
                    totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return totals

    # ------------------------------------------------------------ workloads

    def wrk(self, setup: str, close: bool) -> dict[str, Any]:
        port = SETUPS[setup]
        url = f"http://{self.vip}:{port}/"
        argv = ["ip", "netns", "exec", self.lab.client.netns, "wrk", f"-t{WRK_THREADS}",
                f"-c{WRK_CONNECTIONS}", f"-d{self.durations.http_s}s", "--latency",
                "-s", str(self.run_dir / "wrk.lua")]
        if close:
            argv += ["-H", "Connection: close"]
        load0 = os.getloadavg()[0]
        cpu0 = self.proxy_cpu_s(setup)
        proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=self.durations.http_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        cpu1 = self.proxy_cpu_s(setup)
        try:
            res = parse_wrk(out)
        except BenchError as exc:
            return {"ok": False, "error": str(exc)}
        ok = res.requests > 0 and res.error_share <= MAX_ERROR_SHARE
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        rec = {"ok": ok, "rate": res.rate, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
               "requests": res.requests, "errors": res.errors, "seconds": res.duration_s,
               "url": url, "proxy_cpu_s": cpu, "loadavg1": load0,
               "cpu_ms_per_1k": cpu * 1e6 / res.requests if cpu and res.requests else None}
        if not ok:
            rec["error"] = f"{res.errors} errors for {res.requests} requests"
        return rec

    def ttfb(self) -> dict[str, Any]:
        proc = self.lab.run("client", [sys.executable, "-I", "-S", "-c", _TTFB_CLIENT, self.vip,
                                       str(L7_PORT), str(TTFB_BURST)], timeout=120)
        if proc.returncode != 0:
            return {"ok": False, "error": (proc.stderr or proc.stdout).strip()[-300:]}
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"ok": True, **data}

    def close(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.stop_agent()
        super().close()


# ---------------------------------------------------------------- the record


def _pct(values: Sequence[float], q: float) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, int(q * len(vals)))]


def summarize_l7(results: dict[str, Any]) -> dict[str, Any]:
    """Medians over the rounds per setup and workload, the ratios the goal is judged on, and
    the TTFB figures by warm-up mode (milliseconds)."""
    out: dict[str, Any] = {"setups": {}, "ratios": {}, "ttfb": {}}
    for setup, runs in results["runs"].items():
        s: dict[str, Any] = {}
        for workload in ("keepalive", "short"):
            ok = [r for r in runs.get(workload, []) if r.get("ok")]
            for key in ("rate", "p50_ms", "p99_ms", "cpu_ms_per_1k"):
                s[f"{workload}_{key}"] = summarize([r[key] for r in ok if r.get(key) is not None])
        out["setups"][setup] = s

    # Ratios per round (same round = same moment's load), then their median: the figure a
    # noisy machine distorts least.
    for metric in ("keepalive_rate", "short_rate", "keepalive_p99_ms", "keepalive_cpu_ms_per_1k"):
        workload, key = metric.split("_", 1)
        per_round = []
        for a, b in zip(results["runs"].get("l7", {}).get(workload, []),
                        results["runs"].get("haproxy", {}).get(workload, [])):
            if a.get("ok") and b.get("ok") and a.get(key) and b.get(key):
                per_round.append(a[key] / b[key])
        out["ratios"][f"l7/haproxy {metric}"] = summarize(per_round)
    # The reference proxy: how far the same stack without features is from HAProxy, and what
    # the L7 proxy's features cost against it (requests/s and CPU per request).
    for name, (num, den), metric in (("reference/haproxy", ("reference", "haproxy"), "rate"),
                                     ("l7/reference", ("l7", "reference"), "rate"),
                                     ("l7/reference", ("l7", "reference"), "cpu_ms_per_1k")):
        per_round = []
        for a, b in zip(results["runs"].get(num, {}).get("keepalive", []),
                        results["runs"].get(den, {}).get("keepalive", [])):
            if a.get("ok") and b.get("ok") and a.get(metric) and b.get(metric):
                per_round.append(a[metric] / b[metric])
        out["ratios"][f"{name} keepalive_{metric}"] = summarize(per_round)
    per_round = []
    for a, b in zip(results["runs"].get("l7-nopool", {}).get("keepalive", []),
                    results["runs"].get("l7", {}).get("keepalive", [])):
        if a.get("ok") and b.get("ok") and b.get("rate"):
            per_round.append(a["rate"] / b["rate"])
    out["ratios"]["pool off/on keepalive_rate"] = summarize(per_round)
    ka = out["ratios"]["l7/haproxy keepalive_rate"]["median"]
    out["goal"] = {"goal": f"L7 keep-alive requests/s >= {GOAL_RATIO}x HAProxy mode http",
                   "ratio": ka, "met": None if ka is None else ka >= GOAL_RATIO}
    for mode, samples in results.get("ttfb", {}).items():
        ok = [r for r in samples if r.get("ok")]
        out["ttfb"][mode] = {
            "first_ms": summarize([r["first_us"] / 1e3 for r in ok]),
            "burst_p50_ms": summarize([_pct(r["burst_us"], 0.5) / 1e3 for r in ok]),
            "burst_max_ms": summarize([max(r["burst_us"]) / 1e3 for r in ok]),
            "warm_p50_ms": summarize([_pct(r["warm_us"], 0.5) / 1e3 for r in ok]),
            "warm_max_ms": summarize([max(r["warm_us"]) / 1e3 for r in ok]),
        }
    return out


DOC_BEGIN = "<!-- bench-l7:begin (generated by lbctl bench l7; edits inside are overwritten) -->"
DOC_END = "<!-- bench-l7:end -->"
PLOT_NAME = "benchmarks-l7.png"


def _n(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render_markdown(results: dict[str, Any], plotted: bool) -> str:
    s = results["summary"]
    host = results["host"]
    lines = [DOC_BEGIN, "",
             (f"Run {results['started']} ({'quick, ' if results['quick'] else ''}"
             f"{results['repeats']} alternating round(s), {results['config']['http_s']} s per "
             f"wrk run, wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}); load average "
             f"{' '.join(f'{x:.2f}' for x in host['loadavg_before'])} before, "
             f"{' '.join(f'{x:.2f}' for x in host['loadavg_after'])} after; "
             f"{host['cpus']} CPUs shared by client, proxy and backends. Record: "
             f"`{results['file']}`."), "",
             ("| setup | keep-alive req/s | p50 ms | p99 ms | CPU-ms/1k req | new-connection req/s "
             "| p50 ms | p99 ms |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for setup in SETUPS:
        m = s["setups"].get(setup)
        if not m:
            continue

        def med(metric: str, digits: int = 0, m: dict[str, Any] = m) -> str:
            return _n(m[metric]["median"], digits)
        lines.append(f"| {TITLES[setup]} | {med('keepalive_rate')} | {med('keepalive_p50_ms', 2)} "
                     f"| {med('keepalive_p99_ms', 2)} | {med('keepalive_cpu_ms_per_1k', 1)} "
                     f"| {med('short_rate')} | {med('short_p50_ms', 2)} | {med('short_p99_ms', 2)} |")
    lines += ["", ("Medians over the rounds. Ratios are taken per round (the two ran seconds apart "
              "under the same load), then their median and range:"), ""]
    for name, r in s["ratios"].items():
        if r["n"]:
            lines.append(f"- {name}: **{r['median']:.2f}x** (rounds {', '.join(f'{v:.2f}' for v in r['values'])})")
    g = s["goal"]
    verdict = {True: "met", False: "missed", None: "not measured"}[g["met"]]
    lines += ["", f"Goal: {g['goal']}: {verdict}"
              + ("" if g["ratio"] is None else f" ({g['ratio']:.2f}x)") + "."]
    if s["ttfb"]:
        lines += ["", ("Time to first byte after the agent starts (median over restarts; "
                  f"first request alone, then {TTFB_BURST} new connections at once, then the same "
                  "connections again):"), "",
                  ("| pool warm-up | first request ms | burst p50 ms | burst max ms | warm p50 ms "
                  "| warm max ms |"), "|---|---:|---:|---:|---:|---:|"]
        for mode, t in s["ttfb"].items():
            lines.append(f"| {mode} | {_n(t['first_ms']['median'], 2)} "
                         f"| {_n(t['burst_p50_ms']['median'], 2)} | {_n(t['burst_max_ms']['median'], 2)} "
                         f"| {_n(t['warm_p50_ms']['median'], 2)} | {_n(t['warm_max_ms']['median'], 2)} |")
    if results.get("metrics"):
        m = results["metrics"]
        lines += ["", (f"The agent's counters over the run: {_n(m.get('lbctl_l7_requests_total'))} "
                  f"requests, {_n(m.get('lbctl_l7_upstream_connects_total'))} upstream connects, "
                  f"{_n(m.get('lbctl_l7_upstream_reuses_total'))} pooled reuses.")]
    if plotted:
        lines += ["", f"![L7 proxy against HAProxy mode http]({PLOT_NAME})"]
    lines += ["", DOC_END]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    setups = [x for x in SETUPS if x in s["setups"]]
    colors = {"haproxy": "#2ca02c", "l7": "#1f77b4", "l7-nopool": "#9ecae1", "reference": "#7f7f7f"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), dpi=100)
    panels = (("keepalive_rate", "keep-alive requests/s"), ("short_rate", "new-connection requests/s"),
              ("keepalive_p99_ms", "keep-alive p99 latency, ms (lower is better)"))
    for ax, (metric, title) in zip(axes, panels):
        rows = [(x, s["setups"][x][metric]) for x in setups if s["setups"][x][metric]["median"]]
        if not rows:
            ax.set_visible(False)
            continue
        meds = [m["median"] for _, m in rows]
        err = [[m["median"] - m["min"] for _, m in rows], [m["max"] - m["median"] for _, m in rows]]
        ax.bar(range(len(rows)), meds, yerr=err, capsize=4, color=[colors[x] for x, _ in rows])
        for i, (_x, m) in enumerate(rows):
            ax.annotate(f"{m['median']:,.0f}" if "rate" in metric else f"{m['median']:.2f}",
                        (i, m["max"]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([TITLES[x].replace(" (", "\n(").replace(", ", "\n") for x, _ in rows],
                           fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[3]
    modes = list(s["ttfb"])
    if modes:
        keys = (("first_ms", "first request"), ("burst_p50_ms", "burst p50"),
                ("burst_max_ms", "burst max"))
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            vals = [s["ttfb"][mode][k]["median"] or 0 for k, _ in keys]
            ax.bar([i + j * width for i in range(len(keys))], vals, width,
                   label=f"warmup: {mode}", color=("#ff7f0e", "#1f77b4")[j % 2])
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels([t for _, t in keys], fontsize=8)
        ax.legend(fontsize=8)
        ax.set_title("time to first byte after start, ms", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.set_visible(False)
    fig.suptitle(f"lbctl L7 proxy vs HAProxy mode http, {results['started'][:16]}, median of "
                 f"{results['repeats']} alternating rounds, whiskers min-max; load "
                 f"{results['host']['loadavg_before'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def update_doc(doc_text: str, block: str) -> str:
    start, end = doc_text.find(DOC_BEGIN), doc_text.find(DOC_END)
    if start != -1 and end > start:
        return doc_text[:start] + block.rstrip("\n") + doc_text[end + len(DOC_END):]
    return doc_text.rstrip("\n") + "\n\n## L7: the proxy against HAProxy mode http\n\n" + block


# ---------------------------------------------------------------- the run


def run_l7(results_dir: Path, doc_path: Path | None = None, repeats: int = 3, quick: bool = False,
           ttfb_restarts: int = 3, prefix: str | None = None, console: Any = None) -> dict[str, Any]:
    """Alternating rounds (HAProxy first in odd rounds, the L7 proxy first in even ones) of
    keep-alive and new-connection wrk runs, the pool-off VIP's keep-alive run, then
    ttfb_restarts agent restarts per warm-up mode. Writes results_dir/l7-<timestamp>.json and,
    with doc_path and every run good, the page's block and plot. Cleans up in any case."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (namespaces); hint: sudo")
    check_tools(["haproxy"])
    check_outputs(results_dir, doc_path)
    repeats = 1 if quick else max(1, repeats)
    restarts = 1 if quick else max(1, ttfb_restarts)
    progress = _Progress(repeats * 6 + 2 * restarts + 2, console)
    started = dt.datetime.now(dt.timezone.utc)
    bench = L7Bench(repeats, quick, console, prefix)
    results: dict[str, Any] = {
        "schema": 1, "started": started.isoformat(timespec="seconds"), "quick": quick,
        "repeats": repeats,
        "host": host_record(),
        "config": {"wrk_threads": WRK_THREADS, "wrk_connections": WRK_CONNECTIONS,
                   "http_s": bench.durations.http_s, "ttfb_burst": TTFB_BURST,
                   "eager_min_idle": EAGER_MIN_IDLE, "l7_workers": os.cpu_count(),
                   "haproxy_threads": 2, "agent_file": agent_conf(bench.vip, bench.backends),
                   "haproxy_cfg": haproxy_http_conf(bench.backends)},
        "runs": {s: {"keepalive": [], "short": []} for s in SETUPS},
        "ttfb": {"lazy": [], "eager": []},
    }
    with rounds_then_cleanup(bench, progress, console,
                             "cleaned up: agent, HAProxy, nginx, lab removed"):
        console.print(f"[bold]lbctl bench l7[/]: {repeats} round(s); lab prefix "
                      f"{bench.lab.prefix}")
        bench.prepare()
        bench.start_agent()
        bench._wait_port(bench.lab.client.name, bench.vip, REFERENCE_PORT)
        progress.step(f"lab {bench.lab.prefix} up: nginx on 3 backends, HAProxy mode http "
                      f"(:{HAPROXY_PORT}), lbctl agent with L7 VIPs (:{L7_PORT}, pool off "
                      f":{L7_NOPOOL_PORT}), reference proxy (:{REFERENCE_PORT})")
        # Through every path once before timing: neighbours resolved, pools opened.
        for port in (L7_PORT, HAPROXY_PORT, L7_NOPOOL_PORT, REFERENCE_PORT):
            bench.lab.http_get(bench.vip, port, count=6)
        for rnd in range(1, repeats + 1):
            order = ["haproxy", "l7", "reference"] if rnd % 2 else ["reference", "l7", "haproxy"]
            for workload, close in (("keepalive", False), ("short", True)):
                # The reference proxy is measured with keep-alive only (the goal's workload).
                for setup in order if workload == "keepalive" else [x for x in order
                                                                    if x != "reference"]:
                    rec = bench.wrk(setup, close)
                    results["runs"][setup][workload].append(rec)
                    progress.step(f"round {rnd}/{repeats} {TITLES[setup]}: {workload} "
                                  + _describe(rec))
            rec = bench.wrk("l7-nopool", False)
            results["runs"]["l7-nopool"]["keepalive"].append(rec)
            progress.step(f"round {rnd}/{repeats} {TITLES['l7-nopool']}: keepalive "
                          + _describe(rec))
        results["metrics"] = bench.metrics()
        bench.stop_agent()
        for i in range(restarts):
            for mode in ("lazy", "eager") if i % 2 == 0 else ("eager", "lazy"):
                bench.start_agent(warmup=mode)
                try:
                    rec = bench.ttfb()
                finally:
                    bench.stop_agent()
                results["ttfb"][mode].append(rec)
                progress.step(f"restart {i + 1}/{restarts}, warmup {mode}: " + (
                    f"first request {rec['first_us'] / 1e3:.2f} ms, burst of {TTFB_BURST} "
                    f"p50 {_pct(rec['burst_us'], 0.5) / 1e3:.2f} ms max "
                    f"{max(rec['burst_us']) / 1e3:.2f} ms" if rec["ok"]
                    else f"[red]failed[/]: {rec['error']}"))
    results["host"]["loadavg_after"] = list(os.getloadavg())
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    failed = [f"{s}/{w}" for s, ws in results["runs"].items() for w, rs in ws.items()
              for r in rs if not r.get("ok")]
    failed += [f"ttfb/{m}" for m, rs in results["ttfb"].items() for r in rs if not r.get("ok")]
    results["complete"] = not failed
    results["failed_runs"] = failed
    results["summary"] = summarize_l7(results)
    write_record(results, results_dir, "l7-" + started.strftime("%Y%m%dT%H%M%SZ")
                 + ("-quick" if quick else "") + ".json", console)
    if doc_path is not None and failed:
        console.print(f"[yellow]{doc_path} left as it was: the run is incomplete[/]")
    elif doc_path is not None:
        plotted = plot(results, doc_path.parent / PLOT_NAME)
        doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
        doc_path.write_text(update_doc(doc, render_markdown(results, plotted)))
        console.print(f"updated {doc_path} and {PLOT_NAME}")
    print_summary(results, console)
    if failed:
        console.print(f"[red]incomplete: {len(failed)} run(s) failed: {', '.join(failed)}[/]")
    return results


def _describe(rec: dict[str, Any]) -> str:
    if "rate" not in rec:
        return f"[red]failed[/]: {rec.get('error')}"
    text = (f"{rec['rate']:,.0f} req/s, p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms, "
            f"load {rec['loadavg1']:.1f}")
    if rec.get("cpu_ms_per_1k") is not None:
        text += f", proxy {rec['cpu_ms_per_1k']:.1f} CPU-ms per 1k"
    if not rec["ok"]:
        text += f" [red]({rec['error']})[/]"
    return text


def print_summary(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    s = results["summary"]
    table = Table()
    for col in ("setup", "keep-alive req/s", "p50 ms", "p99 ms", "CPU-ms/1k", "new-conn req/s",
                "p99 ms"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    for setup, m in s["setups"].items():
        table.add_row(TITLES[setup], _n(m["keepalive_rate"]["median"]),
                      _n(m["keepalive_p50_ms"]["median"], 2), _n(m["keepalive_p99_ms"]["median"], 2),
                      _n(m["keepalive_cpu_ms_per_1k"]["median"], 1), _n(m["short_rate"]["median"]),
                      _n(m["short_p99_ms"]["median"], 2))
    console.print(table)
    for name, r in s["ratios"].items():
        if r["n"]:
            console.print(f"  {name}: {r['median']:.2f}x (rounds "
                          f"{', '.join(f'{v:.2f}' for v in r['values'])})")
    g = s["goal"]
    if g["ratio"] is not None:
        console.print(f"  goal {g['goal']}: {g['ratio']:.2f}x "
                      + ("[green]met[/]" if g["met"] else "[red]missed[/]"))
    for mode, t in s["ttfb"].items():
        if t["first_ms"]["n"]:
            console.print(f"  TTFB warmup {mode}: first request {t['first_ms']['median']:.2f} ms, "
                          f"burst p50 {t['burst_p50_ms']['median']:.2f} ms, max "
                          f"{t['burst_max_ms']['median']:.2f} ms")
