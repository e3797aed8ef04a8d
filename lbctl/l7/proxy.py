"""The L7 proxy's data path in one worker process: HTTP/1.1 client connections parsed with
httptools, per-request backend choice, keep-alive upstream pools (eager or lazy), forwarded
headers, streamed bodies, the limits table, passive ejection, retries and graceful drain."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httptools

from lbctl.l7.balance import (
    Rotation,
    Route,
    choose_group,
    cookie_value,
    host_of,
    least_outstanding,
    rendezvous,
)
from lbctl.l7.cache import ResponseCache, freshness_s, request_may_use
from lbctl.l7.stats import Stats

log = logging.getLogger("lbctl.l7")

READ_SIZE = 65536
# Hop-by-hop headers (RFC 9110 7.6.1 and the proxy ones): they describe one connection and
# must not cross the proxy. Headers named in Connection are dropped too.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class L7Settings:
    """One VIP's proxy settings as the worker receives them (L7Spec's fields, in seconds)."""

    balancing: str = "round_robin"
    hash_on: tuple[str, str] | None = None
    pool_enabled: bool = True
    pool_max_size: int = 64
    pool_min_idle: int = 0
    pool_idle_timeout_s: float = 60.0
    warmup: str = "lazy"
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 60.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_body_bytes: int = 10 * 1024 * 1024
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0
    drain_timeout_s: float = 10.0
    eject_failures: int = 5
    eject_cooldown_s: float = 10.0
    groups: dict[str, list[str]] = field(default_factory=dict)
    routes: list[tuple[str | None, str, list[tuple[str, int]]]] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    cache_max_bytes: int = 0
    cache_max_entry_bytes: int = 1024 * 1024


class HttpError(Exception):
    """A request the proxy answers itself (4xx/5xx with a short body)."""

    def __init__(self, status: int, why: str, close: bool = True):
        super().__init__(why)
        self.status, self.why, self.close = status, why, close


class _UpstreamFailed(Exception):
    """No response byte came back: retrying elsewhere is safe for what was not yet sent."""

    def __init__(self, why: str, connect: bool):
        super().__init__(why)
        self.connect = connect
        self.stale = False      # on a pooled connection: the server closed it as we sent


# -- upstream connections and their pools ---------------------------------------------------
class UpstreamConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        # A keep-alive connection the server closed while idle shows EOF here without a read
        # pending (the protocol feeds EOF to the reader); bytes waiting would be unsolicited.
        return not (self.reader.at_eof() or self.writer.is_closing() or len(self.reader._buffer))

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Keep-alive connections to one backend: at most max_size open, idle ones closed after
    idle_timeout (but min_idle are kept), eager pools opened at start and re-opened when closed."""

    def __init__(self, addr: str, port: int, settings: L7Settings, stats: Stats, vip: str, name: str):
        self.addr, self.port, self.settings, self.stats = addr, port, settings, stats
        self.vip, self.name = vip, name
        self.idle: deque[UpstreamConn] = deque()
        self.total = 0
        self.waiters: deque[asyncio.Future[UpstreamConn | None]] = deque()
        self.closed = False

    async def _open(self) -> UpstreamConn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.addr, self.port, limit=READ_SIZE),
                self.settings.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            why = "connect timeout" if isinstance(exc, asyncio.TimeoutError) else \
                f"connect: {exc.strerror or exc}"
            raise _UpstreamFailed(why, connect=True) from None
        self.stats.count("upstream_connects", self.vip, self.name)
        return UpstreamConn(reader, writer)

    async def acquire(self) -> tuple[UpstreamConn, bool]:
        """A connection and whether it was reused from the pool."""
        while self.idle:
            conn = self.idle.pop()      # the most recently used: its congestion window is warm
            if conn.usable():
                return conn, True
            self._discard(conn)
        if self.total >= self.settings.pool_max_size:
            fut: asyncio.Future[UpstreamConn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                handed = await asyncio.wait_for(fut, self.settings.connect_timeout_s)
            except asyncio.TimeoutError:
                raise _UpstreamFailed(f"pool full ({self.settings.pool_max_size} connections busy)",
                                      connect=True) from None
            if handed is not None:
                return handed, True
        self.total += 1
        try:
            return await self._open(), False
        except BaseException:
            self.total -= 1
            self._wake()
            raise

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        if reusable and self.settings.pool_enabled and not self.closed and conn.usable():
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(conn)
                    return
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: UpstreamConn) -> None:
        conn.close()
        self.total -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)     # a slot is free: the waiter opens a connection
                return

    async def maintain(self, eager: bool) -> None:
        """Drops idle connections the server closed or that idled too long, and (eager) keeps
        min_idle connections open."""
        now = time.monotonic()
        keep = self.settings.pool_min_idle
        for conn in list(self.idle):
            expired = now - conn.idle_since > self.settings.pool_idle_timeout_s and len(self.idle) > keep
            if expired or not conn.usable():
                self.idle.remove(conn)
                self._discard(conn)
        if eager and not self.closed:
            while self.total < keep:
                self.total += 1
                try:
                    conn = await self._open()
                except _UpstreamFailed:
                    self.total -= 1
                    return      # the backend is down; the next round tries again
                conn.idle_since = time.monotonic()
                self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self._discard(self.idle.pop())


