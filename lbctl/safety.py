"""Guards against typos that would take traffic away from this host itself: a VIP on one of
its own addresses and ports where a local service listens (sshd on :22, say)."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from xdp.codec import Endpoint

# /proc/net/tcp state 0A is LISTEN; a bound UDP socket shows 07 (TCP_CLOSE) with no peer.
_LISTEN_STATES = {"tcp": "0A", "udp": "07"}


@dataclass(frozen=True)
class Listener:
    addr: str
    port: int


def parse_proc_net(text: str, proto: str) -> list[Listener]:
    """IPv4 sockets bound for incoming traffic, from /proc/net/tcp or /proc/net/udp text."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTEN_STATES[proto]:
            continue
        local, remote = fields[1], fields[2]
        if proto == "udp" and not remote.startswith("00000000:"):
            continue  # a connected UDP socket answers only its peer
        addr_hex, port_hex = local.split(":")
        # The address is printed as the host-order integer of the network-order bytes.
        addr = str(ipaddress.IPv4Address(int(addr_hex, 16).to_bytes(4, "little")))
        out.append(Listener(addr, int(port_hex, 16)))
    return out


def local_addresses() -> set[str]:
    """IPv4 addresses of this network namespace's interfaces."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def local_service_at(vip: Endpoint) -> Listener | None:
    """The local socket a VIP would take traffic from, or None when there is none."""
    if vip.addr not in local_addresses():
        return None
    with open(f"/proc/net/{vip.proto}") as f:
        listeners = parse_proc_net(f.read(), vip.proto)
    return next((ls for ls in listeners if ls.port == vip.port and ls.addr in (vip.addr, "0.0.0.0")),
                None)
