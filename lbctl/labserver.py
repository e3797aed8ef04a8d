"""Lab backend server: HTTP/1.1 that answers with its own name, plus a UDP echo (stdlib only)."""

from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class LabHTTPServer(ThreadingHTTPServer):
    """Thread-per-connection HTTP server tuned for bursts of short connections."""

    daemon_threads = True
    allow_reuse_address = True
    # The default backlog of 5 drops SYNs under a few hundred new connections/s.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], backend_name: str, log_requests: bool) -> None:
        self.backend_name = backend_name
        self.log_requests = log_requests
        super().__init__(address, LabRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks the resolver for the bind address's name (getfqdn)
        # between bind() and listen(). Where /etc/hosts does not answer (a minimal root has
        # none) that is a DNS query out of the lab namespace; in a lab whose default route
        # silently drops it (the DSR lab's backends route via the client), the server sat
        # bound but not listening for two 5 s resolver timeouts, refusing every connection.
        # The name is never used: keep the address.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class LabRequestHandler(BaseHTTPRequestHandler):
    """Answers every GET/HEAD with the backend's name in the body and in X-Backend."""

    protocol_version = "HTTP/1.1"  # keep-alive unless the client says "Connection: close"
    server_version = "lbctl-labserver"
    sys_version = ""
    # Header and body go out in separate writes; with Nagle on, keep-alive requests
    # would wait for the peer's delayed ACK (~40 ms each).
    disable_nagle_algorithm = True
    # Idle keep-alive connections end after this, so abandoned ones do not pin threads.
    timeout = 30
    server: LabHTTPServer

    def _answer(self, with_body: bool) -> None:
        name = self.server.backend_name
        body = f"{name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", name)
        # Lets tests check that the backend sees the real client (two-arm NAT, no SNAT).
        self.send_header("X-Client-Addr", f"{self.client_address[0]}:{self.client_address[1]}")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)


class LabHTTPServer6(LabHTTPServer):
    """The same server on an IPv6 socket (--bind ::)."""

    address_family = socket.AF_INET6


class LabHTTPServer6Only(LabHTTPServer6):
    """IPv6 only, so an IPv4 server of the same process can hold the same port."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


# Linux's IP_PKTINFO; Python before 3.12 has no name for it.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def _reply_from(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that sends a reply from the address the datagram was sent to."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo: ifindex, spec_dst, addr (the header's destination).
            return [(level, kind, struct.pack("=i4s4s", 0, data[8:12], bytes(4)))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo: addr, ifindex.
            return [(level, kind, data[:16] + bytes(4))]
    return []


def serve_udp_echo(sock: socket.socket, backend_name: str) -> None:
    """Reply to every datagram with "<name> <payload>" until the process ends, from the address
    the datagram was sent to (PKTINFO), as a DNS server does: under L2 DSR that is the VIP held
    on lo, which the route toward the client would not choose as the source."""
    prefix = backend_name.encode() + b" "
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    while True:
        try:
            payload, ancillary, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(20))
            sock.sendmsg([prefix + payload], _reply_from(ancillary), 0, peer)
        except OSError as exc:
            # One unreachable peer (ICMP error surfaced on the socket) must not stop the echo.
            print(f"udp echo: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbctl.labserver",
        description="Lab backend: HTTP that answers with NAME, and a UDP echo.",
        epilog="example:\n  python -m lbctl.labserver --name be1 --http-port 80 --udp-port 9000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="backend name sent in every answer")
    parser.add_argument("--bind", action="append", default=None, metavar="ADDR",
                        help="address to listen on (:: for IPv6); repeat it to listen on several "
                             "(default 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--udp-port", type=int, default=9000)
    parser.add_argument("--log-requests", action="store_true", help="log every HTTP request")
    args = parser.parse_args(argv)
    binds: list[str] = args.bind or ["0.0.0.0"]

    # An IPv6 address ("::", an address) serves IPv6. Alone, "::" takes IPv4-mapped peers too;
    # beside an IPv4 address it is IPv6 only, so both can hold the same port.
    servers: list[LabHTTPServer] = []
    udp_socks: list[socket.socket] = []
    for bind in binds:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        v6only = family == socket.AF_INET6 and len(binds) > 1
        udp_sock = socket.socket(family, socket.SOCK_DGRAM)
        udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only:
            udp_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        udp_sock.bind((bind, args.udp_port))
        udp_socks.append(udp_sock)
        server_class = (LabHTTPServer6Only if v6only else LabHTTPServer6) \
            if family == socket.AF_INET6 else LabHTTPServer
        servers.append(server_class((bind, args.http_port), args.name, args.log_requests))

    def stop(signum: int, frame: FrameType | None) -> None:
        # Exit at once: connection threads are daemons and hold nothing worth flushing.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for udp_sock in udp_socks:
        threading.Thread(
            target=serve_udp_echo, args=(udp_sock, args.name), name="udp-echo", daemon=True
        ).start()
    for httpd in servers[1:]:
        threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    print(
        f"labserver {args.name}: http {', '.join(f'{b}:{args.http_port}' for b in binds)}, "
        f"udp echo {', '.join(f'{b}:{args.udp_port}' for b in binds)}",
        flush=True,
    )
    try:
        servers[0].serve_forever()
    finally:
        for httpd in servers:
            httpd.server_close()
        for udp_sock in udp_socks:
            udp_sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