# -- backends and one VIP -------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    addr: str
    port: int
    weight: int
    state: str                  # the file's: active | drain | down
    up: bool                    # the agent's active checks
    pool: Pool
    outstanding: int = 0
    failures: int = 0           # consecutive connect failures or 5xx
    ejected_until: float = 0.0

    def available(self, now: float) -> bool:
        return self.state == "active" and self.up and now >= self.ejected_until


class VipProxy:
    """One VIP in one worker: its listening socket, backends, routes and client connections."""

    def __init__(self, vip: str, host: str, port: int, settings: L7Settings,
                 backends: list[dict[str, Any]], stats: Stats):
        self.vip, self.host, self.port, self.stats = vip, host, port, stats
        self.cache: ResponseCache | None = None
        self.backends: dict[str, Backend] = {}
        self.rotations: dict[str, Rotation] = {}
        self.routes: list[Route] = []
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.draining = False
        self._maint: asyncio.Task[None] | None = None
        self.update(settings, backends)

    def update(self, settings: L7Settings, backends: list[dict[str, Any]]) -> None:
        """New weights, states, health or routes without dropping a connection; pools of
        backends that stay are kept (their warm connections are the point)."""
        old_settings = getattr(self, "settings", None)
        self.settings = settings
        if old_settings is None or (old_settings.cache_max_bytes, old_settings.cache_max_entry_bytes) != \
                (settings.cache_max_bytes, settings.cache_max_entry_bytes) or not hasattr(self, "cache"):
            self.cache = ResponseCache(settings.cache_max_bytes, settings.cache_max_entry_bytes) \
                if settings.cache_max_bytes else None
        keep: dict[str, Backend] = {}
        for b in backends:
            old = self.backends.get(b["name"])
            if old is not None and (old.addr, old.port) == (b["addr"], b["port"]):
                old.weight, old.state, old.up = b["weight"], b["state"], b["up"]
                old.pool.settings = settings
                keep[b["name"]] = old
            else:
                keep[b["name"]] = Backend(b["name"], b["addr"], b["port"], b["weight"], b["state"],
                                          b["up"], Pool(b["addr"], b["port"], settings, self.stats,
                                                        self.vip, b["name"]))
        for name, old in self.backends.items():
            if name not in keep:
                old.pool.close()
        self.backends = keep
        self.routes = [Route(h, p, list(s)) for h, p, s in settings.routes]
        self.rotations = {}

    async def start(self, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: client_protocol(self), self.host, self.port, reuse_port=True, backlog=4096,
            ssl=ssl_context)
        self._maint = asyncio.create_task(self._maintain())

    async def _maintain(self) -> None:
        while True:
            eager = self.settings.warmup == "eager"
            for b in list(self.backends.values()):
                # Eager pools warm only backends that may take requests; a backend the file or
                # the checks took out keeps no connections open to it.
                await b.pool.maintain(eager and b.state == "active" and b.up)
            await asyncio.sleep(0.5)

    def candidates(self, host: str, path: str) -> list[Backend]:
        for i, route in enumerate(self.routes):
            if route.matches(host, path):
                group = choose_group(route)
                names = self.settings.groups.get(group, [])
                key = f"route{i}/{group}"
                self._current_key = key
                return [self.backends[n] for n in names if n in self.backends]
        self._current_key = "*"
        return list(self.backends.values())

    def pick(self, members: list[Backend], key: str, headers: dict[bytes, list[bytes]],
             exclude: set[str]) -> Backend | None:
        now = time.monotonic()
        pool = [m for m in members if m.name not in exclude]
        if not any(m.available(now) for m in pool):
            # Every backend ejected or failing checks: use the active ones anyway rather than
            # refuse everything (the agent keeps its last healthy set for the same reason).
            pool = [_Forced(m) for m in pool if m.state == "active"]  # type: ignore[misc]
        rotation = self.rotations.setdefault(key, Rotation())
        s = self.settings
        chosen: Any
        if s.balancing == "least_outstanding":
            chosen = least_outstanding(pool, now, rotation)
        elif s.balancing == "hash" and s.hash_on is not None:
            kind, name = s.hash_on
            value = (headers.get(name.encode(), [None])[0] if kind == "header"
                     else cookie_value(headers.get(b"cookie", []), name))
            chosen = rendezvous(pool, now, value) if value else rotation.pick(pool, now)
        else:
            chosen = rotation.pick(pool, now)
        return chosen.backend if isinstance(chosen, _Forced) else chosen

    def note_result(self, b: Backend, failed: bool) -> None:
        if not failed:
            b.failures = 0
            return
        b.failures += 1
        if b.failures >= self.settings.eject_failures and time.monotonic() >= b.ejected_until:
            b.ejected_until = time.monotonic() + self.settings.eject_cooldown_s
            b.failures = 0
            self.stats.count("ejections", self.vip, b.name)
            log.warning("backend %s of L7 VIP %s ejected for %.1fs after %d consecutive failures",
                        b.name, self.vip, self.settings.eject_cooldown_s, self.settings.eject_failures)

    async def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def drain(self) -> None:
        """Stops accepting, lets requests in flight finish (up to drain_timeout), closes idle
        client connections, then the pools."""
        self.draining = True
        await self.stop_listening()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        for c in list(self.connections):
            c.close_when_idle()
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            c.abort()
        if self._maint is not None:
            self._maint.cancel()
        for b in self.backends.values():
            b.pool.close()


