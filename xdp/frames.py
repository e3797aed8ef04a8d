"""Ethernet/IPv4/IPv6/TCP/UDP frames with correct lengths and checksums, for test runs,
benches and tests: the one place headers are packed by hand (scapy is a test dependency, and
~1 ms a frame)."""
from __future__ import annotations

import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_HLEN = 14
IPPROTO_TCP, IPPROTO_UDP = 6, 17
IP_DF = 0x4000                 # don't fragment, in the flags-and-offset word
IP_MF = 0x2000                 # more fragments
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCP_WINDOW = 64240             # what Linux advertises on a fresh connection
DEFAULT_TTL = 64
ZERO_MAC = "00:00:00:00:00:00"
_PROTO_NUMBERS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


def ones_sum(data: bytes) -> int:
    """The one's-complement sum of the 16-bit words, mod 0xffff: 2**16 is 1 mod 0xffff, so
    the big-endian number mod 0xffff is that sum. 0 over a header whose checksum is right."""
    if len(data) % 2:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def internet_checksum(data: bytes) -> int:
    """RFC 1071's checksum of data (its checksum field zeroed). A sum of 0 gives 0xffff, never
    0: UDP reads 0 as "no checksum", and for IPv4 and TCP both spellings verify alike."""
    rest = ones_sum(data)
    return 0xFFFF - rest if rest else 0xFFFF


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def ipv4_bytes(addr: str) -> bytes:
    octets = [int(o) for o in addr.split(".")]
    if len(octets) != 4 or not all(0 <= o <= 255 for o in octets):
        raise ValueError(f"not an IPv4 address: {addr!r}")
    return bytes(octets)


def proto_number(proto: int | str) -> int:
    return _PROTO_NUMBERS[proto] if isinstance(proto, str) else proto


def ipv6_bytes(addr: str) -> bytes:
    import socket

    try:
        return socket.inet_pton(socket.AF_INET6, addr)
    except OSError:
        raise ValueError(f"not an IPv6 address: {addr!r}") from None


def pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    """What TCP and UDP checksums cover besides their own bytes: IPv4's (RFC 793) or, for
    IPv6 addresses, IPv6's (RFC 8200 8.1: 32-bit length, next header last)."""
    if ":" in src:
        return ipv6_bytes(src) + ipv6_bytes(dst) + struct.pack("!IxxxB", length, proto)
    return ipv4_bytes(src) + ipv4_bytes(dst) + struct.pack("!BBH", 0, proto, length)


def _with_checksum(header: bytes, offset: int, covered: bytes) -> bytes:
    return header[:offset] + struct.pack("!H", internet_checksum(covered)) + header[offset + 2:]


def tcp_segment(src: str, dst: str, sport: int, dport: int, *, flags: int = TCP_ACK,
                seq: int = 1000, ack: int | None = None, window: int = TCP_WINDOW,
                options: bytes = b"", payload: bytes = b"") -> bytes:
    """A TCP header (options padded by the caller to 32-bit words) and payload, checksummed
    over the pseudo header of src and dst. `ack` defaults to 1 with the ACK flag, else 0."""
    if len(options) % 4:
        raise ValueError(f"TCP options must fill whole 32-bit words, got {len(options)} bytes")
    ack = (1 if flags & TCP_ACK else 0) if ack is None else ack
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (20 + len(options)) // 4 << 4,
                         flags, window, 0, 0) + options
    segment = header + payload
    covered = pseudo_header(src, dst, IPPROTO_TCP, len(segment)) + segment
    return _with_checksum(segment, 16, covered)


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *,
                 checksum: bool = True, length: int | None = None) -> bytes:
    """A UDP header and payload. checksum=False sends 0 ("none"); `length` overrides the
    length field (a first fragment's covers the whole datagram), the checksum then computed
    as if the datagram were these bytes."""
    length = 8 + len(payload) if length is None else length
    datagram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if not checksum:
        return datagram
    covered = pseudo_header(src, dst, IPPROTO_UDP, length) + datagram
    return _with_checksum(datagram, 6, covered)


def ipv4_packet(src: str, dst: str, proto: int | str, l4: bytes, *, ttl: int = DEFAULT_TTL,
                ident: int = 0, frag: int = 0, tos: int = 0, options: bytes = b"") -> bytes:
    """An IPv4 header (options padded by the caller to 32-bit words) before l4, checksummed.
    `frag` is the whole flags-and-offset word (IP_DF, IP_MF | offset in 8-byte units)."""
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"IPv4 options must be whole 32-bit words, at most 40 bytes, got "
                         f"{len(options)}")
    ihl = (20 + len(options)) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(l4), ident, frag,
                         ttl, proto_number(proto), 0, ipv4_bytes(src), ipv4_bytes(dst)) + options
    return _with_checksum(header, 10, header) + l4


def ipv6_packet(src: str, dst: str, proto: int | str, l4: bytes, *,
                hop_limit: int = DEFAULT_TTL) -> bytes:
    """An IPv6 header (no extension headers) before l4; IPv6 has no header checksum."""
    return struct.pack("!IHBB", 6 << 28, len(l4), proto_number(proto), hop_limit) + \
        ipv6_bytes(src) + ipv6_bytes(dst) + l4


def _ip_frame(src_mac: str, dst_mac: str, src: str, dst: str, proto: int, l4: bytes, *,
              ttl: int, ident: int, frag: int, ip_options: bytes) -> bytes:
    if ":" in src:      # IPv6: no id, fragment word or options in the fixed header
        return ethernet_frame(src_mac, dst_mac, ipv6_packet(src, dst, proto, l4, hop_limit=ttl),
                              ETH_P_IPV6)
    return ethernet_frame(src_mac, dst_mac, ipv4_packet(
        src, dst, proto, l4, ttl=ttl, ident=ident, frag=frag, options=ip_options))


def ethernet_frame(src_mac: str, dst_mac: str, payload: bytes,
                   ethertype: int = ETH_P_IP) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload


def tcp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, *,
              flags: int = TCP_ACK, seq: int = 1000, ack: int | None = None,
              window: int = TCP_WINDOW, tcp_options: bytes = b"", payload: bytes = b"",
              ttl: int = DEFAULT_TTL, ident: int = 0, frag: int = 0,
              ip_options: bytes = b"") -> bytes:
    """Ethernet + IPv4 (or IPv6, for IPv6 addresses) + TCP, every length and checksum right."""
    segment = tcp_segment(src, dst, sport, dport, flags=flags, seq=seq, ack=ack, window=window,
                          options=tcp_options, payload=payload)
    return _ip_frame(src_mac, dst_mac, src, dst, IPPROTO_TCP, segment, ttl=ttl, ident=ident,
                     frag=frag, ip_options=ip_options)


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
              payload: bytes = b"", *, checksum: bool = True, length: int | None = None,
              ttl: int = DEFAULT_TTL, ident: int = 0, frag: int = 0,
              ip_options: bytes = b"") -> bytes:
    """Ethernet + IPv4 (or IPv6) + UDP, every length and checksum right (checksum=False: 0)."""
    datagram = udp_datagram(src, dst, sport, dport, payload, checksum=checksum, length=length)
    return _ip_frame(src_mac, dst_mac, src, dst, IPPROTO_UDP, datagram, ttl=ttl, ident=ident,
                     frag=frag, ip_options=ip_options)
