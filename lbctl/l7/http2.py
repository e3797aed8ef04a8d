"""HTTP/2 from clients (the h2 library): h2 chosen by ALPN on TLS VIPs, h2c with prior knowledge
on plain ones. Every stream is one request, balanced and forwarded as HTTP/1.1 over the same
warm upstream pools, with the same routes, headers, limits, cache and metrics as an HTTP/1.1
request; bodies stream both ways under HTTP/2 flow control and are never held whole."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

# hyperframe is h2's own frame layer (a dependency of h2): a GOAWAY written beside h2's state
# machine lets streams already open finish, which h2's close_connection would forbid.
from hyperframe.frame import GoAwayFrame

from lbctl.l7.balance import host_of
from lbctl.l7.cache import freshness_s, request_may_use
from lbctl.l7.proxy import (
    HOP_BY_HOP,
    IDEMPOTENT,
    REASONS,
    Backend,
    HttpError,
    UpstreamConn,
    UpstreamResponse,
    VipProxy,
    _UpstreamFailed,
    client_protocol,
    dropped_response_headers,
    upstream_head,
)

log = logging.getLogger("lbctl.l7")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535          # every HTTP/2 window starts here until SETTINGS change it
# Headers HTTP/2 forbids (RFC 9113 8.2.2) beyond the hop-by-hop ones already dropped.
NOT_IN_H2 = HOP_BY_HOP | {b"host"}


def accepted_protocol(vip: VipProxy, tls: bool) -> asyncio.BaseProtocol:
    """The protocol for a connection just accepted: HTTP/2 or HTTP/1.1 as the client chose."""
    s = vip.settings
    if tls and s.http2_tls:
        return _AlpnChoice(vip)
    if not tls and s.http2_cleartext:
        return _PrefaceChoice(vip)
    return client_protocol(vip)


def _hand_over(transport: Any, proto: asyncio.BaseProtocol, first: bytes) -> None:
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if first:
        proto.data_received(first)  # type: ignore[attr-defined]


class _AlpnChoice(asyncio.Protocol):
    """On a TLS VIP the handshake is over when connection_made runs: ALPN has chosen."""

    def __init__(self, vip: VipProxy):
        self.vip = vip

    def connection_made(self, transport: Any) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        _hand_over(transport, H2Server(self.vip) if chosen == "h2" else client_protocol(self.vip), b"")


class _PrefaceChoice(asyncio.Protocol):
    """On a plain VIP an h2c client starts with the connection preface, which no HTTP/1.1
    request line can: the first bytes decide (a mismatch is seen by the second byte of a
    request that starts with P, at once for any other)."""

    def __init__(self, vip: VipProxy):
        self.vip = vip
        self.buf = b""
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # A client that connects and says nothing is held no longer than an idle keep-alive one.
        self.timer = asyncio.get_running_loop().call_later(self.vip.settings.keepalive_timeout_s,
                                                           transport.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < len(PREFACE) and PREFACE.startswith(self.buf):
            return
        if self.timer is not None:
            self.timer.cancel()
        proto = H2Server(self.vip) if self.buf.startswith(PREFACE) else client_protocol(self.vip)
        _hand_over(self.transport, proto, self.buf)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class H2Server(asyncio.Protocol):
    """One client HTTP/2 connection: frames in and out through h2, a task per stream."""

    # What the VIP's timeout sweep looks at on an HTTP/1.1 connection: an HTTP/2 one keeps its
    # own timers (_tick), so the sweep finds nothing to expire here.
    fast = None
    deadline: float | None = None

    def __init__(self, vip: VipProxy):
        self.vip = vip
        self.settings = vip.settings
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, H2Stream] = {}
        # Streams answered before their request body was all in: its bytes are taken and dropped
        # (up to this many more), then the stream is reset; see H2Stream.run.
        self.discarding: dict[int, int] = {}
        self.transport: Any = None
        self.client_addr = ""
        self.tls = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.window_open: asyncio.Future[None] | None = None
        self.goaway_at: int | None = None      # last stream id our GOAWAY promised to serve
        self.client_gone = False
        self.closed = False
        self.idle_since = time.monotonic()
        self.head_deadline: float | None = None
        self.ticker: asyncio.TimerHandle | None = None

    # -- the connection ---------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.client_addr = peer[0]
        self.tls = transport.get_extra_info("sslcontext") is not None
        s = self.settings
        codes = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            codes.MAX_CONCURRENT_STREAMS: s.http2_max_streams,
            codes.INITIAL_WINDOW_SIZE: s.http2_stream_window_bytes,
            codes.MAX_HEADER_LIST_SIZE: s.max_header_bytes,
        })
        self.conn.initiate_connection()
        # The connection window bounds what all uploads on it hold together: four streams'
        # worth, so one slow upload cannot take every other stream's window.
        extra = min(2**31 - 1, 4 * s.http2_stream_window_bytes) - DEFAULT_WINDOW
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self.flush()
        self.vip.connections.add(self)  # type: ignore[arg-type]
        self.vip.stats.gauge_add("client_connections", self.vip.vip, 1)
        self.vip.stats.count("http2_connections", self.vip.vip)
        self.ticker = asyncio.get_running_loop().call_later(1.0, self._tick)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the error code; send it and close.
            log.debug("HTTP/2 protocol error from %s: %s", self.client_addr, exc)
            self.flush()
            self._close()
            return
        if not events and not self.streams and self.head_deadline is None:
            # Bytes that completed nothing while no request is open: a header block arriving
            # in pieces. It must be complete within header_timeout (slowloris over HTTP/2).
            self.head_deadline = time.monotonic() + self.settings.header_timeout_s
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.head_deadline = None
                self._open_stream(ev)
            elif isinstance(ev, h2.events.DataReceived):
                stream = self.streams.get(ev.stream_id)
                if stream is None:
                    self.ack(ev.flow_controlled_length, ev.stream_id)   # a stream already answered
                    self._discarded(ev.stream_id, ev.flow_controlled_length)
                else:
                    stream.feed(ev.data, ev.flow_controlled_length)
            elif isinstance(ev, h2.events.StreamEnded):
                self.discarding.pop(ev.stream_id, None)
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.feed_end()
            elif isinstance(ev, h2.events.StreamReset):
                self.discarding.pop(ev.stream_id, None)
                stream = self.streams.get(ev.stream_id)
                if stream is not None and stream.task is not None:
                    stream.task.cancel()
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self._window_changed()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                if ev.error_code != ErrorCodes.NO_ERROR:
                    self.abort()
                    return
                self.client_gone = True      # no new streams; those open finish
                if not self.streams:
                    self._finish()
        self.flush()

    def _open_stream(self, ev: h2.events.RequestReceived) -> None:
        if self.goaway_at is not None and ev.stream_id > self.goaway_at:
            # Sent after our GOAWAY: refused, which tells the client it may retry elsewhere.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, ev.stream_id, ev.headers or [], ev.stream_ended is not None)
        self.streams[ev.stream_id] = stream
        stream.task = asyncio.get_running_loop().create_task(stream.run())

    def stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.sid, None)
        # What the stream received and never passed on still counts against the connection's
        # window: give it back, or the connection's uploads would stall for good.
        self.ack(stream.unacked, stream.sid)
        stream.unacked = 0
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.goaway_at is not None or self.client_gone:
                self._finish()
        self.flush()

    def discard_rest(self, sid: int) -> None:
        self.discarding[sid] = self.settings.http2_stream_window_bytes

    def _discarded(self, sid: int, size: int) -> None:
        left = self.discarding.get(sid)
        if left is None:
            return
        if left - size > 0:
            self.discarding[sid] = left - size
            return
        # The client keeps sending a body nobody reads: tell it to stop (RFC 9113 8.1).
        del self.discarding[sid]
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def ack(self, size: int, sid: int) -> None:
        if size and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(size, sid)
            self.flush()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def window(self, sid: int) -> int:
        """Bytes stream `sid` may send now (at most a frame), waiting while its window or the
        connection's is shut."""
        while True:
            if self.closed:
                raise ConnectionResetError("client connection closed")
            try:
                n = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            except h2.exceptions.ProtocolError:
                raise ConnectionResetError("stream closed by the client") from None
            if n > 0:
                return n
            if self.window_open is None or self.window_open.done():
                self.window_open = asyncio.get_running_loop().create_future()
            await self.window_open

    def _window_changed(self) -> None:
        if self.window_open is not None and not self.window_open.done():
            self.window_open.set_result(None)

    def _tick(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        slow_head = self.head_deadline is not None and now > self.head_deadline
        if not self.streams and (slow_head or now - self.idle_since > self.settings.keepalive_timeout_s):
            self._finish()
        self.ticker = asyncio.get_running_loop().call_later(1.0, self._tick)

    # -- ending: drain, finish, abort ---------------------------------------------------------
    def close_when_idle(self) -> None:
        """Drain: GOAWAY naming the last stream received; those finish, later ones are refused."""
        if self.closed:
            return
        if self.goaway_at is None:
            self.flush()
            self.goaway_at = self.conn.highest_inbound_stream_id
            self.transport.write(GoAwayFrame(0, last_stream_id=self.goaway_at,
                                             error_code=ErrorCodes.NO_ERROR).serialize())
        if not self.streams:
            self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(ErrorCodes.NO_ERROR)
        self.flush()
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        # Done with it: a TLS close waits for the client's close_notify, which a drain need not.
        self._forget()

    def _forget(self) -> None:
        if self in self.vip.connections:  # type: ignore[comparison-overlap]
            self.vip.connections.discard(self)  # type: ignore[arg-type]
            self.vip.stats.gauge_add("client_connections", self.vip.vip, -1)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ticker is not None:
            self.ticker.cancel()
        for stream in list(self.streams.values()):
            if stream.task is not None:
                stream.task.cancel()
        self._window_changed()
        self.writable.set()
        self._forget()


class H2Stream:
    """One request on an HTTP/2 connection, served like an HTTP/1.1 request."""

    def __init__(self, server: H2Server, sid: int, headers: list[tuple[bytes, bytes]], ended: bool):
        self.server, self.sid = server, sid
        self.vip = server.vip
        self.settings = server.settings
        self.headers_in = headers
        self.body: deque[tuple[bytes, int]] = deque()
        self.ended = ended                      # the client's side of the stream is complete
        self.arrived: asyncio.Future[None] | None = None
        self.unacked = 0                        # flow-controlled bytes not yet passed upstream
        self.head_sent = False
        self.response_done = False
        self.task: asyncio.Task[None] | None = None

    # -- the client's side ------------------------------------------------------------------
    def feed(self, data: bytes, flow: int) -> None:
        self.body.append((data, flow))
        self.unacked += flow
        self._wake()

    def feed_end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)

    async def _next_chunk(self) -> tuple[bytes, int] | None:
        while not self.body:
            if self.ended:
                return None
            self.arrived = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.arrived, self.settings.keepalive_timeout_s)
            except asyncio.TimeoutError:
                raise ConnectionResetError("client stalled mid-body") from None
        return self.body.popleft()

    def _passed_on(self, flow: int) -> None:
        """Upstream took these bytes: the client may send as many more."""
        self.unacked -= flow
        self.server.ack(flow, self.sid)

    def _send_headers(self, headers: list[tuple[bytes, bytes]], end: bool = False) -> None:
        try:
            self.server.conn.send_headers(self.sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError:
            raise ConnectionResetError("stream closed by the client") from None
        if not headers[0][1].startswith(b"1"):
            self.head_sent = True
        self.server.flush()

    async def _send_data(self, data: bytes) -> None:
        srv = self.server
        while data:
            n = await srv.window(self.sid)
            piece, data = (data, b"") if n >= len(data) else (data[:n], data[n:])
            try:
                srv.conn.send_data(self.sid, piece)
            except h2.exceptions.ProtocolError:
                raise ConnectionResetError("stream closed by the client") from None
            srv.flush()
            if not srv.writable.is_set():
                await srv.writable.wait()

    def _end(self) -> None:
        try:
            self.server.conn.end_stream(self.sid)
        except h2.exceptions.ProtocolError:
            raise ConnectionResetError("stream closed by the client") from None
        self.response_done = True
        self.server.flush()

    def _reset(self, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.server.conn.reset_stream(self.sid, code)
        self.server.flush()

    async def _answer_error(self, exc: HttpError) -> None:
        if self.head_sent:
            self._reset(ErrorCodes.INTERNAL_ERROR)     # too late for a status: the stream fails
            return
        self.vip.stats.count_response(self.vip.vip, exc.status)
        body = f"{exc.status} {REASONS.get(exc.status, 'Error')}: {exc.why}\n".encode()
        self._send_headers([(b":status", str(exc.status).encode()), (b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())])
        await self._send_data(body)
        self._end()

    # -- one request --------------------------------------------------------------------------
    async def run(self) -> None:
        self.vip.in_flight += 1
        try:
            await self._serve()
        except HttpError as exc:
            with contextlib.suppress(ConnectionError):
                await self._answer_error(exc)
        except (ConnectionError, asyncio.TimeoutError):
            self._reset(ErrorCodes.INTERNAL_ERROR if self.head_sent else ErrorCodes.CANCEL)
        except asyncio.CancelledError:
            pass          # the client reset the stream or the connection went
        finally:
            self.vip.in_flight -= 1
            if self.response_done and not self.ended:
                # Answered before the request body was all in (413, 503...). A reset at once
                # (RFC 9113 8.1 allows RST_STREAM NO_ERROR) makes curl 7.88 drop the answer it
                # already has: the rest of a short body is taken and dropped, a long one reset.
                self.server.discard_rest(self.sid)
            self.server.stream_done(self)

    def _request(self) -> tuple[str, bytes, list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
        """Method, path, HTTP/1.1 header list and its index, with the limits checked."""
        s = self.settings
        pseudo: dict[bytes, bytes] = {}
        raw: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        size = 0
        for name, value in self.headers_in:
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                pseudo[name] = value
            elif name == b"cookie":
                cookies.append(value)     # HTTP/2 may split Cookie; HTTP/1.1 wants one line
            else:
                raw.append((name, value))
        if cookies:
            raw.append((b"cookie", b"; ".join(cookies)))
        if len(raw) > s.max_headers:
            raise HttpError(431, f"more than {s.max_headers} headers")
        if size > s.max_header_bytes:
            raise HttpError(431, f"header section over {s.max_header_bytes} bytes")
        method = pseudo.get(b":method", b"").decode("latin-1")
        if method == "CONNECT":
            raise HttpError(400, "CONNECT (tunnels) is not proxied")
        headers: dict[bytes, list[bytes]] = {}
        for name, value in raw:
            headers.setdefault(name, []).append(value)
        authority = pseudo.get(b":authority")
        if b"host" not in headers and authority:
            raw.insert(0, (b"host", authority))
            headers[b"host"] = [authority]
        return method, pseudo.get(b":path", b"/"), raw, headers

    def _framing(self, headers: dict[bytes, list[bytes]]) -> tuple[str, int]:
        """How the body goes upstream: its Content-Length, none, or chunked when HTTP/2's
        DATA frames carry a body of unannounced length."""
        cl = headers.get(b"content-length", [])
        if cl:
            values = {v.strip() for v in b",".join(cl).split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise HttpError(400, "bad Content-Length")
            length = int(next(iter(values)))
            if length > self.settings.max_body_bytes:
                raise HttpError(413, f"body of {length} bytes is over the limit of "
                                f"{self.settings.max_body_bytes}")
            return ("length", length) if length else ("none", 0)
        return ("none", 0) if self.ended else ("chunked", -1)

    async def _serve(self) -> None:
        started = time.monotonic()
        stats, vipname, vip = self.vip.stats, self.vip.vip, self.vip
        stats.count("requests", vipname)
        method, url, raw, headers = self._request()
        body_kind, length = self._framing(headers)
        if b"100-continue" in b",".join(headers.get(b"expect", [])).lower():
            self._send_headers([(b":status", b"100")])
        host = host_of(headers.get(b"host", [b""])[0])
        path = url.split(b"?", 1)[0].decode("latin-1")
        cache_key = None
        if vip.cache is not None and request_may_use(method, headers):
            cache_key = (host, url)
            entry = vip.cache.get(cache_key)
            if entry is not None:
                stats.count("cache_hits", vipname)
                await self._answer_cached(entry, method, started)
                return
            stats.count("cache_misses", vipname)
        members = vip.candidates(host, path)
        key = vip._current_key
        head = upstream_head(method, url, raw, headers, body_kind, length, self.server.client_addr,
                             self.server.tls, self.settings.pool_enabled)
        tried: set[str] = set()
        retryable_send = method in IDEMPOTENT and body_kind == "none"
        same: Backend | None = None
        stale_retries = 0
        while True:
            backend = same or vip.pick(members, key, headers, tried)
            same = None
            if backend is None:
                raise HttpError(503, "no backend available for this request")
            tried.add(backend.name)
            backend.outstanding += 1
            try:
                await self._exchange(backend, method, head, body_kind, started, cache_key)
                return
            except _UpstreamFailed as exc:
                if exc.stale and retryable_send and stale_retries < 3:
                    stale_retries += 1      # a pooled connection the backend had just closed
                    same = backend
                    continue
                vip.note_result(backend, failed=True)
                if (exc.connect or retryable_send) and len(tried) < min(len(members), 3):
                    stats.count("retries", vipname, backend.name)
                    continue
                status = 504 if "timeout" in str(exc) and not exc.connect else 502
                raise HttpError(status, f"backend {backend.name}: {exc}") from None
            finally:
                backend.outstanding -= 1

    async def _answer_cached(self, entry: Any, method: str, started: float) -> None:
        age = int(time.monotonic() - entry.stored)
        out = [(b":status", b"200")] + [(n.lower(), v) for n, v in entry.headers
                                       if n.lower() not in NOT_IN_H2]
        out += [(b"age", str(age).encode()), (b"content-length", str(len(entry.body)).encode())]
        self._send_headers(out)
        if method != "HEAD":
            await self._send_data(entry.body)
        self._end()
        self.vip.stats.count_response(self.vip.vip, 200)
        self.vip.stats.observe_latency(self.vip.vip, time.monotonic() - started)

    async def _exchange(self, backend: Backend, method: str, head: bytes, body_kind: str,
                        started: float, cache_key: tuple[str, bytes] | None) -> None:
        pool = backend.pool
        s = self.settings
        conn, reused = await pool.acquire()
        if reused:
            self.vip.stats.count("upstream_reuses", self.vip.vip, backend.name)
        reusable = False
        try:
            conn.writer.write(head)
            sent = 0
            while body_kind != "none":
                chunk = await self._next_chunk()
                if chunk is None:
                    if body_kind == "chunked":
                        conn.writer.write(b"0\r\n\r\n")
                    break
                data, flow = chunk
                sent += len(data)
                if sent > s.max_body_bytes:
                    raise HttpError(413, f"body over the limit of {s.max_body_bytes} bytes")
                if body_kind == "chunked":
                    if data:
                        conn.writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                else:
                    conn.writer.write(data)
                try:
                    await conn.writer.drain()
                except ConnectionError as exc:
                    raise _UpstreamFailed(f"send: {exc}", connect=False) from None
                self._passed_on(flow)
            try:
                await conn.writer.drain()
            except ConnectionError as exc:
                raise _UpstreamFailed(f"send: {exc}", connect=False) from None
            reusable = await self._relay(conn, backend, method, started, cache_key)
        except _UpstreamFailed as exc:
            exc.stale = reused and not exc.connect and "timeout" not in str(exc)
            raise
        finally:
            pool.release(conn, reusable)

    async def _relay(self, conn: UpstreamConn, backend: Backend, method: str, started: float,
                     cache_key: tuple[str, bytes] | None) -> bool:
        """The backend's HTTP/1.1 answer as HTTP/2 HEADERS and DATA; True when the upstream
        connection can go back to its pool."""
        stats, vipname, s = self.vip.stats, self.vip.vip, self.settings
        cache = self.vip.cache
        keep_body: list[bytes] | None = None
        kept = 0
        fresh_s = 0
        cache_headers: list[tuple[bytes, bytes]] = []
        resp = UpstreamResponse(conn, method, s.read_timeout_s)
        while True:
            ev = await resp.next()
            if ev[0] == "head":
                _, hdrs, status = ev
                self.vip.note_result(backend, failed=status >= 500)
                dropped = dropped_response_headers(hdrs) | NOT_IN_H2
                out = [(b":status", str(status).encode())]
                for name, value in hdrs:
                    low = name.lower()
                    if low in dropped:
                        continue
                    out.append((low, value))
                    if low not in (b"content-length", b"age"):
                        cache_headers.append((name, value))
                if cache_key is not None and method == "GET" and cache is not None:
                    fresh_s = freshness_s(status, hdrs)
                    keep_body = [] if fresh_s > 0 else None
                self._send_headers(out)
                stats.count_response(vipname, status)
                stats.observe_latency(vipname, time.monotonic() - started)
            elif ev[0] == "body":
                if keep_body is not None:
                    kept += len(ev[1])
                    if kept > s.cache_max_entry_bytes:
                        keep_body = None
                    else:
                        keep_body.append(ev[1])
                await self._send_data(ev[1])
            else:
                self._end()
                if keep_body is not None and cache is not None and cache_key is not None:
                    cache.put(cache_key, cache_headers, b"".join(keep_body), fresh_s)
                return resp.reusable
