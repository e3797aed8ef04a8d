"""The routed namespace's ports as the bpf tests describe them (conftest's routed_netns builds them)."""
from __future__ import annotations

from dataclasses import dataclass


def mac_of(addr: str) -> str:
    """A locally administered MAC derived from an IPv4 address: readable in a hex dump."""
    return "02:00:" + ":".join(f"{int(octet):02x}" for octet in addr.split("."))


@dataclass(frozen=True)
class Port:
    name: str                   # the interface; its veth peer is name + "p"
    mac: str
    cidr: str                   # its address, e.g. "10.10.1.1/24"
    neighbours: dict[str, str]  # address -> MAC, installed permanent
    mtu: int | None = None
