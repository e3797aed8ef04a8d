"""The L7 proxy's C head parser (lbctl/l7/_heads.c) against httptools' path, byte for byte:
every request head it takes must give what httptools and forward_head give, and every answer
it takes must reach the client exactly as _FastExchange's httptools callbacks would send it,
with the upstream connection reused or not alike. Heads are generated from the shapes
clients and servers send and then mutated (case, whitespace, duplicates, bad bytes, splits)."""
from __future__ import annotations

import asyncio
import random
from typing import Any

import httptools
import pytest

from lbctl.config import L7Spec
from lbctl.l7 import proxy as P
from lbctl.l7.stats import Stats

heads = P._heads
pytestmark = pytest.mark.skipif(heads is None, reason="lbctl.l7._heads is not compiled (no gcc or "
                                "python3-dev at install); hint: bash lbctl/setup.sh")

CLIENT = b"10.1.0.2"
TAIL = P.forwarded_tail("10.1.0.2", False)


# ------------------------------------------------------------------ requests

class _Seen:
    """httptools' view of one request: its head, keep-alive as read when the head completes."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep: bool | None = None
        self.messages = 0
        self.parser: Any = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.messages += 1


def _httptools_request(data: bytes) -> _Seen | None:
    seen = _Seen()
    seen.parser = httptools.HttpRequestParser(seen)
    try:
        seen.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    return seen


REQUEST_LINES = [b"Host: 10.0.0.1:80", b"host: example.test", b"HOST: a", b"Host:b",
                 b"Host: \t spaced \t ", b"Host:", b"User-Agent: curl/7.88.1", b"Accept: */*",
                 b"Accept-Encoding: identity", b"X-Forwarded-For: 192.0.2.7",
                 b"x-forwarded-for: 198.51.100.1, 192.0.2.9", b"X-Forwarded-For:",
                 b"X-Forwarded-Proto: https", b"Connection: close", b"Connection: keep-alive",
                 b"connection: Keep-Alive", b"Connection: CLOSE", b"Connection: close, te",
                 b"Connection: x-private", b"Connection: upgrade", b"Keep-Alive: timeout=5",
                 b"TE: trailers", b"Trailer: x", b"Upgrade: h2c", b"Proxy-Connection: keep-alive",
                 b"Proxy-Authorization: Basic Zm9v", b"Cookie: a=1; b=2", b"X-O: \x80\xff",
                 b"Content-Length: 0", b"Transfer-Encoding: chunked", b"Expect: 100-continue",
                 b"X-Tab:\tv", b"X-Empty:", b"!#$%&'*+-.^_`|~09aZ: tokens"]
BAD_LINES = [b"X-Bad : v", b" folded", b"\tfolded", b"X-Nul: a\x00b", b"X-Del: a\x7fb",
             b"X-Ctl: a\x01b", b"No-Colon", b": no-name", b"X(y): v", b"X-Cr: a\rb"]
REQUEST_STARTS = [b"GET / HTTP/1.1", b"GET /a/b?c=d&e=%20f HTTP/1.1", b"GET /#frag HTTP/1.1",
                  b"GET /~!$&'()*+,;=:@ HTTP/1.1", b"GET / HTTP/1.0", b"HEAD / HTTP/1.1",
                  b"POST / HTTP/1.1", b"get / HTTP/1.1", b"GET http://a/ HTTP/1.1",
                  b"GET * HTTP/1.1", b"GET / HTTP/2.0", b"GET /\x80 HTTP/1.1", b"GET  / HTTP/1.1",
                  b"GET / HTTP/1.1 ", b"GET /a b HTTP/1.1"]


def _request(rng: random.Random) -> bytes:
    start = rng.choice(REQUEST_STARTS[:4]) if rng.random() < 0.7 else rng.choice(REQUEST_STARTS)
    lines = [rng.choice(REQUEST_LINES) for _ in range(rng.randint(0, 8))]
    if rng.random() < 0.1:
        lines.insert(rng.randint(0, len(lines)), rng.choice(BAD_LINES))
    data = start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    roll = rng.random()
    if roll < 0.05:
        data += b"GET / HTTP/1.1\r\n\r\n"             # a pipelined second request
    elif roll < 0.1:
        data = data[:rng.randint(0, len(data) - 1)]   # a head cut short
    elif roll < 0.2:
        i = rng.randrange(len(data))                  # one byte changed
        data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    elif roll < 0.25:
        data = data.replace(b"\r\n", b"\n", 1)
    return data


def _expected_request(data: bytes, pool: bool, max_headers: int, max_bytes: int) -> Any:
    """What the httptools path makes of the same bytes: the upstream head, host, keep-alive
    and URL, or None when it would not send them the fast way (or rejects them)."""
    seen = _httptools_request(data)
    if seen is None or seen.messages != 1 or not data.startswith(b"GET /"):
        return None
    made = P.forward_head(b"GET", seen.url, seen.headers, CLIENT, TAIL, pool, simple_only=True)
    if made is None:
        return None
    return made[0], made[1], seen.keep, seen.url


def test_request_heads_match_httptools_and_forward_head() -> None:
    rng = random.Random(7)
    taken = declined = 0
    for i in range(20_000):
        data = _request(rng)
        pool = i % 5 != 0
        got = heads.request(data, CLIENT, TAIL, pool, 100, 32 * 1024)
        if got is None:
            declined += 1
            continue
        taken += 1
        want = _expected_request(data, pool, 100, 32 * 1024)
        assert want is not None, f"C took a request httptools' fast path would not: {data!r}"
        assert got == want, data
    # Both sides of the subset are exercised: most generated heads are simple GETs.
    assert taken > 3_000 and declined > 3_000, (taken, declined)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n",                                   # wrk
    b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",   # curl
    b"GET /x HTTP/1.1\r\nHost: a\r\nAccept-Encoding: identity\r\n\r\n",              # http.client
    (b"GET /?q=1 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nCookie: s=1\r\n"
     b"Accept-Language: en\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"),
])
def test_the_requests_clients_send_take_the_c_path(data: bytes) -> None:
    got = heads.request(data, CLIENT, TAIL, True, 100, 32 * 1024)
    assert got is not None and got == _expected_request(data, True, 100, 32 * 1024)


def test_request_limits_leave_the_head_to_httptools() -> None:
    """Over max_headers or max_head_bytes the C path declines: httptools' path answers 431."""
    data = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n"
    assert heads.request(data, CLIENT, TAIL, True, 5, 1024) is not None
    assert heads.request(data, CLIENT, TAIL, True, 4, 1024) is None
    assert heads.request(data, CLIENT, TAIL, True, 5, len(data) - 1) is None


