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
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import httptools

from lbctl.config import L7Spec
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
from lbctl.l7.ejection import EjectionTable
from lbctl.l7.stats import BackendCounts, Stats

try:
    # The simple heads (a GET's, an answer's with a length) in one C call each; without the
    # compiled module (no compiler at install) httptools parses every head, as it does any
    # head these do not take.
    from lbctl.l7 import _heads
except ImportError:     # pragma: no cover - setup.sh installs the compiler; CI checks it
    _heads = None  # type: ignore[assignment]

log = logging.getLogger("lbctl.l7")

READ_SIZE = 65536
# Hop-by-hop headers (RFC 9110 7.6.1 and the proxy ones): they describe one connection and
# must not cross the proxy. Headers named in Connection are dropped too.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Request headers forward_head treats apart from the rest: the ones it rewrites, and those
# that send a request the general path (a body, or an answer of ours first).
_BODY_REQUEST_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect"})
_REQUEST_SPECIAL = HOP_BY_HOP | _BODY_REQUEST_HEADERS | {b"host", b"x-forwarded-for",
                                                         b"x-forwarded-proto"}
# Answer headers the fast path looks at as they arrive: the hop-by-hop ones and the length.
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length"}
_NO_EXCLUDE: frozenset[str] = frozenset()
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})


def _plain_connection(value: bytes) -> bool:
    """A Connection header that names no other header (keep-alive, close)."""
    low = value.lower()
    return low in _PLAIN_CONNECTION or all(t.strip() in _PLAIN_CONNECTION for t in low.split(b","))
REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _seconds(ms_field: str) -> cached_property[float]:
    return cached_property(lambda self: getattr(self, ms_field) / 1000)


@dataclass(frozen=True)
class L7Settings(L7Spec):
    """One VIP's proxy settings in a worker: the config's L7Spec itself (one definition of the
    fields and defaults), plus what the data path reads in its own units, computed once per
    settings object: durations in seconds (what the loop and time.monotonic() count in),
    groups as a mapping, routes as plain tuples."""

    connect_timeout_s = _seconds("connect_timeout_ms")
    drain_timeout_s = _seconds("drain_timeout_ms")
    eject_cooldown_s = _seconds("eject_cooldown_ms")
    header_timeout_s = _seconds("header_timeout_ms")
    keepalive_timeout_s = _seconds("keepalive_timeout_ms")
    pool_idle_timeout_s = _seconds("pool_idle_timeout_ms")
    read_timeout_s = _seconds("read_timeout_ms")

    @cached_property
    def group_members(self) -> dict[str, list[str]]:
        return {name: list(members) for name, members in self.groups}

    @classmethod
    def of(cls, spec: L7Spec) -> L7Settings:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(L7Spec)})


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
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 proto: _UpstreamProtocol):
        self.reader, self.writer, self.proto = reader, writer, proto
        self.transport = writer.transport
        self.fast: _FastExchange | None = None     # made on its first fast-path request
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        # A keep-alive connection the server closed while idle shows EOF here without a read
        # pending (the protocol feeds EOF to the reader); bytes waiting would be unsolicited.
        r = self.reader
        return not (r._eof or r._buffer or self.transport.is_closing())

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
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        proto = _UpstreamProtocol(reader, loop=loop)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: proto, self.addr, self.port),
                self.settings.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            why = "connect timeout" if isinstance(exc, asyncio.TimeoutError) else \
                f"connect: {exc.strerror or exc}"
            raise _UpstreamFailed(why, connect=True) from None
        self.stats.count("upstream_connects", self.vip, self.name)
        return UpstreamConn(reader, asyncio.StreamWriter(transport, proto, reader, loop), proto)

    def take_idle(self) -> UpstreamConn | None:
        """The most recently used idle connection (its congestion window is the warmest)."""
        while self.idle:
            conn = self.idle.pop()
            if conn.usable():
                return conn
            self._discard(conn)
        return None

    async def acquire(self) -> tuple[UpstreamConn, bool]:
        """A connection and whether it was reused from the pool."""
        conn = self.take_idle()
        if conn is not None:
            return conn, True
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
    eject_slot: int | None = None   # its slot in the workers' shared ejection table
    counts: BackendCounts = field(default_factory=BackendCounts)

    def available(self, now: float) -> bool:
        return self.state == "active" and self.up and now >= self.ejected_until


