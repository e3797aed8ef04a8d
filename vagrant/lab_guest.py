"""Guest side of vagrant/run-demo.sh: the lab topology as lines, and lab traffic from the client.

Runs inside a VM with the interpreter lbctl/setup.sh made (/srv/lbctl/.venv/bin/python):
  lab_guest.py topology                 key/value lines from lbctl/lab_topology.yaml
  lab_guest.py http HOST PORT COUNT     COUNT GETs, each on a new TCP connection
  lab_guest.py udp HOST PORT COUNT      COUNT datagrams, each from a new socket (source port)
Traffic prints one line per request: the backend that answered, or "error: ..."; it exits 0
even when requests fail, so the caller can show how many did.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys

TIMEOUT_S = 3.0
# After this many failures in a row the rest are not sent: a broken path would otherwise
# cost COUNT timeouts.
GIVE_UP_AFTER = 10


def print_topology() -> None:
    # Imported here: traffic needs nothing but the standard library.
    from lbctl.lab import Lab

    lab = Lab()
    client_networks = {i.network for i in lab.client.ifaces}
    print("vip", lab.vip)
    print("http_port", lab.http_port)
    print("udp_port", lab.udp_port)
    print("client_addr", lab.client.addr)
    for iface in lab.lb.ifaces:
        side = "client" if iface.network in client_networks else "backend"
        print(f"lb_{side}_addr", iface.addr)
    for backend in lab.backends:
        print("backend", backend.name, backend.addr)


def http_once(host: str, port: int) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace").strip()
        if resp.status != 200:
            return f"error: HTTP {resp.status}"
        return resp.getheader("X-Backend") or body or "error: empty answer"
    finally:
        conn.close()


def udp_once(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT_S)
        # connect() drops datagrams from anyone but the target and turns an ICMP
        # port-unreachable into an error instead of a timeout.
        sock.connect((host, port))
        sock.send(b"hello")
        reply = sock.recv(65535).decode("utf-8", "replace")
    # The lab's echo answers "<backend name> <payload>".
    return reply.split(" ", 1)[0] or "error: empty answer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab_guest.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("topology")
    for what in ("http", "udp"):
        p = sub.add_parser(what)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("count", type=int)
    args = parser.parse_args(argv)
    if args.what == "topology":
        print_topology()
        return 0
    once = http_once if args.what == "http" else udp_once
    failures_in_a_row = 0
    for _ in range(args.count):
        if failures_in_a_row >= GIVE_UP_AFTER:
            print(f"error: not sent after {GIVE_UP_AFTER} failures in a row")
            continue
        try:
            line = once(args.host, args.port)
        except (OSError, http.client.HTTPException) as exc:
            line = f"error: {type(exc).__name__}: {exc}"
        failures_in_a_row = failures_in_a_row + 1 if line.startswith("error:") else 0
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
