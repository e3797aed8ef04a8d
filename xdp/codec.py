"""Python mirrors of bpf_programs/lb_structs.h, with encoders for the maps' keys and values.

tests/bpf/test_layout.py proves these layouts equal what clang laid out for the program."""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass

from xdp.limits import BACKEND_STATES, DEFAULT_LIMITS, FLOW_STATES, FORWARDING_MODES, VIP_FLAGS

PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTOS.items()}
NO_BACKEND = 0xFFFFFFFF
BACKEND_F_IN_USE = 0x1
BACKEND_F_IPV6 = 0x2    # the address is in addr6 (LB_BACKEND_F_IPV6)
# vip_meta.flags, rendered into lb_consts.h as LB_VIP_F_* from the same table.
VIP_F_CLIENT_AFFINITY = VIP_FLAGS["client_affinity"]
VIP_F_DSR = VIP_FLAGS["dsr"]
VIP_F_FULLNAT = VIP_FLAGS["fullnat"]
AFFINITIES = ("flow", "client")     # the first is the default
FORWARDINGS = FORWARDING_MODES      # the first is the default
_FORWARDING_FLAG = {"nat": 0, "fullnat": VIP_F_FULLNAT, "dsr": VIP_F_DSR}


def vip_flags(affinity: str, forwarding: str = "nat") -> int:
    """vip_meta.flags for a VIP's options; ValueError for a value the program has no flag for."""
    if affinity not in AFFINITIES:
        raise ValueError(f"unknown affinity {affinity!r}")
    if forwarding not in _FORWARDING_FLAG:
        raise ValueError(f"unknown forwarding {forwarding!r}")
    return (VIP_F_CLIENT_AFFINITY if affinity == "client" else 0) | _FORWARDING_FLAG[forwarding]


def affinity_of(flags: int) -> str:
    return "client" if flags & VIP_F_CLIENT_AFFINITY else "flow"


def forwarding_of(flags: int) -> str:
    """The forwarding mode vip_meta.flags names (no mode bit: nat, as every VIP was before)."""
    if flags & VIP_F_DSR:
        return "dsr"
    if flags & VIP_F_FULLNAT:
        return "fullnat"
    return "nat"


def _be32(addr: str) -> int:
    """An IPv4 address as the integer whose little-endian bytes are the network-order bytes."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


def _addr(value: int) -> str:
    # inet_ntoa: a fifth of ipaddress's cost, which counts when a listing decodes 100k flows.
    return socket.inet_ntoa(value.to_bytes(4, "little"))


def is_ipv6(addr: str) -> bool:
    """Whether an address (as the control plane spells it, canonical) is IPv6."""
    return ":" in addr


def format_endpoint(addr: str, port: int) -> str:
    """ADDR:PORT as users type it: an IPv6 address in brackets, [2001:db8::10]:80."""
    return f"[{addr}]:{port}" if is_ipv6(addr) else f"{addr}:{port}"


def _addr6_bytes(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr)


def _addr6(raw: bytes) -> str:
    # inet_ntop gives RFC 5952's canonical text, as ipaddress.IPv6Address does.
    return socket.inet_ntop(socket.AF_INET6, raw)


def _be16(port: int) -> int:
    return socket.htons(port)


def _port(value: int) -> int:
    return socket.ntohs(value)


class VipKey(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class VipMeta(ctypes.Structure):
    _fields_ = [("vip_id", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("ring_generation", ctypes.c_uint32), ("backend_count", ctypes.c_uint32)]


class BackendEntry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("state", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("vip_id", ctypes.c_uint32), ("weight", ctypes.c_uint32),
                ("addr6", ctypes.c_uint32 * 4)]


class FlowKey(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint32), ("dst", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class NatEntry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("state", ctypes.c_uint8),
                ("forwarding", ctypes.c_uint8), ("backend_id", ctypes.c_uint32), ("vip_id", ctypes.c_uint32),
                ("last_seen_ns", ctypes.c_uint64), ("created_ns", ctypes.c_uint64),
                ("nh_ifindex", ctypes.c_uint32), ("nh_len_ok", ctypes.c_uint16),
                ("nh_dmac", ctypes.c_uint8 * 6), ("nh_smac", ctypes.c_uint8 * 6),
                ("nh_pad", ctypes.c_uint8 * 2)]


class SnatCfg(ctypes.Structure):
    """struct snat_cfg (lb_snat.h): a full-NAT VIP's SNAT addresses and source-port range."""

    _fields_ = [("addrs", ctypes.c_uint32 * DEFAULT_LIMITS.snat_max_addrs),
                ("addr_count", ctypes.c_uint32), ("port_min", ctypes.c_uint16),
                ("port_max", ctypes.c_uint16),
                ("addrs6", ctypes.c_uint32 * (4 * DEFAULT_LIMITS.snat_max_addrs))]


