"""Guards against input that cannot work or would hurt this host: a VIP on one of its own
addresses and ports where a local service listens (sshd on :22, say), and VIPs or backends
on addresses no packet can be balanced to (loopback, broadcast, multicast, unspecified)."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from collections.abc import Iterable

from lbctl.errors import ConfigError
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


def local_networks() -> list[ipaddress.IPv4Interface]:
    """This network namespace's IPv4 addresses with their prefixes: its connected subnets."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        return [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in ipr.get_addr(family=socket.AF_INET)]


def unusable_reason(addr: str, networks: Iterable[ipaddress.IPv4Interface]) -> str | None:
    """Why no connection through the balancer can reach `addr`, or None when it is an ordinary
    unicast address. A subnet's broadcast address is only knowable for the subnets this host
    is on; elsewhere x.y.z.255 may well be a host."""
    ip = ipaddress.IPv4Address(addr)
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_loopback:
        return f"{ip} is a loopback address (a packet to it never leaves the host it is sent on)"
    if ip.is_multicast:
        return f"{ip} is a multicast address (a TCP connection or a balanced flow needs one host)"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{ip} is the limited broadcast address"
    for net in networks:
        # /31 and /32 have no broadcast address (RFC 3021).
        if net.network.prefixlen <= 30 and ip == net.network.broadcast_address:
            return f"{ip} is the broadcast address of {net.network}, a subnet of this host"
    return None


def check_usable(endpoint: Endpoint, what: str, networks: Iterable[ipaddress.IPv4Interface]) -> None:
    """Raises ConfigError when `endpoint` (a VIP or a backend) cannot work at all."""
    reason = unusable_reason(endpoint.addr, networks)
    if reason is not None:
        hint = ("use a unicast address that clients route to this balancer, e.g. 10.0.0.10:80"
                if what == "VIP" else "name the server's own unicast address, e.g. 10.0.1.11:8080")
        raise ConfigError(f"{what} {endpoint} cannot be used: {reason}; hint: {hint}")
