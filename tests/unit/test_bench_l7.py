"""`lbctl bench l7` without a lab: the agent file it starts the proxy with is a valid config
whose VIPs are what the bench claims (a default VIP, a pool-off one, eager and lazy pools), the
HAProxy peer does the same header work, ratios are taken per round, and the page block says
the goal's verdict and is replaced in place."""
from __future__ import annotations

from lbctl.bench import l7
from lbctl.config import load_text

BACKENDS = ["10.77.2.11", "10.77.2.12", "10.77.2.13"]


def test_the_agent_file_is_a_default_l7_vip_and_a_pool_off_one():
    state = load_text(l7.agent_conf("10.77.0.10", BACKENDS), "bench.yaml")
    by_port = {vip.port: entry for vip, entry in state.vips.items()}
    assert set(by_port) == {l7.L7_PORT, l7.L7_NOPOOL_PORT}
    default, nopool = by_port[l7.L7_PORT], by_port[l7.L7_NOPOOL_PORT]
    assert default.mode == nopool.mode == "l7"
    assert default.l7 is not None and nopool.l7 is not None
    assert default.l7.pool_enabled and not nopool.l7.pool_enabled
    # Every limit of a default VIP stays on: the bench measures what users run.
    assert default.l7.max_headers == 100 and default.l7.header_timeout_ms == 10_000
    assert [f"{b.addr}:{b.port}" for b in default.spec.backends] == [f"{a}:8080" for a in BACKENDS]


def test_the_warm_up_files_have_one_vip_with_an_eager_or_lazy_pool():
    eager = load_text(l7.agent_conf("10.77.0.10", BACKENDS, warmup="eager"), "e.yaml")
    lazy = load_text(l7.agent_conf("10.77.0.10", BACKENDS, warmup="lazy"), "l.yaml")
    (e,), (z,) = eager.vips.values(), lazy.vips.values()
    assert e.l7 is not None and (e.l7.warmup, e.l7.pool_min_idle) == ("eager", l7.EAGER_MIN_IDLE)
    assert z.l7 is not None and (z.l7.warmup, z.l7.pool_min_idle) == ("lazy", 0)


def test_haproxy_does_the_same_header_work_per_request():
    conf = l7.haproxy_http_conf(BACKENDS)
    assert "mode http" in conf and "option http-keep-alive" in conf and "nbthread 2" in conf
    assert "option forwardfor" in conf and "X-Forwarded-Proto http" in conf
    assert "add-header Forwarded" in conf and "balance roundrobin" in conf
    assert conf.count("    server be") == 3 and f"bind 0.0.0.0:{l7.HAPROXY_PORT}" in conf


def _run(rate: float, p99: float = 2.0) -> dict:
    return {"ok": True, "rate": rate, "p50_ms": 1.0, "p99_ms": p99, "cpu_ms_per_1k": 20.0}


def _results() -> dict:
    return {
        "started": "2026-12-02T01:00:00+00:00", "quick": False, "repeats": 2, "file": "l7.json",
        "config": {"http_s": 6},
        "host": {"cpus": 2, "loadavg_before": [3.0, 2.0, 1.0], "loadavg_after": [4.0, 3.0, 2.0]},
        "runs": {"haproxy": {"keepalive": [_run(30000), _run(20000)], "short": [_run(8000)]},
                 "l7": {"keepalive": [_run(27000), _run(19000)], "short": [_run(4000)]},
                 "l7-nopool": {"keepalive": [_run(9000), _run(9500)], "short": []}},
        "ttfb": {"lazy": [{"ok": True, "first_us": 2000, "burst_us": [1000, 3000, 5000],
                           "warm_us": [500, 600, 700]}],
                 "eager": [{"ok": True, "first_us": 800, "burst_us": [900, 1000, 1100],
                            "warm_us": [500, 600, 700]}]},
    }