class SnatEntry(ctypes.Structure):
    """struct snat_entry (lb_snat.h): a NAT entry and the second rewrite of a full-NAT flow."""

    _fields_ = [("nat", NatEntry), ("peer_addr", ctypes.c_uint32), ("peer_port", ctypes.c_uint16),
                ("pad", ctypes.c_uint8 * 2)]


class SnatFragEntry(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("vip_id", ctypes.c_uint32),
                ("backend_id", ctypes.c_uint32), ("seen_ns", ctypes.c_uint64)]


class FragKey(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint32), ("dst", ctypes.c_uint32), ("id", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class FragEntry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("rewrite_dst", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3), ("vip_id", ctypes.c_uint32),
                ("backend_id", ctypes.c_uint32), ("seen_ns", ctypes.c_uint64)]


class VipKey6(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class FlowKey6(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint32 * 4), ("dst", ctypes.c_uint32 * 4),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class NatEntry6(ctypes.Structure):
    """struct nat_entry6: the IPv6 address, then a NatEntry whose addr is 0."""

    _fields_ = [("addr", ctypes.c_uint32 * 4), ("e", NatEntry)]


class FragKey6(ctypes.Structure):
    """struct frag_key6: a fragmented IPv6 datagram's addresses, identification and protocol."""

    _fields_ = [("src", ctypes.c_uint32 * 4), ("dst", ctypes.c_uint32 * 4), ("id", ctypes.c_uint32),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FragEntry6(ctypes.Structure):
    """struct frag_entry6: the IPv6 address, then a FragEntry whose addr is 0."""

    _fields_ = [("addr", ctypes.c_uint32 * 4), ("e", FragEntry)]


class SnatEntry6(ctypes.Structure):
    """struct snat_entry6 (lb_snat6.h): SnatEntry's IPv6 twin."""

    _fields_ = [("nat", NatEntry6), ("peer_addr", ctypes.c_uint32 * 4),
                ("peer_port", ctypes.c_uint16), ("pad", ctypes.c_uint8 * 6)]


class DpConfig(ctypes.Structure):
    """struct lb_dp_config: dp_config's one entry, LB_DP_F_* flags."""

    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Counters(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("new_flows", ctypes.c_uint64), ("drops", ctypes.c_uint64)]


@dataclass(frozen=True, order=True)
class Endpoint:
    """An IPv4 address, port and protocol: a VIP or a backend."""

    addr: str
    port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)

    @property
    def ipv6(self) -> bool:
        return is_ipv6(self.addr)


def encode_vip_key(vip: Endpoint) -> bytes:
    """The key in `vips`, or in `vips6` for an IPv6 VIP (vip_map_name says which)."""
    if vip.ipv6:
        key6 = VipKey6.from_buffer_copy(_addr6_bytes(vip.addr) + bytes(4))
        key6.port, key6.proto = _be16(vip.port), PROTOS[vip.proto]
        return bytes(key6)
    return bytes(VipKey(_be32(vip.addr), _be16(vip.port), PROTOS[vip.proto], 0))


def vip_map_name(vip: Endpoint) -> str:
    return "vips6" if vip.ipv6 else "vips"


def decode_vip_key(raw: bytes) -> Endpoint:
    """A `vips` or `vips6` key (told apart by size)."""
    if len(raw) == ctypes.sizeof(VipKey6):
        k6 = VipKey6.from_buffer_copy(raw)
        return Endpoint(_addr6(bytes(k6.addr)), _port(k6.port), PROTO_NAMES.get(k6.proto, str(k6.proto)))
    k = VipKey.from_buffer_copy(raw)
    return Endpoint(_addr(k.addr), _port(k.port), PROTO_NAMES.get(k.proto, str(k.proto)))


def encode_vip_meta(vip_id: int, ring_generation: int, backend_count: int, flags: int = 0) -> bytes:
    return bytes(VipMeta(vip_id, flags, ring_generation, backend_count))


def decode_vip_meta(raw: bytes) -> VipMeta:
    return VipMeta.from_buffer_copy(raw)


@dataclass(frozen=True)
class BackendRecord:
    """A decoded backends[] entry."""

    backend_id: int
    addr: str
    port: int
    state: str
    vip_id: int
    weight: int


def encode_backend(addr: str, port: int, state: str, vip_id: int, weight: int) -> bytes:
    state_code = BACKEND_STATES.index(state)
    if is_ipv6(addr):
        entry = BackendEntry(0, _be16(port), state_code, BACKEND_F_IN_USE | BACKEND_F_IPV6,
                             vip_id, weight)
        ctypes.memmove(entry.addr6, _addr6_bytes(addr), 16)
        return bytes(entry)
    return bytes(BackendEntry(_be32(addr), _be16(port), state_code, BACKEND_F_IN_USE, vip_id, weight))


EMPTY_BACKEND = bytes(ctypes.sizeof(BackendEntry))


def decode_backend(backend_id: int, raw: bytes) -> BackendRecord | None:
    e = BackendEntry.from_buffer_copy(raw)
    if not e.flags & BACKEND_F_IN_USE:
        return None
    state = BACKEND_STATES[e.state] if e.state < len(BACKEND_STATES) else f"state{e.state}"
    addr = _addr6(bytes(e.addr6)) if e.flags & BACKEND_F_IPV6 else _addr(e.addr)
    return BackendRecord(backend_id, addr, _port(e.port), state, e.vip_id, e.weight)


@dataclass(frozen=True)
class FlowRecord:
    """A decoded flow-table entry: client -> VIP tracked to a backend."""

    client: str
    client_port: int
    vip: str
    vip_port: int
    proto: str
    backend: str
    backend_port: int
    backend_id: int
    vip_id: int
    state: str
    last_seen_ns: int
    created_ns: int
    forwarding: str = "nat"     # the mode the flow started with (it keeps it until it ends)
    snat: str | None = None     # full-NAT: the source address and port the backend sees
    snat_port: int | None = None


def encode_flow_key(src: str, sport: int, dst: str, dport: int, proto: str) -> bytes:
    """A flows/rnat key, or a flows6/rnat6 one when the addresses are IPv6."""
    if is_ipv6(src):
        key6 = FlowKey6.from_buffer_copy(_addr6_bytes(src) + _addr6_bytes(dst) + bytes(8))
        key6.sport, key6.dport, key6.proto = _be16(sport), _be16(dport), PROTOS[proto]
        return bytes(key6)
    key = FlowKey(_be32(src), _be32(dst), _be16(sport), _be16(dport), PROTOS[proto])
    return bytes(key)


def encode_frag_key(src: str, dst: str, ip_id: int, proto: str) -> bytes:
    """A frags key: a fragmented datagram's addresses as it arrived and its IP id."""
    return bytes(FragKey(_be32(src), _be32(dst), _be16(ip_id), PROTOS[proto], 0))


def encode_frag_key6(src: str, dst: str, frag_id: int, proto: str) -> bytes:
    """A frags6 key: a fragmented IPv6 datagram's addresses as it arrived and its fragment
    header's identification."""
    key = FragKey6.from_buffer_copy(_addr6_bytes(src) + _addr6_bytes(dst) + bytes(8))
    key.id, key.proto = socket.htonl(frag_id), PROTOS[proto]
    return bytes(key)


def decode_flow(raw_key: bytes, raw_value: bytes) -> FlowRecord:
    """A flows entry, or a flows6 one (told apart by the key's size)."""
    if len(raw_key) == ctypes.sizeof(FlowKey6):
        k6 = FlowKey6.from_buffer_copy(raw_key)
        v6 = NatEntry6.from_buffer_copy(raw_value)
        e = v6.e
        state = FLOW_STATES[e.state] if e.state < len(FLOW_STATES) else f"state{e.state}"
        return FlowRecord(_addr6(bytes(k6.src)), _port(k6.sport), _addr6(bytes(k6.dst)),
                          _port(k6.dport), PROTO_NAMES.get(k6.proto, str(k6.proto)),
                          _addr6(bytes(v6.addr)), _port(e.port), e.backend_id, e.vip_id, state,
                          e.last_seen_ns, e.created_ns)
    k = FlowKey.from_buffer_copy(raw_key)
    v = NatEntry.from_buffer_copy(raw_value)
    state = FLOW_STATES[v.state] if v.state < len(FLOW_STATES) else f"state{v.state}"
    return FlowRecord(_addr(k.src), _port(k.sport), _addr(k.dst), _port(k.dport),
                      PROTO_NAMES.get(k.proto, str(k.proto)), _addr(v.addr), _port(v.port),
                      v.backend_id, v.vip_id, state, v.last_seen_ns, v.created_ns,
                      FORWARDING_MODES[v.forwarding] if v.forwarding < len(FORWARDING_MODES)
                      else f"mode{v.forwarding}")


def decode_snat_flow(raw_key: bytes, raw_value: bytes) -> FlowRecord:
    """A snat_flows entry (client -> VIP of a full-NAT VIP) as a flow with its SNAT source, or
    a snat_flows6 one (told apart by the key's size)."""
    if len(raw_key) == ctypes.sizeof(FlowKey6):
        k6 = FlowKey6.from_buffer_copy(raw_key)
        e6 = SnatEntry6.from_buffer_copy(raw_value)
        n = e6.nat.e
        state = FLOW_STATES[n.state] if n.state < len(FLOW_STATES) else f"state{n.state}"
        return FlowRecord(_addr6(bytes(k6.src)), _port(k6.sport), _addr6(bytes(k6.dst)),
                          _port(k6.dport), PROTO_NAMES.get(k6.proto, str(k6.proto)),
                          _addr6(bytes(e6.nat.addr)), _port(n.port), n.backend_id, n.vip_id, state,
                          n.last_seen_ns, n.created_ns, "fullnat", _addr6(bytes(e6.peer_addr)),
                          _port(e6.peer_port))
    k = FlowKey.from_buffer_copy(raw_key)
    e = SnatEntry.from_buffer_copy(raw_value)
    v = e.nat
    state = FLOW_STATES[v.state] if v.state < len(FLOW_STATES) else f"state{v.state}"
    return FlowRecord(_addr(k.src), _port(k.sport), _addr(k.dst), _port(k.dport),
                      PROTO_NAMES.get(k.proto, str(k.proto)), _addr(v.addr), _port(v.port),
                      v.backend_id, v.vip_id, state, v.last_seen_ns, v.created_ns, "fullnat",
                      _addr(e.peer_addr), _port(e.peer_port))


@dataclass(frozen=True)
class SnatSettings:
    """A full-NAT VIP's snat_cfg entry: its SNAT addresses (none: the FIB's) and port range."""

    addrs: tuple[str, ...]
    port_min: int
    port_max: int


def encode_snat_cfg(addrs: tuple[str, ...], port_min: int, port_max: int) -> bytes:
    """A snat_cfg entry: IPv4 addresses go in addrs, IPv6 ones in addrs6 (a VIP's SNAT
    addresses share its family; addr_count counts them either way)."""
    if len(addrs) > DEFAULT_LIMITS.snat_max_addrs:
        raise ValueError(f"{len(addrs)} SNAT addresses, at most {DEFAULT_LIMITS.snat_max_addrs} fit")
    if len({is_ipv6(a) for a in addrs}) > 1:
        raise ValueError(f"SNAT addresses {', '.join(addrs)} mix IPv4 and IPv6")
    cfg = SnatCfg()
    cfg.addr_count, cfg.port_min, cfg.port_max = len(addrs), port_min, port_max
    for i, addr in enumerate(addrs):
        if is_ipv6(addr):
            ctypes.memmove(ctypes.addressof(cfg.addrs6) + 16 * i, _addr6_bytes(addr), 16)
        else:
            cfg.addrs[i] = _be32(addr)
    return bytes(cfg)


def decode_snat_cfg(raw: bytes) -> SnatSettings:
    c = SnatCfg.from_buffer_copy(raw)
    count = min(c.addr_count, DEFAULT_LIMITS.snat_max_addrs)
    # An IPv6 VIP's entry has its addresses in addrs6 and none in addrs.
    if count and not any(c.addrs[i] for i in range(count)):
        raw6 = bytes(c.addrs6)
        return SnatSettings(tuple(_addr6(raw6[16 * i:16 * i + 16]) for i in range(count)),
                            c.port_min, c.port_max)
    return SnatSettings(tuple(_addr(c.addrs[i]) for i in range(count)), c.port_min, c.port_max)


def encode_u32(value: int) -> bytes:
    return struct.pack("=I", value)


def decode_counters(per_cpu: list[bytes]) -> dict[str, int]:
    """Sums one per-CPU counters value over all CPUs."""
    total = {field[0]: 0 for field in Counters._fields_}
    for raw in per_cpu:
        c = Counters.from_buffer_copy(raw[: ctypes.sizeof(Counters)])
        for name in total:
            total[name] += getattr(c, name)
    return total


class ExplainMeta(ctypes.Structure):
    """struct lb_explain: `lbctl explain` asks in the XDP metadata, the program answers there."""

    _fields_ = [("magic", ctypes.c_uint32), ("verdict", ctypes.c_uint32), ("vip_id", ctypes.c_uint32),
                ("ring_generation", ctypes.c_uint32), ("slot", ctypes.c_uint32),
                ("backend_id", ctypes.c_uint32), ("backend_addr", ctypes.c_uint32),
                ("backend_port", ctypes.c_uint16), ("flow_state", ctypes.c_uint8),
                ("forwarding", ctypes.c_uint8), ("flow_age_ms", ctypes.c_uint64),
                ("backend_addr6", ctypes.c_uint32 * 4)]
