"""The configuration model: VIPs and backends as the user names them, parsed and validated,
and the names the CLI and config files accept (protocols, backend states, XDP modes)."""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lbctl.errors import ConfigError
from lbctl.maglev import MAX_WEIGHT
from xdp.balancer import MODES
from xdp.codec import AFFINITIES, FORWARDINGS, PROTOS, Endpoint, format_endpoint
from xdp.limits import BACKEND_STATES, DEFAULT_LIMITS

# The spellings users type; each comes from the data plane's own table, so a name added
# there is accepted here and nowhere else needs to change.
PROTO_NAMES: tuple[str, ...] = tuple(PROTOS)
XDP_MODES: tuple[str, ...] = tuple(MODES)
AFFINITY_NAMES: tuple[str, ...] = AFFINITIES
FORWARDING_NAMES: tuple[str, ...] = FORWARDINGS
# Forwarding modes the contract names whose data path is not built yet: refused here, the one
# place the CLI, the config file and the planner ask, with why (never silently NATed instead).
FORWARDING_NOT_YET: dict[str, str] = {
}
# full-NAT's source ports, claimed per flow. The default stays below Linux's default
# ephemeral range (net.ipv4.ip_local_port_range 32768-60999): the balancer's own connections
# to a backend (the agent's health checks) then never share a tuple with a claimed port.
SNAT_PORTS_DEFAULT: tuple[int, int] = (1024, 32767)


def check_forwarding(forwarding: str) -> str:
    """A forwarding mode this build can run, or ConfigError saying why not."""
    if forwarding not in FORWARDING_NAMES:
        raise ConfigError(f"unknown forwarding mode '{forwarding}'; hint: use one of "
                          f"{', '.join(FORWARDING_NAMES)}")
    if forwarding in FORWARDING_NOT_YET:
        raise ConfigError(f"forwarding mode '{forwarding}' is not supported yet: "
                          f"{FORWARDING_NOT_YET[forwarding]}; hint: use --forwarding nat "
                          "(two-arm NAT: the backends route their replies through the balancer)")
    return forwarding


def parse_proto(proto: str) -> str:
    value = proto.lower()
    if value not in PROTOS:
        raise ConfigError(f"unknown protocol '{proto}'; hint: use one of {', '.join(PROTO_NAMES)}")
    return value


@dataclass(frozen=True, order=True)
class HostPort:
    """An address and port as typed, before a protocol makes it an Endpoint (on the command
    line the protocol is a separate option, parsed independently)."""

    addr: str
    port: int

    def on(self, proto: str) -> Endpoint:
        return Endpoint(self.addr, self.port, parse_proto(proto))

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)


def parse_host_port(text: str, what: str = "address") -> HostPort:
    """'10.0.0.10:80' or '[2001:db8::10]:80' -> HostPort (the address in its canonical text);
    the port is required, and an IPv6 address needs its brackets."""
    example = "e.g. 10.0.0.10:80 or [2001:db8::10]:80"
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"malformed {what} '{text}': expected [IPV6]:PORT; hint: {example}")
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"malformed {what} '{text}': '{host}' is not an IPv6 address; "
                              f"hint: {example}") from None
        if addr.scope_id is not None:
            raise ConfigError(f"malformed {what} '{text}': a zone ({addr.scope_id}) has no place "
                              f"in an endpoint; hint: use a global or unique-local address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"malformed {what} '{text}': expected ADDR:PORT; hint: {example}")
        if ":" in host:
            raise ConfigError(f"malformed {what} '{text}': an IPv6 address needs brackets; "
                              f"hint: [{host}]:{port_text}")
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"malformed {what} '{text}': '{host}' is not an IPv4 address; "
                              f"hint: {example}") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"malformed {what} '{text}': port '{port_text}' is not in 1-65535; "
                          f"hint: {example}")
    if isinstance(addr, ipaddress.IPv6Address):
        unusable = addr.is_unspecified or addr.is_multicast or addr.is_link_local or \
            addr.ipv4_mapped is not None
        why = "not a global or unique-local unicast address"
    else:
        unusable = addr.is_unspecified or addr.is_multicast or \
            addr == ipaddress.IPv4Address("255.255.255.255")
        why = "not a unicast address"
    if unusable:
        raise ConfigError(f"{what} '{text}' cannot be used: {addr} is {why}; "
                          "hint: use a host address")
    return HostPort(str(addr), int(port_text))