def test_ratios_are_taken_per_round_and_judge_the_goal():
    results = _results()
    s = l7.summarize_l7(results)
    ka = s["ratios"]["l7/haproxy keepalive_rate"]
    assert ka["values"] == [0.9, 0.95] and abs(ka["median"] - 0.925) < 1e-9
    assert s["goal"]["met"] is True
    assert s["ratios"]["pool off/on keepalive_rate"]["values"] == [9000 / 27000, 9500 / 19000]
    assert s["ttfb"]["lazy"]["first_ms"]["median"] == 2.0
    assert s["ttfb"]["eager"]["burst_p50_ms"]["median"] == 1.0
    results["runs"]["l7"]["keepalive"][1]["rate"] = 10000
    assert l7.summarize_l7(results)["goal"]["met"] is False


def test_the_page_block_has_the_table_the_verdict_and_is_replaced_in_place():
    results = _results()
    results["summary"] = l7.summarize_l7(results)
    block = l7.render_markdown(results, plotted=True)
    assert block.startswith(l7.DOC_BEGIN) and block.rstrip().endswith(l7.DOC_END)
    assert "| HAProxy mode http | 25,000 |" in block
    assert "0.93x" in block and ": met (0.93x)" in block
    assert "load average 3.00 2.00 1.00 before" in block
    assert f"]({l7.PLOT_NAME})" in block
    page = "# Benchmarks\n\nintro\n"
    once = l7.update_doc(page, block)
    assert once.startswith(page.rstrip("\n")) and once.count(l7.DOC_BEGIN) == 1
    twice = l7.update_doc(once.replace("intro", "intro kept"), block)
    assert twice.count(l7.DOC_BEGIN) == 1 and "intro kept" in twice


def test_the_reference_proxy_is_compared_per_round_with_haproxy_and_the_l7_proxy():
    results = _results()
    results["runs"]["reference"] = {"keepalive": [_run(30000), _run(25000)], "short": []}
    results["runs"]["reference"]["keepalive"][0]["cpu_ms_per_1k"] = 10.0
    s = l7.summarize_l7(results)
    assert s["ratios"]["reference/haproxy keepalive_rate"]["values"] == [1.0, 1.25]
    assert s["ratios"]["l7/reference keepalive_rate"]["values"] == [0.9, 19000 / 25000]
    assert s["ratios"]["l7/reference keepalive_cpu_ms_per_1k"]["values"] == [2.0, 1.0]
    results["summary"] = s
    block = l7.render_markdown(results, plotted=False)
    assert f"| {l7.TITLES['reference']} | 27,500 |" in block
    assert "reference/haproxy keepalive_rate: **1.12x**" in block


def test_the_reference_proxy_balances_requests_of_one_connection_over_pooled_upstreams():
    """The bench's reference point must really proxy (else its figures mean nothing): answers
    come back intact, requests of one client connection go round robin, the backends see
    X-Forwarded-For and one pooled connection each however many requests pass."""
    import http.client
    import socket
    import subprocess
    import sys
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Backend(ThreadingHTTPServer):
        daemon_threads = True
        connections = 0
        xff: list[str]

        def get_request(self):  # type: ignore[no-untyped-def]
            self.connections += 1
            return super().get_request()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.server.xff.append(self.headers.get("X-Forwarded-For", ""))  # type: ignore[attr-defined]
            body = f"{self.server.server_address[1]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    servers = [Backend(("127.0.0.1", 0), Handler) for _ in range(2)]
    for srv in servers:
        srv.xff = []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lbctl.bench.l7_reference", str(port),
                             ",".join(f"127.0.0.1:{srv.server_address[1]}" for srv in servers),
                             "--workers", "1", "--host", "127.0.0.1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        seen = []
        for _ in range(10):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200
            seen.append(int(resp.read()))
        assert sorted(set(seen)) == sorted(srv.server_address[1] for srv in servers)
        assert all(seen[i] != seen[i + 1] for i in range(9)), seen
        deadline = time.monotonic() + 5
        while sum(len(srv.xff) for srv in servers) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [srv.connections for srv in servers] == [1, 1]
        assert {x for srv in servers for x in srv.xff} == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for srv in servers:
            srv.shutdown()
            srv.server_close()