class VipProxy:
    """One VIP in one worker: its listening socket, backends, routes and client connections."""

    def __init__(self, vip: str, host: str, port: int, settings: L7Settings,
                 backends: list[dict[str, Any]], stats: Stats, ejection: EjectionTable | None = None):
        self.vip, self.host, self.port, self.stats = vip, host, port, stats
        self.counts = stats.vip(vip)
        # Bumped whenever a backend's availability may have changed other than by the clock
        # (a reload, an ejection): the round-robin cycles are made again.
        self.avail_generation = 0
        self.ejection = ejection
        self._eject_generation = -1
        self.cache: ResponseCache | None = None
        self.backends: dict[str, Backend] = {}
        self.rotations: dict[str, Rotation] = {}
        self.routes: list[Route] = []
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.draining = False
        self._maint: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
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
                                                        self.vip, b["name"]),
                                          counts=self.stats.backend(self.vip, b["name"]))
            keep[b["name"]].eject_slot = b.get("eject_slot") if self.ejection is not None else None
        for name, old in self.backends.items():
            if name not in keep:
                old.pool.close()
        self.backends = keep
        self.members = list(keep.values())
        self.routes = [Route(r.host, r.path_prefix, list(r.split)) for r in settings.routes]
        self.rotations = {}
        # The C request head carries no header list: balancing on a header needs httptools'.
        self.c_requests = _heads is not None and settings.balancing != "hash" and self.cache is None
        # The fast path's rotation when it needs no route or header to pick (the default VIP).
        self.plain_rotation = self.rotations.setdefault("*", Rotation()) \
            if settings.balancing == "round_robin" and not self.routes else None
        self._eject_generation = -1     # new backends: read their ejection times at the next pick
        self.avail_generation += 1

    async def start(self, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        from lbctl.l7.http2 import accepted_protocol  # http2 builds on this module

        tls = ssl_context is not None
        self.server = await loop.create_server(
            lambda: accepted_protocol(self, tls), self.host, self.port, reuse_port=True,
            backlog=4096, ssl=ssl_context)
        self._maint = asyncio.create_task(self._maintain())
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Timeouts of client waits and fast-path answers, checked four times a second: one
        timer for the VIP instead of one per read (the limits are seconds long)."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for c in list(self.connections):
                fast = c.fast
                if fast is not None:
                    if now >= fast.deadline:
                        fast.expire()
                elif c.deadline is not None and now >= c.deadline:
                    c.expire()

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
                names = self.settings.group_members.get(group, [])
                key = f"route{i}/{group}"
                self._current_key = key
                return [self.backends[n] for n in names if n in self.backends]
        self._current_key = "*"
        return list(self.backends.values())

    def pick(self, members: list[Backend], key: str, headers: dict[bytes, list[bytes]],
             exclude: set[str]) -> Backend | None:
        now = time.monotonic()
        if self.ejection is not None:
            self.sync_ejections()
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

    def sync_ejections(self) -> None:
        """Ejections are shared by the workers: after any (the table's generation moved), take
        every backend's ejection time from the table. One read a request otherwise."""
        table = self.ejection
        assert table is not None
        generation = table.generation()
        if generation != self._eject_generation:
            self._eject_generation = generation
            self.avail_generation += 1
            for b in self.members:
                if b.eject_slot is not None:
                    b.ejected_until = table.ejected_until(b.eject_slot)

    def note_result(self, b: Backend, failed: bool) -> None:
        table = self.ejection
        if table is not None and b.eject_slot is not None:
            if not failed:
                table.succeeded(b.eject_slot)
                return
            if not table.failed(b.eject_slot, self.settings.eject_failures,
                                self.settings.eject_cooldown_s):
                return
            b.ejected_until = table.ejected_until(b.eject_slot)
            self.avail_generation += 1
            self.stats.count("ejections", self.vip, b.name)
            log.warning("backend %s of L7 VIP %s ejected for %.1fs after %d consecutive failures "
                        "(counted over every worker)", b.name, self.vip,
                        self.settings.eject_cooldown_s, self.settings.eject_failures)
            return
        if not failed:
            b.failures = 0
            return
        b.failures += 1
        if b.failures >= self.settings.eject_failures and time.monotonic() >= b.ejected_until:
            b.ejected_until = time.monotonic() + self.settings.eject_cooldown_s
            b.failures = 0
            self.avail_generation += 1
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
        if self._sweeper is not None:
            self._sweeper.cancel()
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


def client_protocol(vip: VipProxy) -> ClientConnection:
    """The protocol of one accepted client connection (HTTP/1.1)."""
    return ClientConnection(vip)


def _parse_failure(exc: Exception) -> HttpError:
    """What a client's bytes that httptools refused are answered with."""
    if isinstance(exc, httptools.HttpParserCallbackError):
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, HttpError):
            return cause
        return HttpError(400, f"bad request: {exc}")
    if isinstance(exc, httptools.HttpParserUpgrade):
        return HttpError(400, "protocol upgrades are not proxied")
    return HttpError(400, f"malformed request: {exc}")