@dataclass
class _Forced:
    """A backend offered although unavailable (all of them are): available() says yes."""

    backend: Backend

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def weight(self) -> int:
        return self.backend.weight

    @property
    def outstanding(self) -> int:
        return self.backend.outstanding

    def available(self, now: float) -> bool:
        return True


# -- client connections ---------------------------------------------------------------------
class _Events:
    """httptools callbacks turned into a queue of ('head', ...), ('body', bytes), ('end',):
    the connection's coroutine consumes them, reading more only when the queue is empty, so
    at most one read's worth of a client's bytes is ever held."""

    def __init__(self, max_headers: int | None = None, response: bool = False,
                 max_header_bytes: int | None = None):
        self.max_header_bytes = max_header_bytes
        self.pending_head_bytes = 0
        self.parser: Any = None
        self.response = response
        self.queue: deque[tuple[Any, ...]] = deque()
        self.max_headers = max_headers
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = False
        self.head_size = 0

    def on_message_begin(self) -> None:
        self.url, self.headers, self.in_head, self.head_size = b"", [], True, 0
        self.pending_head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.max_headers is not None and len(self.headers) > self.max_headers:
            raise HttpError(431, f"more than {self.max_headers} headers")

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.max_header_bytes is not None and self.head_size + len(self.url) > self.max_header_bytes:
            raise HttpError(431, f"header section over {self.max_header_bytes} bytes")
        # Read here: once the message is complete llhttp resets what these report.
        p = self.parser
        if self.response:
            self.queue.append(("head", self.url, self.headers, p.get_status_code(), p.should_keep_alive()))
        else:
            self.queue.append(("head", self.url, self.headers, p.get_method().decode("latin-1"),
                               p.should_keep_alive(), p.get_http_version()))

    def on_body(self, body: bytes) -> None:
        self.queue.append(("body", body))

    def on_message_complete(self) -> None:
        self.queue.append(("end",))