def parse_endpoint(text: str, proto: str = "tcp", what: str = "address") -> Endpoint:
    """'10.0.0.10:80' and a protocol -> Endpoint."""
    return parse_host_port(text, what).on(proto)


def check_weight(weight: int) -> int:
    if not 1 <= weight <= MAX_WEIGHT:
        raise ConfigError(f"weight {weight} is out of range; hint: use 1-{MAX_WEIGHT} "
                          "(set --state drain to stop new connections instead)")
    return weight


def check_state(state: str) -> str:
    if state not in BACKEND_STATES:
        raise ConfigError(f"unknown backend state '{state}'; hint: use one of {', '.join(BACKEND_STATES)}")
    return state


@dataclass(frozen=True)
class BackendSpec:
    addr: str
    port: int
    weight: int = 1
    state: str = "active"

    @property
    def name(self) -> str:
        return format_endpoint(self.addr, self.port)

    @property
    def in_ring(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class VipSpec:
    vip: Endpoint
    backends: tuple[BackendSpec, ...] = field(default=())
    affinity: str = "flow"              # flow: the 5-tuple picks the backend; client: the source address
    forwarding: str = "nat"             # nat (two-arm) | fullnat (one-arm, SNAT) | dsr (L2, MAC only)
    # fullnat only: source addresses (none: the balancer's own toward each backend, by the
    # FIB) and the source-port range (inclusive) claimed per flow.
    snat: tuple[str, ...] = ()
    snat_ports: tuple[int, int] = SNAT_PORTS_DEFAULT

    def backend(self, name: str) -> BackendSpec | None:
        return next((b for b in self.backends if b.name == name), None)


def check_vip(spec: VipSpec) -> VipSpec:
    """The rules a VIP's spec must meet whatever path it came by (CLI, file, agent); raises
    ConfigError naming what is wrong and the fix."""
    check_forwarding(spec.forwarding)
    problem = snat_family_problem(spec.vip, spec.snat)
    if problem is not None:
        raise ConfigError(problem)
    for b in spec.backends:
        problem = backend_problem(spec.vip, spec.forwarding, b.addr, b.port)
        if problem is not None:
            raise ConfigError(problem)
    if spec.forwarding != "fullnat" and (spec.snat or spec.snat_ports != SNAT_PORTS_DEFAULT):
        raise ConfigError(f"VIP {spec.vip}: SNAT addresses and ports are for full-NAT only (this "
                          f"VIP forwards by {spec.forwarding}); hint: add --forwarding fullnat, or "
                          "drop --snat/--snat-ports")
    return spec


def backend_problem(vip: Endpoint, forwarding: str, addr: str, port: int) -> str | None:
    """Why a backend cannot serve a VIP in this forwarding mode (a one-line error with a
    hint), or None. DSR delivers the client's packet unchanged, so the backend must listen on
    the VIP's own port: the balancer rewrites no port and sees no reply to rewrite back."""
    if forwarding == "dsr" and port != vip.port:
        return (f"backend {addr}:{port} of DSR VIP {vip}: its port differs from the VIP's ({vip.port}); "
                f"hint: a DSR backend receives the client's packet unchanged, so it must serve the VIP's "
                f"port: use {addr}:{vip.port}, or --forwarding nat to translate ports")
    return None


def snat_family_problem(vip: Endpoint, snat: Sequence[str]) -> str | None:
    """Why a VIP's SNAT addresses cannot serve it (one line with a hint), or None: the balancer
    rewrites addresses in place, so the source a backend sees is of the VIP's family."""
    for addr in snat:
        if (":" in addr) != vip.ipv6:
            fam, vfam = ("IPv6", "IPv4") if ":" in addr else ("IPv4", "IPv6")
            example = "2001:db8:1::2" if vip.ipv6 else "10.0.1.2"
            return (f"SNAT address {addr} is {fam} but VIP {vip} is {vfam}; hint: a full-NAT VIP's "
                    f"SNAT addresses share its address family (e.g. --snat {example}), or leave "
                    "--snat out to use the balancer's own address toward each backend")
    return None


def parse_snat_addrs(text: str | Sequence[str], max_addrs: int = DEFAULT_LIMITS.snat_max_addrs
                     ) -> tuple[str, ...]:
    """'10.0.1.2,10.0.1.3' or '2001:db8:1::2' (or a list) -> SNAT addresses: unicast, of one
    family, distinct, at most max_addrs (the program's LB_SNAT_MAX_ADDRS), IPv6 ones in their
    canonical form."""
    items = text.split(",") if isinstance(text, str) else list(text)
    addrs: list[str] = []
    for item in (i.strip() for i in items):
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(item)
        except ValueError:
            raise ConfigError(f"SNAT address '{item}' is not an IPv4 or IPv6 address; hint: e.g. "
                              "--snat 10.0.1.2,10.0.1.3 or --snat 2001:db8:1::2") from None
        # IPv6 link-local needs a zone, and a mapped address is IPv4 in disguise.
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback or \
                addr == ipaddress.IPv4Address("255.255.255.255") or \
                (isinstance(addr, ipaddress.IPv6Address) and
                 (addr.is_link_local or addr.ipv4_mapped is not None)):
            raise ConfigError(f"SNAT address '{item}' is not a unicast host address; hint: use "
                              "an address of the balancer that the backends can reach")
        if addrs and (":" in addrs[0]) != (addr.version == 6):
            raise ConfigError(f"SNAT addresses {addrs[0]} and {addr} mix IPv4 and IPv6; hint: a "
                              "VIP's SNAT addresses share its address family")
        if str(addr) in addrs:
            raise ConfigError(f"SNAT address {addr} is listed twice; hint: name each address once")
        addrs.append(str(addr))
    if not addrs:
        raise ConfigError("no SNAT address given; hint: e.g. --snat 10.0.1.2, or leave it out "
                          "to use the balancer's own address toward each backend")
    if len(addrs) > max_addrs:
        raise ConfigError(f"{len(addrs)} SNAT addresses given, at most {max_addrs} fit; hint: "
                          "each address already gives every backend its own port range")
    return tuple(addrs)


def parse_port_range(text: str) -> tuple[int, int]:
    """'1024-32767' (or one port, '5000') -> (low, high), both in 1-65535, low <= high."""
    low_text, sep, high_text = str(text).strip().partition("-")
    if not sep:
        high_text = low_text
    if not (low_text.strip().isdigit() and high_text.strip().isdigit()):
        raise ConfigError(f"malformed port range '{text}': expected LOW-HIGH; hint: e.g. "
                          f"{SNAT_PORTS_DEFAULT[0]}-{SNAT_PORTS_DEFAULT[1]}")
    low, high = int(low_text), int(high_text)
    if not (1 <= low <= high <= 65535):
        raise ConfigError(f"port range '{text}' is not within 1-65535 with LOW <= HIGH; hint: e.g. "
                          f"{SNAT_PORTS_DEFAULT[0]}-{SNAT_PORTS_DEFAULT[1]}")
    return low, high


def format_port_range(ports: tuple[int, int]) -> str:
    return f"{ports[0]}-{ports[1]}"


# The whole desired configuration: VIP endpoint -> its spec.
Config = dict[Endpoint, VipSpec]


def with_backend(spec: VipSpec, backend: BackendSpec) -> VipSpec:
    others = tuple(b for b in spec.backends if b.name != backend.name)
    return replace(spec, backends=tuple(sorted(others + (backend,), key=lambda b: (b.addr, b.port))))


def without_backend(spec: VipSpec, name: str) -> VipSpec:
    return replace(spec, backends=tuple(b for b in spec.backends if b.name != name))