def test_bad_arguments_raise_not_crash() -> None:
    with pytest.raises(TypeError):
        heads.request("GET / HTTP/1.1\r\n\r\n", CLIENT, TAIL, True, 100, 1024)
    with pytest.raises(TypeError):
        heads.request(b"GET / HTTP/1.1\r\n\r\n", CLIENT, TAIL, True, 100)
    with pytest.raises(TypeError):
        heads.response(bytearray(b"HTTP/1.1 200 OK\r\n\r\n"), True)


# ------------------------------------------------------------------ answers

RESPONSE_STARTS = [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 Fine", b"HTTP/1.1 404 Not Found",
                   b"HTTP/1.1 500 Internal Server Error", b"HTTP/1.1 503 ", b"HTTP/1.1 201 \tx",
                   b"HTTP/1.1 299 \x80", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified",
                   b"HTTP/1.1 100 Continue", b"HTTP/1.0 200 OK", b"HTTP/1.1 600 X",
                   b"HTTP/1.1 2x0 X", b"HTTP/1.1 200", b"http/1.1 200 OK"]
RESPONSE_LINES = [b"Server: nginx/1.22.1", b"Date: Wed, 02 Dec 2026 09:00:00 GMT",
                  b"Content-Type: text/html", b"Last-Modified: Wed, 02 Dec 2026 08:00:00 GMT",
                  b"ETag: \"6569-3\"", b"Accept-Ranges: bytes", b"Connection: keep-alive",
                  b"connection: close", b"Connection: Keep-Alive", b"Connection: close, x-a",
                  b"Connection: x-a", b"X-A: named", b"Keep-Alive: timeout=5", b"Upgrade: h2c",
                  b"Trailer: x", b"Proxy-Authenticate: Basic", b"Transfer-Encoding: chunked",
                  b"Set-Cookie: a=1", b"X-Sp: \t v \t", b"X-Empty:", b"X-O: \x80"]


