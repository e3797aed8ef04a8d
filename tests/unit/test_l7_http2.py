"""HTTP/2 from clients against the L7 proxy on loopback (no root), with real clients: curl
(nghttp2) for many streams on one connection, and a small client driven by the h2 library where
a test must hold flow control or watch frames (GOAWAY, a stalled reader). Backends are the
real HTTP/1.1 servers of test_l7_proxy."""
from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from test_l7_proxy import THREE, CountingServer, Handler, Rig

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="needs curl (lbctl/setup.sh test installs it)")

BIG_CHUNK = 64 * 1024


class BigHandler(Handler):
    """Handler plus GET /big/N: N bytes written 64 KiB at a time, progress kept on the server;
    and PUT (a body of unannounced length) hashed like POST."""

    def do_GET(self) -> None:
        if not self.path.startswith("/big/"):
            super().do_GET()
            return
        size = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("X-Backend", self.server.name)
        self.end_headers()
        chunk = b"z" * BIG_CHUNK
        sent = 0
        try:
            while sent < size:
                n = min(BIG_CHUNK, size - sent)
                self.wfile.write(chunk[:n])
                sent += n
                self.server.big_sent = sent  # type: ignore[attr-defined]
        except OSError:
            pass

    do_PUT = Handler.do_POST


class BigRig(Rig):
    def __init__(self, tmp: Path, names: list[str]):
        self.tmp = tmp
        self.servers = {n: CountingServer(n, BigHandler) for n in names}
        for srv in self.servers.values():
            srv.big_sent = 0  # type: ignore[attr-defined]
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.sup = None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[BigRig]:
    r = BigRig(tmp_path, ["a", "b", "c"])
    yield r
    r.close()


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    c, k = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(k), "-out", str(c)],
                   check=True, capture_output=True)
    return c, k


def tls_block(cert: tuple[Path, Path], extra: str = "") -> str:
    return f"{{tls: {{cert: {cert[0]}, key: {cert[1]}}}{extra}}}"


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


def parallel(base: str, count: int, *flags: str) -> list[list[str]]:
    """`count` GETs as concurrent streams; per transfer: HTTP version, status, new connections
    made for it, and the X-Backend that answered."""
    argv = [*flags, "--parallel", "--parallel-max", str(count),
            "-w", "%{http_version} %{response_code} %{num_connects} %header{x-backend}\\n"]
    for i in range(count):
        argv += ["-o", "/dev/null", f"{base}/req{i}"]
    proc = curl(*argv)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