class _ClientWriter:
    """The StreamWriter calls the request coroutine makes, on the connection's own transport
    and flow control (pause_writing/resume_writing)."""

    def __init__(self, conn: ClientConnection):
        self.conn = conn

    def write(self, data: bytes) -> None:
        if not self.conn.lost:
            self.conn.transport.write(data)

    async def drain(self) -> None:
        c = self.conn
        if c.lost:
            raise ConnectionResetError("client closed the connection")
        if c.write_paused:
            fut = asyncio.get_running_loop().create_future()
            c.drain_waiters.append(fut)
            await fut

    def close(self) -> None:
        self.conn.transport.close()

    def is_closing(self) -> bool:
        return bool(self.conn.transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.conn.transport.get_extra_info(name, default)


class ClientConnection(asyncio.Protocol):
    """One client connection. Its bytes are parsed as they arrive; a request the fast path
    can take (a GET without a body, no cache, an idle pooled connection to the backend it
    picks) is forwarded and answered from the two sockets' callbacks (_FastExchange) without
    waking a coroutine; everything else (bodies, retries, waits for a connection, errors,
    the cache, timeouts) goes through the request coroutine `run`, which reads through
    `_feed`. Reading pauses while parsed events or unparsed bytes wait, so at most one read
    of a client's bytes is held."""

    def __init__(self, vip: VipProxy):
        self.vip = vip
        self.settings = vip.settings
        self.events = _Events(self.settings.max_headers, max_header_bytes=self.settings.max_header_bytes)
        self.parser = httptools.HttpRequestParser(self.events)
        self.events.parser = self.parser
        self.transport: Any = None
        self.writer = _ClientWriter(self)
        self.client_addr = ""
        self.tls = False
        self.forwarded_tail = b""
        self.client_bytes = b""
        self.busy = False
        self.closing = False
        self.eof = False
        self.lost = False
        self.pending: deque[bytes] = deque()
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.deadline: float | None = None       # loop time the coroutine's wait ends at
        # The coroutine waits for a new request (or has not started yet: a new connection's
        # first request often arrives before it runs): the fast path may take what comes.
        self.idle_wait = True
        self.parse_error: HttpError | None = None
        self.fast: _FastExchange | None = None
        self.prepicked: Backend | None = None    # chosen by the fast path, which could not go on
        self.pretried: tuple[str, ...] = ()
        self.replay = False                      # a request the fast path counted already
        self.task: asyncio.Task[None] | None = None

    # -- protocol callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.client_addr = peer[0]
        self.tls = transport.get_extra_info("sslcontext") is not None
        self.client_bytes = self.client_addr.encode()
        self.forwarded_tail = forwarded_tail(self.client_addr, self.tls)
        s = self.settings
        self.c_args = (self.client_bytes, self.forwarded_tail, s.pool_enabled, s.max_headers,
                       s.max_header_bytes)
        self.vip.connections.add(self)
        self.vip.stats.gauge_add("client_connections", self.vip.vip, 1)
        # No coroutine yet: requests the fast path takes never need one (it is started by
        # the first thing that does); until then the sweep closes the connection when idle.
        self.deadline = time.monotonic() + self.settings.keepalive_timeout_s

    def data_received(self, data: bytes) -> None:
        if self.idle_wait and self.fast is None and not self.pending:
            vip = self.vip
            events = self.events
            if vip.c_requests and not events.in_head and not events.queue:
                made = _heads.request(data, *self.c_args)
                if made is not None and not (self.closing or vip.draining):
                    if self._start_fast(*made, data):
                        return
                    # Not taken (the pick, if made, is kept for the coroutine): httptools
                    # parses the same bytes for the general path, without a second try.
                    self._parse_only(data)
                    return
            self._parse_now(data)
            return
        self.pending.append(data)
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        # Keep the sending side open: a client that half-closes after its request still gets
        # the answer (TLS transports cannot half-close).
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.eof = True
        self.vip.connections.discard(self)
        self.vip.stats.gauge_add("client_connections", self.vip.vip, -1)
        if self.fast is not None:
            self.fast.client_lost()
        self._wake()
        for fut in self.drain_waiters:
            if not fut.done():
                fut.set_exception(ConnectionResetError("client closed the connection"))
        self.drain_waiters.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for fut in self.drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self.drain_waiters.clear()
        if self.fast is not None:
            self.fast.client_writable()

    # -- the parts both paths share
    def _wake(self) -> None:
        """Has the request coroutine look at what arrived (starting it the first time)."""
        if self.task is None:
            if not self.lost:
                self.task = asyncio.get_running_loop().create_task(self.run())
            return
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def expire(self) -> None:
        """The coroutine's wait (or, without a coroutine, the idle keep-alive connection) ran
        past its deadline (checked by VipProxy's sweep)."""
        if self.task is None:
            self.deadline = None
            self.transport.close()
            return
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(asyncio.TimeoutError())

    def _parse_now(self, data: bytes) -> None:
        """Parses bytes that arrived while the coroutine waits for a request; a complete
        simple request goes the fast path, anything else wakes the coroutine."""
        events = self.events
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.parse_error = _parse_failure(exc)
        else:
            if events.in_head:
                events.pending_head_bytes += len(data)
                if events.pending_head_bytes > self.settings.max_header_bytes:
                    self.parse_error = HttpError(
                        431, f"header section over {self.settings.max_header_bytes} bytes")
            q = events.queue
            if len(q) == 2 and q[1][0] == "end" and q[0][0] == "head" and self._try_fast(q[0]):
                q.clear()
                return
        self._wake()

    def _parse_only(self, data: bytes) -> None:
        """httptools' events for bytes the coroutine is to serve (a request the fast path
        saw but did not take, or hands back)."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.parse_error = _parse_failure(exc)
        self._wake()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy:
            self.abort()

    def abort(self) -> None:
        self.transport.close()

    async def run(self) -> None:
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
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            if self.fast is not None:
                self.fast.client_lost()
            with contextlib.suppress(Exception):
                self.transport.close()

    async def _wait(self, timeout_s: float, idle: bool) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiter, self.idle_wait = fut, idle
        self.deadline = time.monotonic() + timeout_s
        try:
            await fut
        finally:
            self.waiter, self.idle_wait, self.deadline = None, False, None

    async def _feed(self, timeout_s: float, idle: bool = False) -> bool:
        """Waits for bytes (or events the fast path parsed and left) and parses them; False at
        EOF. Parse errors become HttpError; a wait past timeout_s raises TimeoutError."""
        while self.fast is not None:
            # A request the fast path serves keeps the connection busy: its answer first.
            await self._wait(self.settings.keepalive_timeout_s, idle)
        while not (self.pending or self.events.queue or self.parse_error or self.eof):
            if timeout_s <= 0:
                raise asyncio.TimeoutError()
            await self._wait(timeout_s, idle)
            while self.fast is not None:
                # Requests the fast path serves keep the connection busy, not idle: wait on.
                await self._wait(self.settings.keepalive_timeout_s, idle)
        if self.parse_error is not None:
            exc, self.parse_error = self.parse_error, None
            raise exc
        if not self.pending:
            return bool(self.events.queue) or not self.eof
        data = self.pending.popleft()
        if not self.pending and self.reading_paused and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise _parse_failure(exc) from None
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
                if timeout <= 0 or not await self._feed(timeout, idle=not started):
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

    def _try_fast(self, head: tuple[Any, ...]) -> bool:
        """Starts the fast path for a complete request if it may take it: a GET without a
        body or Expect, an origin-form URL, no cache, and an idle pooled connection to the
        backend the balancer picks. False (nothing changed but the pick, which the coroutine
        then uses) sends the request the general way."""
        _, url, raw_headers, method, keep_alive, version = head
        vip = self.vip
        if method != "GET" or self.closing or vip.draining or vip.cache is not None \
                or url[:1] != b"/":
            return False
        made = forward_head(b"GET", url, raw_headers, self.client_bytes, self.forwarded_tail,
                            self.settings.pool_enabled, simple_only=True)
        if made is None:
            return False
        upstream, host = made
        return self._start_fast(upstream, host, keep_alive, url, head, version == "1.1", raw_headers)

    def _start_fast(self, upstream: bytes, host: bytes | None, keep_alive: bool, url: bytes,
                    head: tuple[Any, ...] | bytes, http11: bool = True, raw_headers: Any = ()) -> bool:
        """The fast path's pick and hand-off for a simple GET whose backend head is made (the
        first four arguments in the order _heads.request returns them); `head` is what
        replay_slow gives the coroutine if the exchange cannot finish: the parsed head, or
        the request's bytes from the C parser (httptools parses them then)."""
        vip = self.vip
        now = time.monotonic()
        table = vip.ejection
        if table is not None and table.failures[0] != vip._eject_generation:
            vip.sync_ejections()    # another worker ejected or readmitted a backend
        rotation = vip.plain_rotation
        if rotation is not None:
            # Round robin without routes (the default VIP): the cycle's next entry.
            members = vip.members
            backend = rotation.next(members, now, vip.avail_generation)
            if backend is None:
                backend = vip.pick(members, "*", {}, _NO_EXCLUDE)
        else:
            backend, members = self._pick_fast(vip, host, url, raw_headers, now)
        if backend is None:
            return False
        conn = backend.pool.take_idle()
        if conn is None:
            self.prepicked = backend
            return False
        vip.counts.requests += 1
        backend.counts.upstream_reuses += 1
        ex = conn.fast
        if ex is None:
            ex = conn.fast = _FastExchange(conn)
        ex.begin(self, backend, keep_alive and not self.closing and not vip.draining,
                 http11, len(members), head, now)
        self.fast = ex
        self.busy = True
        vip.in_flight += 1
        backend.outstanding += 1
        conn.transport.write(upstream)
        return True

    def _pick_fast(self, vip: VipProxy, host: bytes | None, url: bytes, raw_headers: Any,
                   now: float) -> tuple[Backend | None, list[Backend]]:
        """The fast path's pick when routes or another balancing apply, and the set picked
        from."""
        if vip.routes:
            members = vip.candidates(host_of(host), url.split(b"?", 1)[0].decode("latin-1"))
            key = vip._current_key
        else:
            members, key = vip.members, "*"
        if vip.settings.balancing == "round_robin":
            rotation = vip.rotations.get(key)
            if rotation is None:
                rotation = vip.rotations[key] = Rotation()
            backend = rotation.next(members, now, vip.avail_generation)
            if backend is None:
                backend = vip.pick(members, key, {}, _NO_EXCLUDE)
        else:
            headers: dict[bytes, list[bytes]] = {}
            for name, value in raw_headers:
                headers.setdefault(name.lower(), []).append(value)
            backend = vip.pick(members, key, headers, _NO_EXCLUDE)
        return backend, members

    def fast_done(self, client_keep: bool, now: float | None = None) -> None:
        """The fast path's request is over (answered, failed or handed back); `now` when the
        caller has just read the clock."""
        self.fast = None
        self.busy = False
        self.vip.in_flight -= 1
        if self.lost:
            return
        if not client_keep or self.closing or self.eof:
            self.transport.close()
            return
        if self.waiter is not None or self.task is None:
            self.deadline = (now or time.monotonic()) + self.settings.keepalive_timeout_s
        if self.pending or self.events.queue:
            self._wake()

    def replay_slow(self, head: tuple[Any, ...] | bytes, backend: Backend | None,
                    tried: tuple[str, ...]) -> None:
        """Hands a request the fast path could not finish (nothing was answered yet) to the
        request coroutine, which sends it again: to `backend`, or to one not in `tried`."""
        self.replay = True
        self.prepicked, self.pretried = backend, tried
        self.fast = None
        self.busy = False
        self.vip.in_flight -= 1
        if isinstance(head, bytes):
            # The C parser's request: httptools' events for the same bytes, ahead of any
            # bytes that came after it (those wait unparsed in `pending` meanwhile).
            self._parse_only(head)
            return
        self.events.queue.appendleft(("end",))
        self.events.queue.appendleft(head)
        self._wake()

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
        replayed, self.replay = self.replay, False
        if not replayed:
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
        tried: set[str] = set(self.pretried)
        retryable_send = method in IDEMPOTENT and body_kind == "none"
        same, self.prepicked, self.pretried = self.prepicked, None, ()
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
        return upstream_head(method, url, raw, headers, body_kind, length, self.client_addr, self.tls,
                             self.settings.pool_enabled)

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
        resp = UpstreamResponse(conn, method, s.read_timeout_s)
        out_chunked = False
        while True:
            ev = await resp.next()
            if ev[0] == "head":
                _, hdrs, status = ev
                self.vip.note_result(backend, failed=status >= 500)
                dropped = dropped_response_headers(hdrs)
                lines = [f"HTTP/1.1 {status} ".encode() + (b"OK" if status == 200 else b"-") + b"\r\n"]
                for name, value in hdrs:
                    low = name.lower()
                    if low in dropped:
                        continue
                    lines.append(name + b": " + value + b"\r\n")
                    if low not in (b"content-length", b"age"):
                        cache_headers.append((name, value))
                if cache_key is not None and method == "GET" and self.vip.cache is not None:
                    fresh_s = freshness_s(status, hdrs)
                    keep_body = [] if fresh_s > 0 else None
                chunked_up = any(n.lower() == b"transfer-encoding" for n, _ in hdrs)
                if not resp.no_body and (chunked_up or not resp.has_length):
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
                return resp.reusable, client_keep


