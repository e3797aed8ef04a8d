"""`lbctl bench agent`: what one change costs the control plane (read the maps, plan, write a
ring of 65537 slots) at 10, 100 and 1000 backends, the share of slots it moves against the
ideal 1/N, and the agent's CPU with 1000 backends checked every second. Reported, not asserted."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lbctl import planner
from lbctl.control import LOCK_DIR
from lbctl.model import BackendSpec, VipSpec
from xdp.balancer import require_root
from xdp.codec import Endpoint
from xdp.limits import DEFAULT_LIMITS
from xdp.maps import LbMaps, pin_dir_for

console = Console(highlight=False)
PREFIX = "agb"                     # instances and namespaces this bench makes: agb<hex>
VIP = Endpoint("10.99.0.10", 80, "tcp")
CHECK_NET = "10.99.1"


def _backend(i: int) -> BackendSpec:
    return BackendSpec(f"10.99.{2 + i // 250}.{1 + i % 250}", 8080)


def bench_changes(sizes: tuple[int, ...] = (10, 100, 1000), repeats: int = 21) -> list[dict[str, Any]]:
    """Per size: median ms of read_live + plan + apply for one backend added or removed (as
    Controller.change does it, minus the lock), median ms of plan alone, and slots moved."""
    from xdp.program import compile_and_load

    instance = PREFIX + secrets.token_hex(3)
    pin_dir = pin_dir_for(instance)
    loaded = compile_and_load(pin_dir, DEFAULT_LIMITS)   # pinned maps; nothing is attached
    rows = []
    try:
        with LbMaps(pin_dir, DEFAULT_LIMITS) as maps:
            for n in sizes:
                base = VipSpec(VIP, tuple(_backend(i) for i in range(n)))
                grown = VipSpec(VIP, (*base.backends, _backend(n)))
                live = planner.read_live(maps)
                planner.apply(planner.plan(live, {VIP: base}), live, maps)
                total_ms, plan_ms, moved = [], [], []
                for r in range(repeats):
                    desired = {VIP: grown if r % 2 == 0 else base}
                    t0 = time.perf_counter()
                    live = planner.read_live(maps)
                    t1 = time.perf_counter()
                    the_plan = planner.plan(live, desired)
                    t2 = time.perf_counter()
                    planner.apply(the_plan, live, maps)
                    t3 = time.perf_counter()
                    total_ms.append((t3 - t0) * 1000)
                    plan_ms.append((t2 - t1) * 1000)
                    moved.append(the_plan.changes[0].moved_share)
                rows.append({"backends": n, "change_ms_median": statistics.median(total_ms),
                             "change_ms_min": min(total_ms), "plan_ms_median": statistics.median(plan_ms),
                             "moved_share_median": statistics.median(moved), "ideal_share": 1 / (n + 1),
                             "repeats": repeats})
                console.print(f"  {n:>5} backends: change {rows[-1]['change_ms_median']:.1f} ms "
                              f"(plan {rows[-1]['plan_ms_median']:.1f} ms), moved "
                              f"{rows[-1]['moved_share_median']:.2%} (ideal {1 / (n + 1):.2%})")
    finally:
        loaded.bpf.cleanup()
        shutil.rmtree(pin_dir, ignore_errors=True)
    return rows


# An HTTP server on many ports of one address, answering every request with 200: the 1000
# backends the agent checks.
_SERVER = r"""
import asyncio, sys
addr, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
async def handle(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESP)
        await writer.drain()
    except Exception:
        pass
    writer.close()