class H2Client:
    """A minimal HTTP/2 client on the h2 library: it acknowledges DATA only when told to, so a
    test can stall a download and watch the proxy hold back."""

    def __init__(self, port: int, tls: bool = False, auto_ack: bool = True):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
            assert sock.selected_alpn_protocol() == "h2"
        self.sock = sock
        self.auto_ack = auto_ack
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                          header_encoding=None))
        self.conn.initiate_connection()
        self.flush()
        self.status: dict[int, int] = {}
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.body: dict[int, int] = Counter()
        self.digest: dict[int, hashlib._Hash] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def get(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                     (b":authority", b"localhost"), (b":path", path.encode())],
                               end_stream=True)
        self.flush()
        return sid

    def pump(self) -> bool:
        """Reads once and handles what came; False when the proxy closed the connection."""
        data = self.sock.recv(65536)
        if not data:
            return False
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                self.headers[ev.stream_id] = dict(ev.headers)
                self.status[ev.stream_id] = int(self.headers[ev.stream_id][b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.body[ev.stream_id] += len(ev.data)
                self.digest.setdefault(ev.stream_id, hashlib.sha256()).update(ev.data)
                if self.auto_ack:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.reset[ev.stream_id] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        self.flush()
        return True

    def until(self, cond, what: str, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            if not self.pump():
                assert cond(), f"connection closed before {what}"
                return

    def close(self) -> None:
        self.sock.close()


def test_http2_over_tls_many_streams_on_one_connection_spread_by_weight(rig: BigRig, cert):
    rig.start(THREE.replace("{L7}", tls_block(cert)))
    rows = parallel(f"https://127.0.0.1:{rig.port}", 60, "--http2", "-k")
    assert len(rows) == 60
    assert {(r[0], r[1]) for r in rows} == {("2", "200")}, "every stream answered over HTTP/2"
    assert sum(int(r[2]) for r in rows) == 1, "all 60 streams shared one TCP connection"
    assert Counter(r[3] for r in rows) == {"a": 30, "b": 20, "c": 10}
    seen = rig.servers["a"].seen[-1]
    assert seen["x-forwarded-proto"] == "https" and "proto=https" in seen["forwarded"]
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["host"] == f"127.0.0.1:{rig.port}"
    t = rig.totals_when(lambda t: sum(t.get("responses", {}).values()) >= 60)
    assert sum(t["requests"].values()) == 60
    assert sum(t["http2_connections"].values()) == 1
    assert sum(n for (_, code), n in t["responses"].items() if code == "200") == 60


def test_http2_cleartext_prior_knowledge_and_http11_share_a_plain_port(rig: BigRig):
    rig.start(THREE.replace("{L7}", "{}"))
    # Debian 12's curl 7.88 cannot reuse an h2c prior-knowledge connection (curl issue 10634,
    # fixed in 8.0): many streams on one h2c connection come from the h2 client instead.
    client = H2Client(rig.port)
    try:
        sids = [client.get(f"/c{i}") for i in range(12)]
        client.until(lambda: client.ended.issuperset(sids), "12 streams")
        assert {client.status[sid] for sid in sids} == {200}
        assert Counter(client.headers[sid][b"x-backend"] for sid in sids) == {b"a": 6, b"b": 4, b"c": 2}
    finally:
        client.close()
    single = curl("--http2-prior-knowledge", "-w", " %{http_version}", f"http://127.0.0.1:{rig.port}/one")
    assert single.stdout.endswith(" /one\n 2")
    conn = rig.conn()
    conn.request("GET", "/plain")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.version == 11 and resp.read().endswith(b" /plain\n")


def test_http2_off_keeps_http11_only(rig: BigRig, cert):
    rig.start(THREE.replace("{L7}", tls_block(cert, ", http2: {tls: false}")))
    rows = parallel(f"https://127.0.0.1:{rig.port}", 3, "--http2", "-k")
    assert {(r[0], r[1]) for r in rows} == {("1.1", "200")}, "ALPN must not offer h2"


def test_http2_uploads_stream_with_and_without_a_length(rig: BigRig, tmp_path: Path):
    rig.start(THREE.replace("{L7}", "{}"))
    payload = tmp_path / "up.bin"
    payload.write_bytes(bytes(range(256)) * (6 * 4096))          # 6 MiB
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    url = f"http://127.0.0.1:{rig.port}/up"
    sized = curl("--http2-prior-knowledge", "--data-binary", f"@{payload}", url)
    assert sized.returncode == 0, sized.stderr
    assert sized.stdout == f"{6 * 1024 * 1024} {want}"
    # -T - sends no Content-Length: DATA frames of unannounced length go upstream chunked.
    with payload.open("rb") as stdin:
        unsized = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-T", "-", url],
                                 check=False, stdin=stdin, capture_output=True, text=True,
                                 timeout=120)
    assert unsized.returncode == 0, unsized.stderr
    assert unsized.stdout == f"{6 * 1024 * 1024} {want}"
    assert any(s.get("transfer-encoding") == "chunked" for srv in rig.servers.values()
               for s in srv.seen)


def test_http2_download_follows_the_clients_window_and_is_never_held_whole(rig: BigRig):
    rig.start(THREE.replace("{L7}", "{}"))
    size = 64 * 1024 * 1024
    client = H2Client(rig.port, auto_ack=False)
    try:
        sid = client.get(f"/big/{size}")
        # The client grants only HTTP/2's initial 64 KiB window and never opens it further.
        client.until(lambda: client.body[sid] >= 65_535, "the first window's worth")
        time.sleep(1.0)     # let the backend write all it can into the stalled chain
        sent = max(getattr(s, "big_sent", 0) for s in rig.servers.values())
        assert client.body[sid] == 65_535, "the proxy sent past the client's window"
        assert sent < size // 2, f"the backend wrote {sent} bytes: the proxy read past what it can pass on"
        client.auto_ack = True
        client.conn.acknowledge_received_data(client.body[sid], sid)
        client.flush()
        client.until(lambda: sid in client.ended, "the whole body")
        assert client.status[sid] == 200 and client.body[sid] == size
    finally:
        client.close()


def test_http2_limits_answer_with_their_status(rig: BigRig):
    rig.start(THREE.replace("{L7}", "{limits: {max_body_bytes: 1024, max_headers: 8}}"))
    url = f"http://127.0.0.1:{rig.port}/"
    big = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
               "--data-binary", "x" * 4096, url)
    assert big.stdout == "413", big.stderr
    many = ["-H" if i % 2 == 0 else f"X-H{i}: v" for i in range(24)]
    headers = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", *many, url)
    assert headers.stdout == "431"
    # The connection and the proxy serve on.
    assert curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", url).stdout == "200"


def test_http2_no_backend_gives_502_on_the_stream_only(rig: BigRig, cert):
    rig.start(THREE.replace("{L7}", tls_block(cert)).replace('"@b"', '"127.0.0.1:1"')
              .replace('"@c"', '"127.0.0.1:2"'))
    rig.servers["a"].shutdown()
    rig.servers["a"].server_close()
    rows = parallel(f"https://127.0.0.1:{rig.port}", 3, "--http2", "-k")
    assert {(r[0], r[1]) for r in rows} == {("2", "502")}
    assert sum(int(r[2]) for r in rows) == 1, "the errors were per stream: the connection stayed"


def test_http2_shutdown_sends_goaway_and_finishes_the_stream_in_flight(rig: BigRig, cert):
    rig.start(THREE.replace("{L7}", tls_block(cert)))
    idle = H2Client(rig.port, tls=True)
    try:
        first = idle.get("/")
        idle.until(lambda: first in idle.ended, "a first answer")
        # The h2 library as a client stops reading at GOAWAY, which RFC 9113 does not: the
        # stream in flight is curl's (nghttp2), the idle connection the h2 client's.
        slow = subprocess.Popen(["curl", "-sS", "--http2", "-k", "-w", " %{http_version} %{response_code}",
                                 f"https://127.0.0.1:{rig.port}/slow"], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any(s.slow_started.is_set() for s in rig.servers.values()):
            assert time.monotonic() < deadline, "the slow request never reached a backend"
            time.sleep(0.05)
        assert rig.sup is not None
        stopper = threading.Thread(target=rig.sup.stop)
        stopper.start()
        idle.until(lambda: idle.goaway is not None, "GOAWAY on the idle connection")
        assert idle.goaway is not None and idle.goaway.error_code == 0
        out, _ = slow.communicate(timeout=60)
        assert out.endswith(" /slow\n 2 200"), out
        stopper.join(30)
        rig.sup = None
    finally:
        idle.close()


def test_http2_requests_use_the_cache_like_http11_ones(rig: BigRig):
    rig.start(THREE.replace("{L7}", "{cache: {max_bytes: 1048576}}"))
    client = H2Client(rig.port)
    try:
        first = client.get("/cc/max-age=60")
        client.until(lambda: first in client.ended, "the first answer")
        second = client.get("/cc/max-age=60")
        client.until(lambda: second in client.ended, "the second answer")
    finally:
        client.close()
    assert client.status[first] == client.status[second] == 200
    assert client.digest[first].digest() == client.digest[second].digest(), "the cached body"
    assert b"age" in client.headers[second] and b"age" not in client.headers[first]
    assert sum(len(s.seen) for s in rig.servers.values()) == 1, "the second GET never left the proxy"
    t = rig.totals_when(lambda t: sum(t.get("cache_hits", {}).values()) >= 1)
    assert sum(t["cache_hits"].values()) == 1 and sum(t["cache_misses"].values()) == 1
