"""Shared by the agent's netns tests: run `lbctl agent` in a lab's balancer namespace, read its
log and metrics, stop and start the lab's backend servers, and hold a keep-alive load."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lbctl.lab import Lab

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0   # a bound for conditions to become true on a loaded 2-core machine, never a speed check


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = WAIT_S, step_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(step_s)


class AgentProc:
    """`lbctl -n <lb> agent -f FILE` as systemd would run it; always stopped by close()."""

    def __init__(self, lab: Lab, config: Path, log: Path, metrics_port: int, *extra: str):
        self.lab = lab
        self.log_path = log
        self.metrics_port = metrics_port
        self.argv = [sys.executable, "-m", "lbctl", "-n", lab.lb.netns, "agent", "-f", str(config),
                     "--metrics-addr", f"127.0.0.1:{metrics_port}", *extra]
        self._log = open(log, "a")  # noqa: SIM115  (open for the life of the process, closed by stop())
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        wait_for(lambda: "metrics on http://" in self.log() or self.proc.poll() is not None, "the agent to start",
                 timeout_s=180.0)
        assert self.proc.poll() is None, f"agent exited {self.proc.returncode}: {self.log()[-2000:]}"

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample: (name, labels) -> value, parsed by prometheus_client's parser."""
        code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                f"'http://127.0.0.1:{self.metrics_port}/metrics', timeout=10).read().decode())")
        proc = self.lab.run(self.lab.lb, [sys.executable, "-I", "-S", "-c", code], timeout=30)
        assert proc.returncode == 0, proc.stderr
        out = {}
        for family in text_string_to_metric_families(proc.stdout):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def sample(self, name: str, **labels: str) -> float | None:
        want = set(labels.items())
        for (n, ls), value in self.metrics().items():
            if n == name and want <= set(ls):
                return value
        return None


def server_pid(lab: Lab, name: str) -> int | None:
    try:
        return int((lab.run_dir / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def stop_server(lab: Lab, name: str) -> None:
    """Ends a backend's lab server (its HTTP port then refuses connections)."""
    pid = server_pid(lab, name)
    assert pid is not None, f"no server pid for {name}"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"{name}'s server to exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def start_server(lab: Lab, name: str, status_500: bool = False) -> subprocess.Popen:
    """Starts the lab server of backend `name` again (or, with status_500, an HTTP server on its
    port that answers every request with 500: the port is open, the service is broken). The
    process lives in the lab's namespace, so lab.down() ends it in any case."""
    host = lab.host(name)
    env_path = f"PYTHONPATH={REPO_ROOT}"
    if status_500:
        code = ("import http.server as h\n"
                "class H(h.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        self.send_response(500); self.send_header('Content-Length', '0'); self.end_headers()\n"
                "    def log_message(self, *a): pass\n"
                f"h.ThreadingHTTPServer(('0.0.0.0', {lab.http_port}), H).serve_forever()\n")
        argv = [sys.executable, "-I", "-S", "-c", code]
    else:
        argv = [sys.executable, "-m", "lbctl.labserver", "--name", name, "--http-port", str(lab.http_port),
                "--udp-port", str(lab.udp_port)]
    proc = subprocess.Popen(["ip", "netns", "exec", host.netns, "env", env_path, *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (lab.run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def listening() -> bool:
        out = lab.run(host, ["ss", "-Htln", f"sport = :{lab.http_port}"]).stdout
        return bool(out.strip())
    wait_for(listening, f"{name}'s server to listen")
    return proc


# A keep-alive load from the lab client: N connections, each a thread making GETs back to back
# until told to stop (a line on stdin); each connection records its backends, statuses and
# errors. One JSON document out at the end.
_LOAD_SNIPPET = r"""
import http.client, json, sys, threading, time
host, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
results = [dict(backends=[], requests=0, non2xx=0, errors=[]) for _ in range(conns)]
def worker(i):
    r = results[i]
    conn = http.client.HTTPConnection(host, port, timeout=5.0)
    conn.auto_open = 0
    try:
        conn.connect()
    except Exception as exc:
        r["errors"].append("connect: %s" % exc); return
    while not stop.is_set():
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
        except Exception as exc:
            r["errors"].append("%s: %s" % (type(exc).__name__, exc)); return
        r["requests"] += 1
        if not 200 <= resp.status < 300:
            r["non2xx"] += 1
        b = resp.getheader("X-Backend")
        if not r["backends"] or r["backends"][-1] != b:
            r["backends"].append(b)
        time.sleep(0.02)
threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conns)]
for t in threads: t.start()
print("started", flush=True)
sys.stdin.readline()
stop.set()
for t in threads: t.join(10)
print(json.dumps(results), flush=True)
"""


class KeepAliveLoad:
    """Runs at least min_duration_s (the issue's proofs hold a load of 10 s or more)."""

    def __init__(self, lab: Lab, connections: int = 64, min_duration_s: float = 10.0):
        self.until = time.monotonic() + min_duration_s
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.client.netns, sys.executable, "-I", "-S", "-c", _LOAD_SNIPPET,
             lab.vip, str(lab.http_port), str(connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "started"

    def finish(self) -> list[dict[str, Any]]:
        time.sleep(max(0.0, self.until - time.monotonic()))
        out, err = self.proc.communicate("stop\n", timeout=60)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def load_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What a user of the load would notice: errors, non-2xx, connections that changed backend."""
    return {
        "requests": sum(r["requests"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "non2xx": sum(r["non2xx"] for r in results),
        "moved": [r["backends"] for r in results if len(r["backends"]) > 1],
        "idle_connections": sum(1 for r in results if r["requests"] == 0),
    }


def write_config(path: Path, lab: Lab, backends: dict[str, dict[str, Any]], health: str | None) -> Path:
    """A lab config: backend name -> extra keys (weight, state); health: a flow mapping or None."""
    lines = [f"interfaces: [{', '.join(lab.lb_ifaces)}]", "vips:", f"  - vip: {lab.vip}:{lab.http_port}"]
    if health:
        lines.append(f"    health: {health}")
    lines.append("    backends:")
    for name, extra in backends.items():
        keys = ", ".join([f"addr: {lab.host(name).addr}:{lab.http_port}", *(f"{k}: {v}" for k, v in extra.items())])
        lines.append(f"      - {{{keys}}}")
    path.write_text("\n".join(lines) + "\n")
    return path
