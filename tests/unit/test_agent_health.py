"""Health checks against real servers on loopback, rise/fall counting, and the agent's policy
(failing backends drained, operator state wins, all failing keeps the last healthy set)."""
from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lbctl.agent import Agent
from lbctl.config import load_text
from lbctl.health import BackendHealth, CheckResult, check_http, check_tcp


class _Status(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_check_passes_on_200_and_fails_on_500_though_the_port_answers(http_server):
    port = http_server.server_address[1]
    ok = asyncio.run(check_http("127.0.0.1", port, "/healthz", (200, 399), 2.0))
    assert ok.ok and ok.reason == "Layer7 check passed (status 200)"
    http_server.status = 500  # type: ignore[attr-defined]
    bad = asyncio.run(check_http("127.0.0.1", port, "/healthz", (200, 399), 2.0))
    assert not bad.ok and bad.reason == "Layer7 wrong status (500)"
    assert asyncio.run(check_tcp("127.0.0.1", port, 2.0)).ok


def test_tcp_check_of_a_closed_port_names_the_refusal():
    result = asyncio.run(check_tcp("127.0.0.1", closed_port(), 2.0))
    assert not result.ok and result.reason == "Layer4 connection problem (Connection refused)"


def test_http_check_of_a_server_that_never_answers_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        result = asyncio.run(check_http("127.0.0.1", listener.getsockname()[1], "/", (200, 399), 0.3))
    assert not result.ok and result.reason == "Layer7 timeout"


PASS, FAIL = CheckResult(True, "ok", 0.001), CheckResult(False, "refused", 0.001)


def test_fall_failures_in_a_row_take_it_down_and_rise_passes_bring_it_back():
    h = BackendHealth()
    assert [h.record(r, rise=2, fall=3) for r in (FAIL, FAIL, PASS, FAIL, FAIL)] == [False] * 5
    assert h.up, "a pass in between restarts the count"
    assert h.record(FAIL, 2, 3) and not h.up
    assert not h.record(PASS, 2, 3) and not h.up
    assert h.record(PASS, 2, 3) and h.up
    assert h.failures == 5 and h.checks == 8


CONFIG = """\
vips:
  - vip: 10.0.0.10:80
    health: {check: tcp, interval: 1s, rise: 1, fall: 1}
    backends:
      - {addr: 10.0.1.11:80}
      - {addr: 10.0.1.12:80}
      - {addr: 10.0.1.13:80, state: drain}
  - vip: 10.0.0.11:80
    backends:
      - {addr: 10.0.1.11:80}
"""


def agent_with(config: str) -> Agent:
    # The policy needs no balancer, lock or event loop: a stand-in that only names the instance.
    agent = Agent(_NoController(), "lb.yaml", "127.0.0.1:0")  # type: ignore[arg-type]
    agent.state = load_text(config)
    return agent


class _NoController:
    instance = "unit"


def states(agent: Agent) -> dict[str, dict[str, str]]:
    return {str(v): {b.name: b.state for b in spec.backends} for v, spec in agent.effective().items()}


def set_health(agent: Agent, vip: str, name: str, up: bool) -> None:
    key = next((v, name) for v in agent.state.vips if str(v) == vip)  # type: ignore[union-attr]
    agent.checker.states[key] = BackendHealth(up=up)


def test_a_failing_backend_is_drained_and_the_operators_drain_stays():
    agent = agent_with(CONFIG)
    set_health(agent, "10.0.0.10:80", "10.0.1.12:80", False)
    set_health(agent, "10.0.0.10:80", "10.0.1.13:80", True)
    assert states(agent)["10.0.0.10:80"] == {"10.0.1.11:80": "active", "10.0.1.12:80": "drain",
                                             "10.0.1.13:80": "drain"}
    assert states(agent)["10.0.0.11:80"] == {"10.0.1.11:80": "active"}, "no checks: never drained"


def test_all_failing_keeps_the_last_healthy_set_until_one_passes():
    agent = agent_with(CONFIG)
    set_health(agent, "10.0.0.10:80", "10.0.1.12:80", False)
    states(agent)                                     # last healthy set: .11
    set_health(agent, "10.0.0.10:80", "10.0.1.11:80", False)
    assert states(agent)["10.0.0.10:80"]["10.0.1.11:80"] == "active"
    assert states(agent)["10.0.0.10:80"]["10.0.1.12:80"] == "drain"
    assert {str(v) for v in agent.all_failing} == {"10.0.0.10:80"}
    set_health(agent, "10.0.0.10:80", "10.0.1.12:80", True)
    assert states(agent)["10.0.0.10:80"] == {"10.0.1.11:80": "drain", "10.0.1.12:80": "active",
                                             "10.0.1.13:80": "drain"}
    assert agent.all_failing == set()


def test_http_check_reaches_an_ipv6_backend_with_a_bracketed_host_header() -> None:
    """An IPv6 backend is checked over IPv6 (a real server on ::1), Host in the bracket form."""
    import asyncio
    import http.server
    import socket
    import threading

    from lbctl.health import check_http

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.HTTPServer):
        address_family = socket.AF_INET6

    try:
        server = Server(("::1", 0), Handler)
    except OSError as exc:
        import pytest
        pytest.skip(f"no IPv6 loopback here: {exc}")
    port = server.server_address[1]
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        result = asyncio.run(check_http("::1", port, "/healthz", (200, 399), 2.0))
    finally:
        thread.join(5)
        server.server_close()
    assert result.ok, result.reason
    assert seen == [f"[::1]:{port}"]