def client_protocol(vip: VipProxy) -> asyncio.StreamReaderProtocol:
    """A stream protocol whose connection runs ClientConnection.run as its own task."""
    reader = asyncio.StreamReader(limit=READ_SIZE)
    return asyncio.StreamReaderProtocol(
        reader, lambda r, w: ClientConnection(vip, r, w).run())


class ClientConnection:
    def __init__(self, vip: VipProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.vip, self.reader, self.writer = vip, reader, writer
        self.settings = vip.settings
        self.events = _Events(self.settings.max_headers, max_header_bytes=self.settings.max_header_bytes)
        self.parser = httptools.HttpRequestParser(self.events)
        self.events.parser = self.parser
        peer = writer.get_extra_info("peername") or ("", 0)
        self.client_addr = peer[0]
        self.tls = writer.get_extra_info("sslcontext") is not None
        self.busy = False
        self.closing = False
        self.eof = False

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy:
            self.abort()

    def abort(self) -> None:
        self.writer.close()

    async def run(self) -> None:
        self.vip.connections.add(self)
        self.vip.stats.gauge_add("client_connections", self.vip.vip, 1)
        try:
            while not self.closing:
                head = await self._next_head()
                if head is None:
                    return
                self.busy = True
                self.vip.in_flight += 1
                try:
                    keep = await self._serve(head)
                finally:
                    self.busy = False
                    self.vip.in_flight -= 1
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.vip.connections.discard(self)
            self.vip.stats.gauge_add("client_connections", self.vip.vip, -1)
            with contextlib.suppress(Exception):
                self.writer.close()

    async def _feed(self, timeout_s: float) -> bool:
        """Reads once and parses; False at EOF. Parse errors become HttpError."""
        data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout_s)
        if not data:
            self.eof = True
            return False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, HttpError):
                raise cause from None
            raise HttpError(400, f"bad request: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise HttpError(400, "protocol upgrades are not proxied") from None
        except httptools.HttpParserError as exc:
            raise HttpError(400, f"malformed request: {exc}") from None
        if self.events.in_head:
            # A head still incomplete: count what it has sent so far, so an endless header
            # section is refused without being held.
            self.events.pending_head_bytes += len(data)
            if self.events.pending_head_bytes > self.settings.max_header_bytes:
                raise HttpError(431, f"header section over {self.settings.max_header_bytes} bytes")
        return True

    async def _next_head(self) -> tuple[Any, ...] | None:
        """The next request's head, or None when the client closes or idles out. A client
        that starts a request must finish its headers within header_timeout (slowloris)."""
        deadline: float | None = None
        while True:
            if self.events.queue:
                ev = self.events.queue.popleft()
                if ev[0] == "head":
                    return ev
                continue
            started = self.events.in_head
            if started and deadline is None:
                deadline = time.monotonic() + self.settings.header_timeout_s
            timeout = (deadline - time.monotonic()) if deadline is not None else \
                self.settings.keepalive_timeout_s
            try:
                if timeout <= 0 or not await self._feed(timeout):
                    return None
            except asyncio.TimeoutError:
                return None
            except HttpError as exc:
                await self._answer_error(exc)
                return None
            if deadline is None and (self.events.in_head or self.events.queue):
                deadline = time.monotonic() + self.settings.header_timeout_s

    async def _body_event(self) -> tuple[Any, ...]:
        while not self.events.queue:
            if not await self._feed(self.settings.keepalive_timeout_s):
                raise ConnectionResetError("client closed mid-body")
        ev = self.events.queue.popleft()
        return ev

    async def _answer_error(self, exc: HttpError, keep: bool = False) -> None:
        self.vip.stats.count_response(self.vip.vip, exc.status)
        reason = REASONS.get(exc.status, "Error")
        body = f"{exc.status} {reason}: {exc.why}\n".encode()
        head = (f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n{'' if keep else 'Connection: close' + chr(13) + chr(10)}"
                "\r\n").encode()
        with contextlib.suppress(Exception):
            self.writer.write(head + body)
            await self.writer.drain()

    async def _serve(self, head: tuple[Any, ...]) -> bool:
        """One request from head to the last byte of its response; True to keep the client
        connection for the next one."""
        started = time.monotonic()
        _, url, raw_headers, method, keep_alive, version = head
        client_keep = keep_alive and not self.closing and not self.vip.draining
        client_11 = version == "1.1"
        stats, vipname = self.vip.stats, self.vip.vip
        stats.count("requests", vipname)
        headers: dict[bytes, list[bytes]] = {}
        for name, value in raw_headers:
            headers.setdefault(name.lower(), []).append(value)
        try:
            body_kind, length = self._framing(headers)
        except HttpError as exc:
            await self._answer_error(exc)
            return False
        if b"100-continue" in b",".join(headers.get(b"expect", [])).lower():
            # Answered here (the limit is ours to check) and not forwarded, so no 1xx comes back.
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        host = host_of(headers.get(b"host", [b""])[0])
        path = url.split(b"?", 1)[0].decode("latin-1")
        if not path.startswith("/") and path != "*":
            parsed = httptools.parse_url(url)
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            path = (parsed.path or b"/").decode("latin-1")
        cache_key = None
        if self.vip.cache is not None and request_may_use(method, headers):
            cache_key = (host, url)
            entry = self.vip.cache.get(cache_key)
            if entry is not None:
                stats.count("cache_hits", vipname)
                await self._answer_cached(entry, method, client_keep, started)
                return client_keep
            stats.count("cache_misses", vipname)
        members = self.vip.candidates(host, path)
        key = self.vip._current_key
        upstream_head = self._upstream_head(method, url, raw_headers, headers, body_kind, length)
        tried: set[str] = set()
        retryable_send = method in IDEMPOTENT and body_kind == "none"
        same: Backend | None = None
        stale_retries = 0
        while True:
            backend = same or self.vip.pick(members, key, headers, tried)
            same = None
            if backend is None:
                await self._answer_error(HttpError(503, "no backend available for this request",
                                                   close=False), keep=client_keep)
                await self._skip_body(body_kind)
                return client_keep
            tried.add(backend.name)
            backend.outstanding += 1
            try:
                keep = await self._exchange(backend, method, upstream_head, body_kind, client_keep,
                                            client_11, started, cache_key)
                return keep
            except _UpstreamFailed as exc:
                if exc.stale and retryable_send and stale_retries < 3:
                    # A keep-alive connection the backend closed just as the request went out
                    # says nothing about the backend: try it again on a fresh connection.
                    stale_retries += 1
                    same = backend
                    continue
                self.vip.note_result(backend, failed=True)
                again = (exc.connect or retryable_send) and len(tried) < min(len(members), 3)
                if again:
                    stats.count("retries", vipname, backend.name)
                    continue
                status = 504 if "timeout" in str(exc) and not exc.connect else 502
                await self._answer_error(HttpError(status, f"backend {backend.name}: {exc}"),
                                         keep=False)
                return False
            finally:
                backend.outstanding -= 1

    def _framing(self, headers: dict[bytes, list[bytes]]) -> tuple[str, int]:
        te = b",".join(headers.get(b"transfer-encoding", [])).lower()
        cl = headers.get(b"content-length", [])
        if te and cl:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if te:
            if te.strip() != b"chunked":
                raise HttpError(400, f"transfer-encoding {te.decode('latin-1')!r} is not chunked")
            return "chunked", -1
        if cl:
            values = {v.strip() for v in b",".join(cl).split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise HttpError(400, "bad Content-Length")
            length = int(next(iter(values)))
            if length > self.settings.max_body_bytes:
                raise HttpError(413, f"body of {length} bytes is over the limit of "
                                f"{self.settings.max_body_bytes}")
            return ("length", length) if length else ("none", 0)
        return "none", 0

    def _upstream_head(self, method: str, url: bytes, raw: list[tuple[bytes, bytes]],
                       headers: dict[bytes, list[bytes]], body_kind: str, length: int) -> bytes:
        named = {t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")}
        out = [f"{method} ".encode() + url + b" HTTP/1.1\r\n"]
        xff = None
        for name, value in raw:
            low = name.lower()
            if low in HOP_BY_HOP or low in named or low in (b"content-length", b"expect"):
                continue
            if low == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
                continue
            if low in (b"x-forwarded-proto",):
                continue     # ours replaces the client's: only the proxy knows the real scheme
            out.append(name + b": " + value + b"\r\n")
        client = self.client_addr.encode()
        proto = b"https" if self.tls else b"http"
        out.append(b"X-Forwarded-For: " + (xff + b", " + client if xff else client) + b"\r\n")
        out.append(b"X-Forwarded-Proto: " + proto + b"\r\n")
        node = b'"[' + client + b']"' if b":" in client else client
        fwd = b"for=" + node + b";proto=" + proto
        if headers.get(b"host"):
            fwd += b";host=" + headers[b"host"][0]
        out.append(b"Forwarded: " + fwd + b"\r\n")
        if not self.settings.pool_enabled:
            out.append(b"Connection: close\r\n")   # the backend may end it too: nothing reuses it
        if body_kind == "length":
            out.append(f"Content-Length: {length}\r\n".encode())
        elif body_kind == "chunked":
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    async def _skip_body(self, body_kind: str) -> None:
        while body_kind != "none":
            ev = await self._body_event()
            if ev[0] == "end":
                return

    async def _answer_cached(self, entry: Any, method: str, client_keep: bool, started: float) -> None:
        age = int(time.monotonic() - entry.stored)
        lines = [b"HTTP/1.1 200 OK\r\n"] + [n + b": " + v + b"\r\n" for n, v in entry.headers]
        lines.append(f"Age: {age}\r\nContent-Length: {len(entry.body)}\r\n".encode())
        if not client_keep:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.writer.write(b"".join(lines) + (entry.body if method != "HEAD" else b""))
        await self.writer.drain()
        self.vip.stats.count_response(self.vip.vip, 200)
        self.vip.stats.observe_latency(self.vip.vip, time.monotonic() - started)

    async def _exchange(self, backend: Backend, method: str, upstream_head: bytes, body_kind: str,
                        client_keep: bool, client_11: bool, started: float,
                        cache_key: tuple[str, bytes] | None = None) -> bool:
        pool = backend.pool
        stats, vipname, s = self.vip.stats, self.vip.vip, self.settings
        conn, reused = await pool.acquire()
        if reused:
            stats.count("upstream_reuses", vipname, backend.name)
        reusable = False
        try:
            conn.writer.write(upstream_head)
            sent_body = 0
            if body_kind != "none":
                while True:
                    ev = await self._body_event()
                    if ev[0] == "end":
                        break
                    sent_body += len(ev[1])
                    if sent_body > s.max_body_bytes:
                        await self._answer_error(HttpError(413, "body over the limit of "
                                                           f"{s.max_body_bytes} bytes"))
                        return False
                    if body_kind == "chunked":
                        conn.writer.write(f"{len(ev[1]):x}\r\n".encode() + ev[1] + b"\r\n")
                    else:
                        conn.writer.write(ev[1])
                    await conn.writer.drain()
                if body_kind == "chunked":
                    conn.writer.write(b"0\r\n\r\n")
            try:
                await conn.writer.drain()
            except ConnectionError as exc:
                raise _UpstreamFailed(f"send: {exc}", connect=False) from None
            reusable, keep = await self._relay_response(conn, backend, method, client_keep, client_11,
                                                        started, cache_key)
            return keep
        except _UpstreamFailed as exc:
            exc.stale = reused and not exc.connect and "timeout" not in str(exc)
            raise
        finally:
            pool.release(conn, reusable)

    async def _relay_response(self, conn: UpstreamConn, backend: Backend, method: str,
                              client_keep: bool, client_11: bool, started: float,
                              cache_key: tuple[str, bytes] | None = None) -> tuple[bool, bool]:
        """(upstream reusable, client keep-alive). A cacheable GET answer is kept (up to the
        entry limit) while it streams, and stored once complete."""
        keep_body: list[bytes] | None = None
        kept = 0
        fresh_s = 0
        cache_headers: list[tuple[bytes, bytes]] = []
        stats, vipname, s = self.vip.stats, self.vip.vip, self.settings
        events = _Events(response=True)
        parser = httptools.HttpResponseParser(events)
        events.parser = parser
        got_bytes = 0
        head_buf = b""
        status = 0
        out_chunked = False
        resp_has_length = False
        no_body = False
        upstream_keep = False
        head_keep = False
        while True:
            if not events.queue:
                try:
                    data = await asyncio.wait_for(conn.reader.read(READ_SIZE),
                                                  s.read_timeout_s)
                except asyncio.TimeoutError:
                    if status == 0:
                        raise _UpstreamFailed("response timeout", connect=False) from None
                    raise ConnectionResetError("backend stalled mid-response") from None
                except ConnectionError as exc:
                    if status == 0 and got_bytes == 0:
                        raise _UpstreamFailed(f"read: {exc}", connect=False) from None
                    raise
                if not data:
                    if status == 0 and got_bytes == 0:
                        raise _UpstreamFailed("closed before responding", connect=False)
                    if status and not resp_has_length and not no_body:
                        events.queue.append(("end",))    # a body delimited by the close
                    else:
                        raise ConnectionResetError("backend closed mid-response")
                else:
                    got_bytes += len(data)
                    if status == 0:
                        head_buf += data
                    try:
                        parser.feed_data(data)
                    except httptools.HttpParserError as exc:
                        if status == 0:
                            raise _UpstreamFailed(f"bad response: {exc}", connect=False) from None
                        raise ConnectionResetError(f"bad response body: {exc}") from None
                    if status == 0 and events.queue and events.queue[0][0] == "head" and method == "HEAD":
                        end = head_buf.find(b"\r\n\r\n")
                        upstream_keep = events.queue[0][4] and end + 4 == len(head_buf)
                        events.queue.append(("end",))
                        # llhttp would wait for the Content-Length body a HEAD answer never has.
                        parser = httptools.HttpResponseParser(_Events(response=True))
                continue
            ev = events.queue.popleft()
            if ev[0] == "head":
                code = ev[3]
                if 100 <= code < 200:
                    continue      # interim answers are not forwarded (Expect is answered here)
                status = code
                head_keep = ev[4]
                self.vip.note_result(backend, failed=status >= 500)
                hdrs = ev[2]
                lower = {n.lower() for n, _ in hdrs}
                resp_has_length = b"content-length" in lower or b"transfer-encoding" in lower
                no_body = method == "HEAD" or status in (204, 304)
                named = {t.strip().lower() for n, v in hdrs if n.lower() == b"connection"
                         for t in v.split(b",")}
                lines = [f"HTTP/1.1 {status} ".encode() + (b"OK" if status == 200 else b"-") + b"\r\n"]
                for name, value in hdrs:
                    low = name.lower()
                    if low in HOP_BY_HOP or low in named:
                        continue
                    lines.append(name + b": " + value + b"\r\n")
                    if low not in (b"content-length", b"age"):
                        cache_headers.append((name, value))
                if cache_key is not None and method == "GET" and self.vip.cache is not None:
                    fresh_s = freshness_s(status, hdrs)
                    keep_body = [] if fresh_s > 0 else None
                chunked_up = any(n.lower() == b"transfer-encoding" for n, _ in hdrs)
                if not no_body and (chunked_up or not resp_has_length):
                    if client_11:
                        out_chunked = True
                        lines.append(b"Transfer-Encoding: chunked\r\n")
                    else:
                        client_keep = False     # an HTTP/1.0 client reads to the close
                if not client_keep:
                    lines.append(b"Connection: close\r\n")
                lines.append(b"\r\n")
                self.writer.write(b"".join(lines))
                stats.count_response(vipname, status)
                stats.observe_latency(vipname, time.monotonic() - started)
            elif ev[0] == "body":
                if keep_body is not None:
                    kept += len(ev[1])
                    if kept > self.settings.cache_max_entry_bytes:
                        keep_body = None      # too large to cache; it still streams
                    else:
                        keep_body.append(ev[1])
                if out_chunked:
                    self.writer.write(f"{len(ev[1]):x}\r\n".encode() + ev[1] + b"\r\n")
                else:
                    self.writer.write(ev[1])
                await self.writer.drain()
            else:
                if out_chunked:
                    self.writer.write(b"0\r\n\r\n")
                await self.writer.drain()
                if keep_body is not None and self.vip.cache is not None and cache_key is not None:
                    self.vip.cache.put(cache_key, cache_headers, b"".join(keep_body), fresh_s)
                if method != "HEAD":
                    upstream_keep = resp_has_length and head_keep and \
                        not len(conn.reader._buffer)
                return upstream_keep, client_keep


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