class UpstreamResponse:
    """One backend answer read off a pooled connection by a request coroutine (HTTP/1.1 and
    HTTP/2 clients alike): `await next()` gives ('head', headers, status), ('body', bytes)
    and ('end',), interim 1xx answers skipped; read timeouts, early closes and unparsable
    bytes become _UpstreamFailed while nothing came (retrying elsewhere is safe) and
    ConnectionResetError once the answer started. After 'end', `reusable` says whether the
    connection may go back to its pool."""

    def __init__(self, conn: UpstreamConn, method: str, read_timeout_s: float):
        self.conn, self.method, self.read_timeout_s = conn, method, read_timeout_s
        self.events = _Events(response=True)
        self.parser = httptools.HttpResponseParser(self.events)
        self.events.parser = self.parser
        self.got_bytes = 0
        self.head_buf = b""
        self.status = 0
        self.has_length = self.no_body = self.head_keep = self.reusable = False

    async def next(self) -> tuple[Any, ...]:
        events = self.events
        while True:
            if events.queue:
                ev = events.queue.popleft()
                if ev[0] == "head":
                    code = ev[3]
                    if 100 <= code < 200:
                        continue      # interim answers are not forwarded (Expect is answered here)
                    self.status, self.head_keep = code, ev[4]
                    lower = {n.lower() for n, _ in ev[2]}
                    self.has_length = b"content-length" in lower or b"transfer-encoding" in lower
                    self.no_body = self.method == "HEAD" or code in (204, 304)
                    return ("head", ev[2], code)
                if ev[0] == "end" and self.method != "HEAD":
                    self.reusable = self.has_length and self.head_keep and \
                        not len(self.conn.reader._buffer)
                return ev
            await self._read()

    async def _read(self) -> None:
        status, events = self.status, self.events
        try:
            data = await asyncio.wait_for(self.conn.reader.read(READ_SIZE), self.read_timeout_s)
        except asyncio.TimeoutError:
            if status == 0:
                raise _UpstreamFailed("response timeout", connect=False) from None
            raise ConnectionResetError("backend stalled mid-response") from None
        except ConnectionError as exc:
            if status == 0 and self.got_bytes == 0:
                raise _UpstreamFailed(f"read: {exc}", connect=False) from None
            raise
        if not data:
            if status == 0 and self.got_bytes == 0:
                raise _UpstreamFailed("closed before responding", connect=False)
            if status and not self.has_length and not self.no_body:
                events.queue.append(("end",))    # a body delimited by the close
                return
            raise ConnectionResetError("backend closed mid-response")
        self.got_bytes += len(data)
        if status == 0:
            self.head_buf += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if status == 0:
                raise _UpstreamFailed(f"bad response: {exc}", connect=False) from None
            raise ConnectionResetError(f"bad response body: {exc}") from None
        if status == 0 and self.method == "HEAD" and \
                any(e[0] == "head" and e[3] >= 200 for e in events.queue):
            end = self.head_buf.find(b"\r\n\r\n")
            self.reusable = events.queue[0][4] and end + 4 == len(self.head_buf)
            events.queue.append(("end",))
            # llhttp would wait for the Content-Length body a HEAD answer never has.
            self.parser = httptools.HttpResponseParser(_Events(response=True))


