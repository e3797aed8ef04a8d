"""Guards against input that cannot work or would hurt this host: a VIP on one of its own
addresses and ports where a local service listens (sshd on :22, say), and VIPs or backends
on addresses no packet can be balanced to (loopback, broadcast, multicast, unspecified)."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
    return {str(i.ip) for i in local_networks()}


def local_service_at(vip: Endpoint) -> Listener | None:
    """The local socket a VIP would take traffic from, or None when there is none."""
    if vip.addr not in local_addresses():
        return None
    with open(f"/proc/net/{vip.proto}") as f:
        listeners = parse_proc_net(f.read(), vip.proto)
    return next((ls for ls in listeners if ls.port == vip.port and ls.addr in (vip.addr, "0.0.0.0")),
                None)


# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h). A plain netlink
# socket instead of pyroute2: importing pyroute2 cost each command 0.15-0.5 s.
_RTM_NEWROUTE, _RTM_GETADDR, _RTM_GETROUTE = 24, 22, 26
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RTA_DST, _RTA_OIF = 1, 4
_NLMSG_HDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one recv; an error message raises OSError."""
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, msg_type, _, _, _ = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size:
            return
        payload = data[offset + _NLMSG_HDR.size:offset + length]
        if msg_type == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code:
                raise OSError(code, os.strerror(code))
        yield msg_type, payload
        offset += _align4(length)


def _attrs(payload: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(payload):
        attr_len, attr_type = _RTATTR.unpack_from(payload, offset)
        if attr_len < _RTATTR.size:
            break
        out[attr_type] = payload[offset + _RTATTR.size:offset + attr_len]
        offset += _align4(attr_len)
    return out


def parse_addr_dump(data: bytes) -> tuple[list[ipaddress.IPv4Interface], bool]:
    """IPv4 interface addresses in one recv of an RTM_GETADDR dump, and whether it ended."""
    out: list[ipaddress.IPv4Interface] = []
    for msg_type, payload in _messages(data):
        if msg_type == _NLMSG_DONE:
            return out, True
        family, prefixlen, _, _, _ = _IFADDRMSG.unpack_from(payload)
        attrs = _attrs(payload, _IFADDRMSG.size)
        # On a point-to-point link IFA_ADDRESS is the peer; IFA_LOCAL is always our own.
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if family == socket.AF_INET and raw is not None and len(raw) == 4:
            out.append(ipaddress.IPv4Interface((raw, prefixlen)))
    return out, False


def _rtnl() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


def local_networks() -> list[ipaddress.IPv4Interface]:
    """This network namespace's IPv4 addresses with their prefixes: its connected subnets."""
    with _rtnl() as sock:
        request = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(request), _RTM_GETADDR,
                                  _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + request)
        out: list[ipaddress.IPv4Interface] = []
        while True:
            found, done = parse_addr_dump(sock.recv(65536))
            out.extend(found)
            if done:
                return out


def egress_ifindex(addr: str) -> int | None:
    """The interface this namespace's routing sends packets for `addr` out of (`ip route get`),
    or None when it has no route."""
    dst = ipaddress.ip_address(addr).packed
    family = socket.AF_INET6 if len(dst) == 16 else socket.AF_INET
    request = (_RTMSG.pack(family, 8 * len(dst), 0, 0, 0, 0, 0, 0, 0)
               + _RTATTR.pack(_RTATTR.size + len(dst), _RTA_DST) + dst)
    with _rtnl() as sock:
        sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(request), _RTM_GETROUTE, _NLM_F_REQUEST, 1, 0)
                  + request)
        try:
            for msg_type, payload in _messages(sock.recv(65536)):
                if msg_type == _RTM_NEWROUTE:
                    oif = _attrs(payload, _RTMSG.size).get(_RTA_OIF)
                    return struct.unpack("=I", oif)[0] if oif else None
        except OSError:
            return None      # ENETUNREACH and friends: no route
    return None


def unusable_reason(addr: str, networks: Iterable[ipaddress.IPv4Interface]) -> str | None:
    """Why no connection through the balancer can reach `addr`, or None when it is an ordinary
    unicast address. A subnet's broadcast address is only knowable for the subnets this host
    is on; elsewhere x.y.z.255 may well be a host."""
    ip = ipaddress.ip_address(addr)
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_loopback:
        return f"{ip} is a loopback address (a packet to it never leaves the host it is sent on)"
    if ip.is_multicast:
        return f"{ip} is a multicast address (a TCP connection or a balanced flow needs one host)"
    if ip.version == 6:
        if ip.is_link_local:
            return f"{ip} is a link-local address (it needs a zone; the balancer routes)"
        return None
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