async def main():
    servers = [await asyncio.start_server(handle, addr, p, backlog=64) for p in range(first, first + count)]
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _scrape(ns: str, port: int) -> dict[str, float]:
    """Unlabelled samples of the agent's /metrics, read inside its namespace."""
    from prometheus_client.parser import text_string_to_metric_families

    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-I", "-S", "-c", code],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return {s.name: s.value for fam in text_string_to_metric_families(out) for s in fam.samples if not s.labels}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_agent_cpu(backends: int = 1000, check: str = "http", interval: str = "1s",
                    measure_s: float = 30.0, warmup_s: float = 10.0) -> dict[str, Any]:
    """The agent's own CPU (user + system) over measure_s with `backends` checked every
    interval, in a namespace of its own (a veth pair in generic mode carries the program)."""
    ns = PREFIX + secrets.token_hex(3)
    run = ["ip", "netns", "exec", ns]
    tmp = Path(f"/tmp/{ns}")
    tmp.mkdir()
    server = agent = None
    try:
        for argv in (["ip", "netns", "add", ns], [*run, "ip", "link", "set", "lo", "up"],
                     [*run, "ip", "link", "add", "agv0", "type", "veth", "peer", "name", "agv1"],
                     [*run, "ip", "link", "set", "agv0", "up"], [*run, "ip", "link", "set", "agv1", "up"],
                     [*run, "ip", "addr", "add", f"{CHECK_NET}.1/24", "dev", "agv1"]):
            subprocess.run(argv, check=True, capture_output=True)
        server = subprocess.Popen([*run, sys.executable, "-I", "-S", "-c", _SERVER, f"{CHECK_NET}.1", "20000",
                                   str(backends)], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        health = ("{check: http, path: /, expect: 200, " if check == "http" else "{check: tcp, ") + \
            f"interval: {interval}, timeout: 500ms, rise: 2, fall: 2}}"
        rows = "\n".join(f"      - {{addr: {CHECK_NET}.1:{20000 + i}}}" for i in range(backends))
        config = tmp / "lb.yaml"
        config.write_text(f"interfaces: [agv0]\nxdp_mode: generic\nvips:\n  - vip: 10.99.0.10:80\n"
                          f"    health: {health}\n    backends:\n{rows}\n")
        log = tmp / "agent.log"
        with open(log, "w") as out:
            agent = subprocess.Popen([sys.executable, "-m", "lbctl", "-n", ns, "agent", "-f", str(config),
                                      "--metrics-addr", "127.0.0.1:9899"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "metrics on http://" not in log.read_text():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start: {log.read_text()[-1000:]}")
            time.sleep(0.5)
        time.sleep(warmup_s)
        a0, s0, t0 = _cpu_s(agent.pid), _cpu_s(server.pid), time.monotonic()
        time.sleep(measure_s)
        a1, s1, t1 = _cpu_s(agent.pid), _cpu_s(server.pid), time.monotonic()
        text = log.read_text()
        downs = text.count(" is DOWN")
        reasons: dict[str, int] = {}
        for line in text.splitlines():
            if " is DOWN, reason: " in line:
                why = line.split(" is DOWN, reason: ", 1)[1].split(", check duration")[0]
                reasons[why] = reasons.get(why, 0) + 1
        applies = text.count("apply (check): ~ vip")
        metrics = _scrape(ns, 9899)
        inconclusive = metrics.get("lbctl_health_checks_inconclusive_total", 0)
        stalls = metrics.get("lbctl_health_checker_stalls_total", 0)
        result = {"backends": backends, "check": check, "interval": interval, "measured_s": round(t1 - t0, 1),
                  "agent_cpu_share": (a1 - a0) / (t1 - t0), "server_cpu_share": (s1 - s0) / (t1 - t0),
                  "false_downs": downs, "down_reasons": reasons, "applies": applies,
                  "inconclusive_timeouts": inconclusive, "checker_stalls": stalls, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
        console.print(f"  agent: {result['agent_cpu_share']:.1%} of a core for {backends} {check} checks every "
                      f"{interval} (server {result['server_cpu_share']:.1%}; {downs} false DOWNs {reasons}, "
                      f"{applies} applies; {inconclusive:.0f} timeouts not counted, {stalls:.0f} checker stalls)")
        return result
    finally:
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(pin_dir_for(ns), ignore_errors=True)
        shutil.rmtree(os.path.join(LOCK_DIR, ns), ignore_errors=True)
        for leftover in (os.path.join(LOCK_DIR, f"{ns}.lock"),):
            if os.path.exists(leftover):
                os.unlink(leftover)
        shutil.rmtree(tmp, ignore_errors=True)


def plot(record: dict[str, Any], png: str) -> None:
    """One figure: a change's cost by backend count, and the share of slots it moved against 1/N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["changes"]
    n = [r["backends"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(n, [r["change_ms_median"] for r in rows], "o-", label="read + plan + apply")
    left.plot(n, [r["plan_ms_median"] for r in rows], "s--", label="plan alone (2 Maglev rings)")
    left.axhline(50, color="grey", lw=0.8, ls=":", label="target at 100 backends")
    left.set(xscale="log", xlabel="backends on the VIP", ylabel="ms, median", title="one backend change")
    left.legend(fontsize=8)
    right.plot(n, [100 * r["moved_share_median"] for r in rows], "o-", label="Maglev (measured)")
    right.plot(n, [100 * r["ideal_share"] for r in rows], "s--", label="ideal 1/N")
    right.set(xscale="log", yscale="log", xlabel="backends on the VIP", ylabel="% of 65537 slots",
              title="slots moved by adding one backend")
    right.legend(fontsize=8)
    fig.suptitle(f"lbctl control plane, {record['when']} (loadavg {record['loadavg']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_bench(json_out: str | None = None, measure_s: float = 30.0, png: str | None = None) -> dict[str, Any]:
    require_root()
    console.print("[bold]plan + apply of one backend change (ring 65537)[/]")
    changes = bench_changes()
    console.print("[bold]agent CPU, 1000 backends checked every second[/]")
    cpu = [bench_agent_cpu(check=c, measure_s=measure_s) for c in ("tcp", "http")]
    table = Table(title="control plane")
    for col in ("backends", "change ms (median)", "plan ms", "slots moved", "ideal 1/N"):
        table.add_column(col, justify="right")
    for r in changes:
        table.add_row(str(r["backends"]), f"{r['change_ms_median']:.1f}", f"{r['plan_ms_median']:.1f}",
                      f"{r['moved_share_median']:.2%}", f"{r['ideal_share']:.2%}")
    console.print(table)
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changes": changes, "agent_cpu": cpu,
              "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    if json_out:
        Path(json_out).write_text(json.dumps(record, indent=2) + "\n")
    if png:
        plot(record, png)
    return record