def dropped_response_headers(hdrs: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lower-case names of an answer's headers that must not reach the client: hop-by-hop
    ones and those its Connection header names."""
    named = {t.strip().lower() for n, v in hdrs if n.lower() == b"connection" for t in v.split(b",")}
    return HOP_BY_HOP | named if named else HOP_BY_HOP


class _FastExchange:
    """The fast path's GETs on one upstream connection, driven by callbacks: the upstream
    protocol feeds each answer here, httptools parses it (one parser for the connection's
    life: a connection is reused only after a clean answer), and the client gets the head and
    the body pieces of each read in one write. Does what _relay_response does for a GET:
    hop-by-hop headers out, chunked re-framing of a body without a length, passive ejection,
    counters; a failure before any answer sends the request back to the coroutine's retries.
    The answer's headers come one callback each: rewriting the raw head with regular
    expressions instead was measured slower for a five-header answer (docs/benchmarks.md)."""

    __slots__ = ("answered_at", "backend", "client", "client_11", "client_keep", "conn", "deadline",
                 "done", "extra", "got", "has_cl", "has_length", "head", "hop", "interim", "lines",
                 "members_n", "no_body", "out", "out_chunked", "parser", "remaining", "started",
                 "status", "upstream_keep", "upstream_paused")

    def __init__(self, conn: UpstreamConn):
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        # The answer's head as pieces to join (slot 0: the status line), sorted as its header
        # lines arrive: one pass over them instead of a list of pairs walked again at the end.
        self.lines: list[bytes] = []
        self.hop: list[tuple[bytes, bytes]] = []    # hop-by-hop (lower-case name, value)
        self.has_cl = False
        self.out: list[bytes] = []
        # Body bytes still to come of an answer whose head the C parser took (-1: httptools
        # parses this answer).
        self.remaining = -1

    def begin(self, client: ClientConnection, backend: Backend, client_keep: bool,
              client_11: bool, members_n: int, head: tuple[Any, ...], now: float) -> None:
        self.client, self.backend = client, backend
        self.client_keep, self.client_11 = client_keep, client_11
        self.members_n, self.head = members_n, head
        self.status = 0
        # has_length, no_body, upstream_keep and answered_at are set with the answer's head,
        # before anything reads them; extra, interim and out_chunked when httptools takes it.
        self.done = self.got = self.upstream_paused = False
        self.remaining = -1
        self.started = now
        self.deadline = now + client.settings.read_timeout_s
        self.conn.proto.sink = self

    # -- httptools callbacks (the response)
    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True       # bytes after the answer: the connection cannot be reused
        self.lines = [b""]
        self.hop = []
        self.has_cl = False

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in _RESPONSE_SPECIAL:
            if low != b"content-length":
                self.hop.append((low, value))
                return
            self.has_cl = True
        self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            self.interim = True     # 1xx is not forwarded; the real answer follows
            return
        # Read here: once the message is complete llhttp resets what this reports.
        self._answered(status, parser.should_keep_alive())
        lines = self.lines
        lines[0] = b"HTTP/1.1 200 OK\r\n" if status == 200 else b"HTTP/1.1 %d -\r\n" % status
        chunked_up = False
        for low, value in self.hop:
            if low == b"transfer-encoding":
                chunked_up = True
            elif low == b"connection" and value.lower() not in _PLAIN_CONNECTION and \
                    not _plain_connection(value):
                # It names headers: those go too (lines holds name, ": ", value, CRLF each).
                named = {t.strip().lower() for t in value.split(b",")}
                kept = [b""]
                for i in range(1, len(lines), 4):
                    if lines[i].lower() not in named:
                        kept += lines[i:i + 4]
                kept[0] = lines[0]
                lines = kept
        has_cl = self.has_cl
        self.has_length = chunked_up or has_cl
        self.no_body = status == 204 or status == 304
        if not self.no_body and (chunked_up or not has_cl):
            if self.client_11:
                self.out_chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.client_keep = False     # an HTTP/1.0 client reads to the close
        if not self.client_keep:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.out.append(b"".join(lines))

    def _answered(self, status: int, upstream_keep: bool) -> float:
        """An answer's head is in (either parser): its status counted with the request's
        latency and seen by passive ejection (a 5xx counts as a failure, anything else starts
        the backend's count of consecutive failures again). Returns the clock it read."""
        self.status = status
        self.upstream_keep = upstream_keep
        vip = self.client.vip
        b = self.backend
        self.answered_at = now = time.monotonic()
        vip.counts.response(status, now - self.started)
        if status >= 500:
            vip.note_result(b, failed=True)
        elif b.eject_slot is not None:
            if vip.ejection is not None and vip.ejection.failures[2 * b.eject_slot]:
                vip.note_result(b, failed=False)     # the shared count starts again
        elif b.failures:
            b.failures = 0
        return now

    def on_body(self, body: bytes) -> None:
        if self.out_chunked:
            self.out.append(b"%x\r\n" % len(body) + body + b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.out_chunked:
            self.out.append(b"0\r\n\r\n")
        self.done = True

    # -- the upstream connection's events
    def data(self, data: bytes) -> None:
        remaining = self.remaining
        if remaining >= 0:
            self._counted(data, remaining)
            return
        if not self.got:
            self.got = True
            if _heads is not None:
                made = _heads.response(data, self.client_keep)
                if made is not None:
                    # The C parser took the answer's head (whole in this first read, with a
                    # length): `out` is the client's head, as on_headers_complete would make
                    # it, and the body bytes of this read; `left` body bytes are to come.
                    status, out, left, upstream_keep, extra = made
                    self.has_length = True
                    self.no_body = False
                    now = self._answered(status, upstream_keep)
                    client = self.client
                    if left:
                        self.remaining = left
                        self.out.append(out)
                        self._flush()
                        self.deadline = now + client.settings.read_timeout_s
                        return
                    # The whole answer in this read (the usual small answer): one write.
                    self.done = True
                    client.transport.write(out)
                    self._finish(upstream_keep and not extra)
                    return
            self.extra = self.interim = self.out_chunked = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.done:
                self._finish(False)         # junk after a complete answer
            elif self.status == 0:
                self._failed(f"bad response: {exc}")
            else:
                self._abort()
            return
        if self.done:
            self._finish(self.has_length and not self.extra and self.upstream_keep)
            return
        self.deadline = time.monotonic() + self.client.settings.read_timeout_s
        if self.out:
            self._flush()

    def _counted(self, data: bytes, remaining: int) -> None:
        """Body bytes of an answer with a length, after the C parser took its head."""
        n = len(data)
        if n < remaining:
            self.remaining = remaining - n
            self.out.append(data)
            self._flush()
            self.deadline = time.monotonic() + self.client.settings.read_timeout_s
            return
        self.remaining = -1
        self.done = True
        if n > remaining:
            # Bytes past the answer: the backend sent what nobody asked for, so the
            # connection is not reused (httptools' path treats them the same).
            self.out.append(data[:remaining])
            self._finish(False)
            return
        self.out.append(data)
        self._finish(self.upstream_keep)

    def lost(self) -> None:
        """The backend closed (or the connection broke) before the answer was complete."""
        if self.status == 0 and not self.got:
            # A pooled connection the backend closed as the request went out: again, on a
            # fresh connection to the same backend (it says nothing about the backend).
            self._release(False)
            self.client.replay_slow(self.head, self.backend, ())
        elif self.status and not self.has_length and not self.no_body:
            if self.out_chunked:
                self.out.append(b"0\r\n\r\n")
            self._finish(False)      # a body delimited by the close
        elif self.status == 0:
            self._failed("closed mid-response head")
        else:
            self._abort()

    def expire(self) -> None:
        """No byte from the backend for read_timeout (VipProxy's sweep)."""
        if self.status == 0:
            self._failed("response timeout", timeout=True)
        else:
            self._abort()

    # -- the client connection's events
    def client_lost(self) -> None:
        self._release(False)
        self.client.fast = None
        self.client.busy = False
        self.client.vip.in_flight -= 1

    def client_writable(self) -> None:
        if self.upstream_paused:
            self.upstream_paused = False
            self.conn.transport.resume_reading()

    # -- endings
    def _flush(self) -> None:
        c = self.client
        out, self.out = self.out, []
        c.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if c.write_paused and not self.upstream_paused:
            self.upstream_paused = True      # the client reads slower than the backend sends
            self.conn.transport.pause_reading()

    def _release(self, reusable: bool) -> None:
        self.conn.proto.sink = None
        if not reusable:
            self.conn.fast = None        # its parser may be mid-message: never used again
        if self.upstream_paused:
            self.upstream_paused = False
            with contextlib.suppress(Exception):
                self.conn.transport.resume_reading()
        self.backend.outstanding -= 1
        self.backend.pool.release(self.conn, reusable)

    def _finish(self, reusable: bool) -> None:
        if reusable and not self.upstream_paused:
            conn = self.conn
            conn.proto.sink = None
            b = self.backend
            b.outstanding -= 1
            pool = b.pool
            # The exchange's parser took every byte, so only a closing transport can make the
            # connection unusable; waiters and a closed or pool-less VIP go through release.
            if pool.waiters or pool.closed or not pool.settings.pool_enabled or \
                    conn.transport.is_closing():
                pool.release(conn, True)
            else:
                conn.idle_since = self.answered_at
                pool.idle.append(conn)
        else:
            self._release(reusable)
        out = self.out
        if out:
            # The answer's last bytes: written without _flush's pause, as the upstream
            # connection is no longer this exchange's (it may be back in its pool, where a
            # paused reader would never see the backend close it).
            self.out = []
            c = self.client
            c.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.client.fast_done(self.client_keep, self.answered_at)

    def _abort(self) -> None:
        """Part of the answer went out: the client connection cannot be saved."""
        self._release(False)
        c = self.client
        c.fast_done(False)
        c.transport.abort()

    def _failed(self, why: str, timeout: bool = False) -> None:
        """No answer came: another backend, as the coroutine's retries would, else 502/504."""
        c = self.client
        vip = c.vip
        self._release(False)
        vip.note_result(self.backend, failed=True)
        name = self.backend.name
        if self.members_n > 1:
            vip.stats.count("retries", vip.vip, name)
            c.replay_slow(self.head, None, (name,))
            return
        status = 504 if timeout else 502
        reason = REASONS[status]
        body = f"{status} {reason}: backend {name}: {why}\n".encode()
        vip.stats.count_response(vip.vip, status)
        c.transport.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        c.fast_done(False)


class _UpstreamProtocol(asyncio.StreamReaderProtocol):
    """An upstream connection's protocol: its bytes go to the StreamReader the request
    coroutine (and HTTP/2) reads, or, while a fast-path exchange owns it, to that exchange."""

    sink: _FastExchange | None = None

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.data(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        keep = super().eof_received()
        if self.sink is not None:
            self.sink.lost()
        return keep

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.sink is not None:
            self.sink.lost()


def forwarded_tail(client_addr: str, tls: bool) -> bytes:
    """X-Forwarded-Proto and Forwarded for one client connection, computed when it opens; the
    Forwarded line is left open so a request's host can be put at its end."""
    client = client_addr.encode()
    proto = b"https" if tls else b"http"
    node = b'"[' + client + b']"' if b":" in client else client
    return b"X-Forwarded-Proto: " + proto + b"\r\nForwarded: for=" + node + b";proto=" + proto


def forward_head(method: bytes, url: bytes, raw: list[tuple[bytes, bytes]], client: bytes,
                 tail: bytes, pool_enabled: bool, named: frozenset[bytes] | set[bytes] = frozenset(),
                 framing: bytes = b"", simple_only: bool = False) -> tuple[bytes, bytes | None] | None:
    """The HTTP/1.1 request head a backend gets, and the request's Host (the one place the
    header rules live, for both paths): hop-by-hop headers and those the Connection header
    names out, Content-Length and Expect out (the body's framing is ours: `framing`),
    X-Forwarded-For appended to, X-Forwarded-Proto and Forwarded set (`tail`, from
    forwarded_tail), Host kept. With simple_only, None for a request the fast path must not
    take: one with a body, Expect, or a Connection header naming other headers."""
    # Pieces joined once at the end: a concatenation per header was a tenth of a request's
    # Python time in the fast path.
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    host = xff = None
    for name, value in raw:
        low = name.lower()
        if low in _REQUEST_SPECIAL:
            if low == b"host":
                if host is None:
                    host = value
                out += (name, b": ", value, b"\r\n")
            elif low == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif simple_only and (low in _BODY_REQUEST_HEADERS or
                                  (low == b"connection" and not _plain_connection(value))):
                return None
            # x-forwarded-proto: ours replaces the client's (only the proxy knows the scheme)
            continue
        if low in named:
            continue
        out += (name, b": ", value, b"\r\n")
    if xff:
        out += (b"X-Forwarded-For: ", xff, b", ", client, b"\r\n", tail)
    else:
        out += (b"X-Forwarded-For: ", client, b"\r\n", tail)
    if host:
        out += (b";host=", host)
    if not pool_enabled:
        out.append(b"\r\nConnection: close")   # the backend may end it too: nothing reuses it
    out += (b"\r\n", framing, b"\r\n")
    return b"".join(out), host


def upstream_head(method: str, url: bytes, raw: list[tuple[bytes, bytes]],
                  headers: dict[bytes, list[bytes]], body_kind: str, length: int,
                  client_addr: str, tls: bool, pool_enabled: bool) -> bytes:
    """The general path's request head to a backend (HTTP/1.1 and HTTP/2 clients): forward_head
    with the headers Connection names and the body's framing."""
    named = {t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")}
    framing = b"Content-Length: %d\r\n" % length if body_kind == "length" else \
        b"Transfer-Encoding: chunked\r\n" if body_kind == "chunked" else b""
    made = forward_head(method.encode("latin-1"), url, raw, client_addr.encode(),
                        forwarded_tail(client_addr, tls), pool_enabled, named, framing)
    assert made is not None
    return made[0]


def tls_context(cert: str, key: str, http2: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    # The server's preference order wins in OpenSSL's ALPN callback: h2 when the client offers it.
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return ctx

