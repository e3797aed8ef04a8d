"""`lbctl bench l7`'s reference point, never used by the agent: the smallest HTTP/1.1 reverse
proxy on the same stack as the L7 proxy (uvloop, httptools, SO_REUSEPORT worker processes,
per-request round robin over pooled keep-alive upstream connections) and nothing else: no
forwarded headers but X-Forwarded-For, no limits, no counters, no ejection, answers passed on
byte for byte. The bench runs it beside HAProxy and the agent's proxy, so the distance between
the two Python proxies is what the L7 proxy's features cost per request, measured in the same
run. Run as `python -m lbctl.bench.l7_reference PORT BACKEND:PORT[,BACKEND:PORT...] [--workers N]`."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import deque
from typing import Any

import httptools

# Request headers not passed on: they describe the client's connection, not the request.
_DROPPED = frozenset({b"connection", b"keep-alive"})


class _Upstream(asyncio.Protocol):
    """A pooled connection to one backend: the answer's bytes go to the client as they come;
    the parser only says where the answer ends (Content-Length or chunked)."""

    def __init__(self, pool: list[_Upstream]):
        self.pool = pool
        self.client: _Client | None = None
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.transport.close()     # bytes nobody asked for: the connection is unusable
            return
        client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None:
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, sent one at a time."""

    def __init__(self, proxy: _Proxy):
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.peer = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.queued: deque[bytes] = deque()
        self.busy = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer = (transport.get_extra_info("peername") or ("",))[0].encode()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        head = [self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"]
        head += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in _DROPPED]
        head.append(b"X-Forwarded-For: " + self.peer + b"\r\n\r\n")
        self.queued.append(b"".join(head))
        self.send()

    def send(self) -> None:
        if self.busy or not self.queued:
            return
        pool, backend = self.proxy.next_pool()
        if pool:
            up = pool.pop()
            self.busy = True
            up.client = self
            up.transport.write(self.queued.popleft())
        else:
            self.busy = True
            asyncio.get_running_loop().create_task(self.proxy.open(pool, backend, self))

    def answered(self) -> None:
        self.busy = False
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.queued.clear()


class _Proxy:
    def __init__(self, backends: list[tuple[str, int]]):
        self.backends = backends
        self.pools: list[list[_Upstream]] = [[] for _ in backends]
        self.turn = 0

    def next_pool(self) -> tuple[list[_Upstream], tuple[str, int]]:
        self.turn = (self.turn + 1) % len(self.backends)
        return self.pools[self.turn], self.backends[self.turn]

    async def open(self, pool: list[_Upstream], backend: tuple[str, int], client: _Client) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Upstream(pool), *backend)
        except OSError:
            client.transport.close()
            return
        pool.append(up)
        client.busy = False
        client.send()


async def _serve(host: str, port: int, backends: list[tuple[str, int]]) -> None:
    proxy = _Proxy(backends)
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: _Client(proxy), host, port, reuse_port=True,
                             backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbctl.bench.l7_reference")
    parser.add_argument("port", type=int)
    parser.add_argument("backends", help="ADDR:PORT[,ADDR:PORT...]")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    args = parser.parse_args(argv)
    backends = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in args.backends.split(",")]
    # Workers forked before any loop exists; each binds its own SO_REUSEPORT socket. They die
    # with the bench's SIGTERM to the process group.
    for _ in range(max(1, args.workers) - 1):
        if os.fork() == 0:
            break
    import uvloop

    uvloop.run(_serve(args.host, args.port, backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
