"""The L7 proxy against real HTTP servers on loopback (no root): per-request balancing on one
keep-alive client connection, pooled upstream connections counted at the servers, eager
warm-up, forwarded headers, streamed bodies, the limits table, retries and canary splits."""
from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lbctl.config import load_text
from lbctl.l7.supervisor import L7Supervisor, worker_spec


class CountingServer(ThreadingHTTPServer):
    """A backend that names itself, counts the TCP connections it accepts, echoes what it saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, handler: type[BaseHTTPRequestHandler] | None = None):
        self.name = name
        self.connections = 0
        self.seen: list[dict[str, str]] = []
        self.slow_started = threading.Event()
        super().__init__(("127.0.0.1", 0), handler or Handler)

    def get_request(self):  # type: ignore[no-untyped-def]
        pair = super().get_request()
        self.connections += 1
        return pair


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes; with Nagle each answer would wait for a delayed ACK.
    disable_nagle_algorithm = True
    server: CountingServer

    def _reply(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.name)
        self.send_header("Keep-Alive", "timeout=30")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.path == "/slow":
            self.server.slow_started.set()
            time.sleep(1.0)
        if self.path.startswith("/cc/"):
            body = f"{self.server.name} {time.monotonic()}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if self.path != "/cc/none":
                self.send_header("Cache-Control", self.path[4:])
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        if self.path.startswith("/status/"):
            self._reply(b"x", int(self.path.rsplit("/", 1)[1]))
            return
        self._reply(f"{self.server.name} {self.path}\n".encode())

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().strip(), 16)
                if n == 0:
                    self.rfile.readline()
                    break
                chunk = self.rfile.read(n)
                self.rfile.readline()
                digest.update(chunk)
                size += n
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                chunk = self.rfile.read(min(remaining, 65536))
                digest.update(chunk)
                size += len(chunk)
                remaining -= len(chunk)
        self._reply(f"{size} {digest.hexdigest()}".encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rig:
    def __init__(self, tmp: Path, names: list[str]):
        self.tmp = tmp
        self.servers = {n: CountingServer(n) for n in names}
        for srv in self.servers.values():
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.port = free_port()
        self.sup: L7Supervisor | None = None

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name].server_address[1]}"

    def start(self, yaml_text: str, workers: int = 1) -> None:
        text = yaml_text
        for n in self.servers:
            text = text.replace(f"@{n}", self.addr(n))
        text = text.replace("@VIP", f"127.0.0.1:{self.port}")
        state = load_text(textwrap.dedent(text), "lb.yaml")
        self.sup = L7Supervisor(str(self.tmp), workers)
        self.sup.start(worker_spec(state.vips, lambda vip, name: True))

    def totals_when(self, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The workers' counters once they show what the test did (written once a second)."""
        assert self.sup is not None
        deadline = time.monotonic() + 30
        while True:
            t = self.sup.totals()
            if ready(t) or time.monotonic() > deadline:
                return t
            time.sleep(0.1)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def close(self) -> None:
        if self.sup is not None:
            self.sup.stop()
        for srv in self.servers.values():
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, ["a", "b", "c"])
    yield r
    r.close()


THREE = """\
vips:
  - vip: "@VIP"
    mode: l7
    l7: {L7}
    backends:
      - {addr: "@a", weight: 3}
      - {addr: "@b", weight: 2}
      - {addr: "@c", weight: 1}
"""


