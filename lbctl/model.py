"""The configuration model: VIPs and backends as the user names them, parsed and validated."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from lbctl.errors import ConfigError
from lbctl.maglev import MAX_WEIGHT
from xdp.codec import PROTOS, Endpoint
from xdp.limits import BACKEND_STATES


def parse_proto(proto: str) -> str:
    value = proto.lower()
    if value not in PROTOS:
        raise ConfigError(f"unknown protocol '{proto}'; hint: use tcp or udp")
    return value


def parse_endpoint(text: str, proto: str = "tcp", what: str = "address") -> Endpoint:
    """'10.0.0.10:80' -> Endpoint. IPv4 only for now; the port is required."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"malformed {what} '{text}': expected ADDR:PORT; hint: e.g. 10.0.0.10:80")
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"malformed {what} '{text}': '{host}' is not an IPv4 address; "
                          "hint: e.g. 10.0.0.10:80 (IPv6 is not supported yet)") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"malformed {what} '{text}': port '{port_text}' is not in 1-65535; "
                          "hint: e.g. 10.0.0.10:80")
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(f"{what} '{text}' cannot be used: {addr} is not a unicast address; "
                          "hint: use a host address")
    return Endpoint(str(addr), int(port_text), parse_proto(proto))


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
        return f"{self.addr}:{self.port}"

    @property
    def in_ring(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class VipSpec:
    vip: Endpoint
    backends: tuple[BackendSpec, ...] = field(default=())

    def backend(self, name: str) -> BackendSpec | None:
        return next((b for b in self.backends if b.name == name), None)


# The whole desired configuration: VIP endpoint -> its spec.
Config = dict[Endpoint, VipSpec]


def with_backend(spec: VipSpec, backend: BackendSpec) -> VipSpec:
    others = tuple(b for b in spec.backends if b.name != backend.name)
    return replace(spec, backends=tuple(sorted(others + (backend,), key=lambda b: (b.addr, b.port))))


def without_backend(spec: VipSpec, name: str) -> VipSpec:
    return replace(spec, backends=tuple(b for b in spec.backends if b.name != name))