def _response(rng: random.Random) -> tuple[bytes, int]:
    """An answer's bytes and its body length (what Content-Length says, when it says it)."""
    start = RESPONSE_STARTS[0] if rng.random() < 0.5 else rng.choice(RESPONSE_STARTS)
    lines = [rng.choice(RESPONSE_LINES) for _ in range(rng.randint(0, 7))]
    length = rng.choice([0, 3, 1, 200, 70_000])
    cl = rng.random()
    if cl < 0.85:
        lines.insert(rng.randint(0, len(lines)), b"Content-Length: %d" % length)
    elif cl < 0.9:
        lines.append(rng.choice([b"Content-Length: +3", b"Content-Length: 3 ", b"Content-Length:",
                                 b"Content-Length: 3, 3", b"content-length: 03"]))
    if rng.random() < 0.05:
        lines.append(b"Content-Length: %d" % length)    # a second one
    if rng.random() < 0.05:
        lines.insert(rng.randint(0, len(lines)), rng.choice(BAD_LINES))
    body = bytes(rng.randrange(256) for _ in range(min(length, 64))) * (length // 64 + 1)
    return start + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n" + body[:length], length


class _T:
    """A transport that keeps what is written."""

    def __init__(self, peer: tuple[str, int] = ("10.1.0.2", 40000)):
        self.out: list[bytes] = []
        self.closed = False
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _exchange(use_c: bool, response_reads: list[bytes], client_keep: bool = True) -> tuple[Any, ...]:
    """One wrk-like GET through a VIP with one backend and one idle pooled connection, the
    answer fed in `response_reads`: what the client got, whether the connection went back to
    the pool, and the response counters."""
    async def run() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        saved = P._heads
        P._heads = heads if use_c else None
        try:
            backends = [{"name": "be1", "addr": "10.2.0.2", "port": 80, "weight": 1,
                         "state": "active", "up": True}]
            vip = P.VipProxy("v", "127.0.0.1", 80, P.L7Settings.of(L7Spec()), backends, Stats())
            reader = asyncio.StreamReader(loop=loop)
            proto = P._UpstreamProtocol(reader, loop=loop)
            conn = P.UpstreamConn(reader, asyncio.StreamWriter(_T(), proto, reader, loop), proto)
            backend = vip.members[0]
            backend.pool.idle.append(conn)
            backend.pool.total = 1
            client = P.ClientConnection(vip)
            client.connection_made(_T())
            request = b"GET / HTTP/1.1\r\nHost: a\r\n" + \
                (b"" if client_keep else b"Connection: close\r\n") + b"\r\n"
            client.data_received(request)
            assert client.fast is not None, "the request did not take the fast path"
            upstream = b"".join(conn.transport.out)
            for data in response_reads:
                if proto.sink is None:
                    break
                proto.data_received(data)
            if proto.sink is not None:
                proto.eof_received()        # the backend closes before the answer ends
            pooled = conn in backend.pool.idle
            out = b"".join(client.transport.out)
            return (out, pooled, client.transport.closed, upstream, dict(vip.counts.responses),
                    vip.counts.requests, backend.outstanding, vip.in_flight)
        finally:
            P._heads = saved
    return asyncio.run(run())


def test_answers_reach_the_client_as_httptools_path_sends_them() -> None:
    rng = random.Random(11)
    taken = declined = 0
    for i in range(8_000):
        data, _ = _response(rng)
        # Whole, or split in two or three reads (the C parser sees only the first).
        cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.choice([0, 0, 1, 2]))))
        reads = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        if rng.random() < 0.05:
            reads[-1] += b"HTTP/1.1 200 OK\r\n"           # bytes past the answer
        keep = i % 7 != 0
        if heads.response(reads[0], keep) is None:
            declined += 1
            continue
        taken += 1
        with_c = _exchange(True, reads, keep)
        without = _exchange(False, reads, keep)
        assert with_c == without, (reads, with_c, without)
    assert taken > 1_000 and declined > 1_000, (taken, declined)


def test_nginx_answer_takes_the_c_path_and_loses_only_connection() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/html\r\n"
              b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\nabc")
    got = heads.response(answer, True)
    client_head = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/html\r\n"
                   b"Content-Length: 3\r\n\r\n")
    assert got == (200, client_head + b"abc", 0, True, False)
    out, pooled, closed, *_ = _exchange(True, [answer])
    assert out == client_head + b"abc" and pooled and not closed
    # Two bytes of the body in this read, one to come; bytes past the answer are not sent.
    assert heads.response(answer[:-1], True) == (200, client_head + b"ab", 1, True, False)
    assert heads.response(answer + b"HTTP", True) == (200, client_head + b"abc", 0, True, True)
    # Said to close: answered, the client told, the upstream connection not kept.
    out, pooled, closed, *_ = _exchange(True, [answer.replace(b"keep-alive", b"close")], False)
    assert out.endswith(b"Connection: close\r\n\r\nabc") and not pooled and closed


def test_a_long_body_is_counted_over_reads() -> None:
    body = bytes(range(256)) * 400
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    reads = [answer[:50], answer[50:5000], answer[5000:]]
    assert heads.response(reads[0], True) is not None
    out, pooled, closed, *_ = _exchange(True, reads)
    assert out.endswith(body) and pooled and not closed
    # One byte short, then the backend closes: the client's connection is cut, not reused.
    out, pooled, closed, *_ = _exchange(True, [answer[:-1]])
    assert out.endswith(body[:-1]) and not pooled and closed