def get(conn: http.client.HTTPConnection, path: str = "/", headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_300_requests_on_one_connection_spread_by_weight_over_few_upstream_connections(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    conn = rig.conn()
    seen = Counter(get(conn)[1]["x-backend"] for _ in range(300))
    assert seen == {"a": 150, "b": 100, "c": 50}, "weighted round robin per request, not per connection"
    assert sum(s.connections for s in rig.servers.values()) <= 3, \
        "each backend should see one pooled connection, not one per request"
    t = rig.totals_when(lambda t: sum(t["requests"].values()) >= 300)
    assert sum(t["upstream_reuses"].values()) >= 297 and sum(t["upstream_connects"].values()) <= 3


def test_eager_pool_is_open_before_the_first_request(rig: Rig):
    rig.start(THREE.replace("{L7}", "{pool: {warmup: eager, min_idle: 2}}"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(s.connections < 2 for s in rig.servers.values()):
        time.sleep(0.05)
    assert [s.connections for s in rig.servers.values()] == [2, 2, 2]
    conn = rig.conn()
    for _ in range(30):
        assert get(conn)[0] == 200
    assert [s.connections for s in rig.servers.values()] == [2, 2, 2], "requests used the warm pool"


def test_lazy_pool_opens_nothing_until_asked(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    time.sleep(1.0)
    assert sum(s.connections for s in rig.servers.values()) == 0


def test_forwarded_headers_added_host_kept_hop_by_hop_stripped(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    conn = rig.conn()
    status, _, _ = get(conn, "/x", {"Host": "shop.example", "X-Forwarded-For": "192.0.2.7",
                                    "Connection": "keep-alive, X-Secret", "X-Secret": "1",
                                    "Proxy-Authorization": "Basic eA=="})
    assert status == 200
    seen = next(s.seen[-1] for s in rig.servers.values() if s.seen)
    assert seen["host"] == "shop.example"
    assert seen["x-forwarded-for"] == "192.0.2.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["forwarded"] == "for=127.0.0.1;proto=http;host=shop.example"
    assert "x-secret" not in seen and "proxy-authorization" not in seen


def test_bodies_stream_with_length_and_chunked(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    conn = rig.conn()
    body = bytes(range(256)) * 8192          # 2 MiB
    conn.request("POST", "/up", body=body, headers={"Content-Length": str(len(body))})
    resp = conn.getresponse()
    assert resp.read().decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield body[:16384]
    conn.request("POST", "/up", body=chunks(), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    expect = hashlib.sha256(body[:16384] * 64).hexdigest()
    assert resp.read().decode() == f"{16384 * 64} {expect}"


def raw(rig: Rig, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(101)) + b"\r\n",
     431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400),
    (b"GARBAGE\r\n\r\n", 400),
])
def test_bad_requests_get_their_status(rig: Rig, request_bytes: bytes, status: int):
    rig.start(THREE.replace("{L7}", "{}"))
    assert raw(rig, request_bytes).startswith(f"HTTP/1.1 {status} ".encode())


def test_connect_failure_retries_on_another_backend(rig: Rig):
    dead = free_port()
    rig.start(THREE.replace("{L7}", "{}").replace('"@c"', f'"127.0.0.1:{dead}"'))
    conn = rig.conn()
    statuses = Counter(get(conn)[0] for _ in range(60))
    assert statuses == {200: 60}


def test_a_backend_killed_mid_run_fails_no_idempotent_request(tmp_path: Path):
    # Real processes (the lab's server): killing one closes its pooled connections mid-run,
    # as a crashed backend would.
    ports = {n: free_port() for n in "abc"}
    procs = {n: subprocess.Popen([sys.executable, "-m", "lbctl.labserver", "--name", n, "--bind",
                                  "127.0.0.1", "--http-port", str(p), "--udp-port", str(free_port())],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for n, p in ports.items()}
    rig = Rig(tmp_path, [])
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"labserver")
        text = THREE.replace("{L7}", "{}")
        for n, p in ports.items():
            text = text.replace(f"@{n}", f"127.0.0.1:{p}")
        rig.start(text)
        conn = rig.conn()
        failures, after = 0, Counter()
        for i in range(300):
            if i == 100:
                procs["a"].kill()
                procs["a"].wait()
            status, headers, _ = get(conn)
            failures += status != 200
            if i > 100:
                after[headers.get("x-backend")] += 1
        assert failures == 0
        assert set(after) == {"b", "c"}
    finally:
        rig.close()
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_all_backends_down_gives_502(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}").replace('"@a"', f'"127.0.0.1:{free_port()}"')
              .replace('"@b"', f'"127.0.0.1:{free_port()}"').replace('"@c"', f'"127.0.0.1:{free_port()}"'))
    assert get(rig.conn())[0] == 502


def test_routes_and_a_10_percent_canary_split(rig: Rig):
    l7 = ('{groups: {stable: ["@a", "@b"], canary: ["@c"]}, routes: ['
          '{host: admin.example, group: stable}, {path_prefix: /api/, split: {stable: 90, canary: 10}}]}')
    rig.start(THREE.replace("{L7}", l7))
    conn = rig.conn()
    assert {get(conn, "/", {"Host": "admin.example"})[1]["x-backend"] for _ in range(30)} == {"a", "b"}
    seen = Counter(get(conn, "/api/x")[1]["x-backend"] for _ in range(10_000))
    assert abs(seen["c"] / 10_000 - 0.10) <= 0.02


def test_hash_on_a_header_sticks(rig: Rig):
    rig.start(THREE.replace("{L7}", "{balancing: hash, hash_on: 'header:X-User'}"))
    conn = rig.conn()
    for user in ("ann", "bob", "cid", "dan"):
        assert len({get(conn, "/", {"X-User": user})[1]["x-backend"] for _ in range(10)}) == 1


def test_5xx_answers_eject_a_backend(rig: Rig):
    rig.start(THREE.replace("{L7}", "{ejection: {failures: 2, cooldown: 60s}}"))
    conn = rig.conn()
    for _ in range(12):
        get(conn, "/status/503")
    t = rig.totals_when(lambda t: sum(t["requests"].values()) >= 12)
    assert sum(t["ejections"].values()) >= 1
    assert t["responses"][(f"127.0.0.1:{rig.port}", "503")] == 12


def test_slowloris_clients_do_not_stop_others(rig: Rig):
    rig.start(THREE.replace("{L7}", "{limits: {header_timeout: 2s}}"))
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", rig.port))
        s.sendall(b"GET / HTTP/1.1\r\n")
        slow.append(s)
    try:
        conn = rig.conn()
        assert all(get(conn)[0] == 200 for _ in range(20))
        slow[0].settimeout(10)
        assert slow[0].recv(100) == b"", "a client that does not finish its headers is closed"
    finally:
        for s in slow:
            s.close()


def test_tls_is_terminated_with_a_certificate_made_now(rig: Rig, tmp_path: Path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    rig.start(THREE.replace("{L7}", f"{{tls: {{cert: {cert}, key: {key}}}}}"))
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["http/1.1"])
    conn = http.client.HTTPSConnection("127.0.0.1", rig.port, timeout=10, context=ctx)
    assert get(conn)[0] == 200
    assert conn.sock.selected_alpn_protocol() == "http/1.1"
    seen = next(s.seen[-1] for s in rig.servers.values() if s.seen)
    assert seen["x-forwarded-proto"] == "https" and "proto=https" in seen["forwarded"]


def test_shutdown_drains_a_request_in_flight(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["answer"] = get(rig.conn(), "/slow")
        except OSError as exc:
            result["error"] = exc
    t = threading.Thread(target=slow_request)
    t.start()
    assert any(s.slow_started.wait(10) for s in rig.servers.values())
    assert rig.sup is not None
    rig.sup.stop()           # SIGTERM while the backend is still answering
    t.join(10)
    assert "error" not in result and result["answer"][0] == 200  # type: ignore[index]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", rig.port), timeout=2).close()


def test_a_backend_closing_pooled_connections_fails_no_get(tmp_path: Path):
    # Answers one request per connection, then reads the next and closes without answering
    # (a server whose keep-alive timeout fires as the request arrives): the request met a
    # dead pooled connection and must go out again on a fresh one. One backend only, so no
    # other backend can hide the failure.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            with c:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        break
                    buf += data
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Backend: only\r\n\r\nok\n")
                c.recv(65536)
    threading.Thread(target=serve, daemon=True).start()
    rig = Rig(tmp_path, [])
    try:
        rig.start(f'vips:\n  - vip: "@VIP"\n    mode: l7\n    backends: [{{addr: "127.0.0.1:{port}"}}]\n')
        conn = rig.conn()
        assert Counter(get(conn)[0] for _ in range(200)) == {200: 200}
    finally:
        rig.close()
        listener.close()


class ShortIdleHandler(Handler):
    timeout = 0.5     # the server closes a keep-alive connection idle for half a second


def test_eager_pool_reopens_connections_the_backend_closes(tmp_path: Path):
    rig = Rig(tmp_path, [])
    rig.servers = {n: CountingServer(n, ShortIdleHandler) for n in "abc"}
    for srv in rig.servers.values():
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rig.start(THREE.replace("{L7}", "{pool: {warmup: eager, min_idle: 1}}"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(s.connections < 3 for s in rig.servers.values()):
            time.sleep(0.1)
        assert all(s.connections >= 3 for s in rig.servers.values()), \
            "each closed warm connection is re-opened without a request asking for it"
        assert get(rig.conn())[0] == 200
    finally:
        rig.close()


def test_head_answers_keep_both_connections_usable(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    conn = rig.conn()
    for _ in range(12):
        status, headers, body = get(conn, "/", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        assert get(conn)[0] == 200
    assert sum(s.connections for s in rig.servers.values()) <= 3, "HEAD answers left the pool usable"


def test_http_1_0_client_gets_its_answer_and_a_close(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    out = raw(rig, b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b" /x\n")
    assert b"\r\nConnection: close\r\n" in out


CACHED = "{cache: {max_bytes: 1048576}}"


def test_cache_answers_fresh_gets_and_honours_no_store_and_private(rig: Rig):
    rig.start(THREE.replace("{L7}", CACHED).replace("weight: 3", "weight: 1").replace("weight: 2", "weight: 1"))
    conn = rig.conn()
    def hits() -> int:
        return sum(len(s.seen) for s in rig.servers.values())
    for path, cacheable in (("/cc/max-age=60", True), ("/cc/no-store,max-age=60", False),
                            ("/cc/private,max-age=60", False), ("/cc/none", False)):
        before = hits()
        bodies = {get(conn, path)[2] for _ in range(5)}
        assert (len(bodies) == 1) == cacheable, path
        assert hits() - before == (1 if cacheable else 5), path
    status, headers, body = get(conn, "/cc/max-age=60", method="HEAD")
    assert status == 200 and body == b"" and "age" in headers
    assert hits() == 1 + 5 + 5 + 5, "HEAD is answered from the cached GET"
    t = rig.totals_when(lambda t: sum(t["cache_hits"].values()) >= 5)
    assert sum(t["cache_hits"].values()) == 5 and sum(t["cache_misses"].values()) == 16


def test_cache_entries_expire_with_max_age(rig: Rig):
    rig.start(THREE.replace("{L7}", CACHED))
    conn = rig.conn()
    get(conn, "/cc/max-age=1")
    before = sum(len(s.seen) for s in rig.servers.values())
    get(conn, "/cc/max-age=1")
    assert sum(len(s.seen) for s in rig.servers.values()) == before
    time.sleep(1.2)     # max-age is in seconds: the entry must be stale now
    get(conn, "/cc/max-age=1")
    assert sum(len(s.seen) for s in rig.servers.values()) == before + 1


def test_pool_off_opens_a_connection_per_request_and_says_close(rig: Rig):
    rig.start(THREE.replace("{L7}", "{pool: {enabled: false}}"))
    conn = rig.conn()
    for _ in range(30):
        assert get(conn)[0] == 200
    assert sum(s.connections for s in rig.servers.values()) == 30, "no upstream connection reused"
    assert all(seen["connection"] == "close" for s in rig.servers.values() for seen in s.seen)
    t = rig.totals_when(lambda t: sum(t["requests"].values()) >= 30)
    assert sum(t["upstream_connects"].values()) == 30 and not sum(t["upstream_reuses"].values())


def test_a_pooled_get_past_the_read_timeout_gets_504_and_the_next_one_is_served(tmp_path: Path):
    # One backend, so the timed-out GET has nowhere else to go; the first GET leaves an idle
    # pooled connection, so the second goes the fast path (answered from callbacks).
    r = Rig(tmp_path, ["a"])
    try:
        r.start("vips:\n  - vip: '@VIP'\n    mode: l7\n    l7: {limits: {read_timeout: 300ms}}\n"
                "    backends: [{addr: '@a'}]\n")
        assert get(r.conn())[0] == 200
        status, headers, body = get(r.conn(), "/slow")
        assert status == 504 and headers.get("connection") == "close", (status, headers)
        assert b"response timeout" in body
        assert get(r.conn())[0] == 200
    finally:
        r.close()


def test_a_connection_header_naming_a_header_in_the_answer_drops_it(tmp_path: Path):
    class Naming(Handler):
        def do_GET(self) -> None:
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "X-Hop")
            self.send_header("X-Hop", "1")
            self.send_header("X-Kept", "1")
            self.end_headers()
            self.wfile.write(body)

    r = Rig(tmp_path, [])
    r.servers["a"] = CountingServer("a", Naming)
    threading.Thread(target=r.servers["a"].serve_forever, daemon=True).start()
    try:
        r.start("vips:\n  - vip: '@VIP'\n    mode: l7\n    backends: [{addr: '@a'}]\n")
        conn = r.conn()
        for _ in range(3):      # the first opens the pooled connection, the rest reuse it
            status, headers, body = get(conn)
            assert (status, body) == (200, b"ok")
            assert "x-hop" not in headers and headers.get("x-kept") == "1", headers
    finally:
        r.close()


def test_idle_client_connections_close_after_the_keepalive_timeout(rig: Rig):
    rig.start(THREE.replace("{L7}", "{limits: {keepalive_timeout: 500ms}}"))
    assert get(rig.conn())[0] == 200          # pools a connection: the next GET goes the fast path
    silent = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
    served = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
    try:
        served.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b" /\n"):       # head and body may come in two reads
            answer += served.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        assert silent.recv(100) == b"", "a connection that never sends a request is closed"
        assert served.recv(100) == b"", "an idle keep-alive connection is closed"
    finally:
        silent.close()
        served.close()


def test_a_client_that_half_closes_after_its_request_gets_the_answer(rig: Rig):
    rig.start(THREE.replace("{L7}", "{}"))
    assert get(rig.conn())[0] == 200
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as s:
            s.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b" /half\n"), answer


RAW_ANSWERS = {
    # Hop-by-hop headers in any case, among end-to-end ones written as servers write them.
    "/mixed": b"HTTP/1.1 200 OK\r\nCONNECTION: Keep-Alive\r\nX-A:1\r\nkeep-alive: timeout=5\r\n"
              b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nContent-Length: 2\r\n"
              b"X-B: two words \r\nX-Connection-Id: 7\r\n\r\nok",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-C: 3\r\n\r\n"
                b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n",
    "/bare": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz",
    "/named": b"HTTP/1.1 201 Created\r\nConnection: close-me, keep-alive\r\nClose-Me: 1\r\n"
              b"Content-Length: 1\r\nX-D: 4\r\n\r\ny",
}


def test_answer_heads_lose_exactly_their_hop_by_hop_headers(tmp_path: Path):
    """The fast path rewrites an answer's head on its bytes: every hop-by-hop header goes,
    whatever its case, and nothing else does (a header whose name only contains one stays)."""
    class Raw(Handler):
        def do_GET(self) -> None:
            self.wfile.write(RAW_ANSWERS[self.path])

    r = Rig(tmp_path, [])
    r.servers["a"] = CountingServer("a", Raw)
    threading.Thread(target=r.servers["a"].serve_forever, daemon=True).start()
    hop = {"connection", "keep-alive", "proxy-connection", "trailer", "transfer-encoding", "close-me"}
    try:
        r.start("vips:\n  - vip: '@VIP'\n    mode: l7\n    backends: [{addr: '@a'}]\n")
        conn = r.conn()
        for _ in range(2):      # the second round on a pooled connection: the fast path
            status, headers, body = get(conn, "/mixed")
            assert (status, body) == (200, b"ok")
            assert not hop & set(headers), headers
            assert (headers["x-a"], headers["x-b"].strip(), headers["x-connection-id"]) == ("1", "two words", "7")
            assert headers["content-length"] == "2"
            status, headers, body = get(conn, "/chunked")
            assert (status, body, headers["x-c"]) == (200, b"abcde", "3")
            status, headers, body = get(conn, "/bare")
            assert (status, body, headers["content-length"]) == (200, b"z", "1")
            status, headers, body = get(conn, "/named")
            assert (status, body, headers["x-d"]) == (201, b"y", "4")
            assert not hop & set(headers), headers
        assert r.servers["a"].connections == 1, "every answer left the upstream connection reusable"
    finally:
        r.close()
