"""A routed network namespace for BPF_PROG_TEST_RUN: veths with addresses and permanent
neighbours, forwarding on, so bpf_fib_lookup answers the same MACs every run. Built by
`lbctl bench dataplane` and by the bpf tests' fixture (one builder for both)."""
from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from lbctl.bench.errors import BenchError
from lbctl.netns import inside

NUD_PERMANENT = 0x80
IFA_F_NODAD = 0x02          # an IPv6 address usable at once, without duplicate detection
UP_TIMEOUT_S = 5.0


def mac_of(addr: str) -> str:
    """A locally administered MAC derived from an IPv4 address: readable in a hex dump."""
    return "02:00:" + ":".join(f"{int(octet):02x}" for octet in addr.split("."))


@dataclass(frozen=True)
class Port:
    """One veth of the namespace; its peer (`name + "p"`) is up and has no address."""

    name: str
    mac: str                    # bpf_fib_lookup's smac for packets leaving here
    cidr: str                   # its address, e.g. "10.10.1.1/24": the connected route
    neighbours: dict[str, str]  # address -> MAC, installed PERMANENT: bpf_fib_lookup's dmac
    mtu: int | None = None      # on both ends, e.g. 9000 for a jumbo link
    cidr6: str | None = None    # an IPv6 address beside it, e.g. "fd00:10:1::1/64"; neighbours
                                # may then name IPv6 addresses too


@dataclass
class RoutedNetns:
    name: str
    ifindex: dict[str, int] = field(default_factory=dict)


def _wait_until(what: str, ready: Callable[[], bool], timeout_s: float = UP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up after {timeout_s} s waiting for {what}; hint: check "
                             "'ip netns list' and the namespace's links")
        time.sleep(0.01)


def remove_netns(name: str) -> None:
    """Delete the namespace (and its veths with it); one already gone is fine."""
    from pyroute2 import netns  # type: ignore[import-untyped]

    try:
        netns.remove(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def create_routed_netns(name: str, ports: Sequence[Port]) -> RoutedNetns:
    """Build the namespace `name` with one veth per port; removes it again if a step fails."""
    from pyroute2 import IPRoute, netns

    netns.create(name)
    try:
        routed = RoutedNetns(name)
        with IPRoute(netns=name) as ipr:
            for port in ports:
                ipr.link("add", ifname=port.name, kind="veth", peer=f"{port.name}p")
                index = ipr.link_lookup(ifname=port.name)[0]
                peer = ipr.link_lookup(ifname=f"{port.name}p")[0]
                ipr.link("set", index=index, address=port.mac)
                if port.mtu is not None:
                    ipr.link("set", index=index, mtu=port.mtu)
                    ipr.link("set", index=peer, mtu=port.mtu)
                ipr.link("set", index=peer, state="up")
                ipr.link("set", index=index, state="up")
                addr, prefixlen = port.cidr.split("/")
                ipr.addr("add", index=index, address=addr, prefixlen=int(prefixlen))
                if port.cidr6 is not None:
                    addr6, prefixlen6 = port.cidr6.split("/")
                    ipr.addr("add", index=index, address=addr6, prefixlen=int(prefixlen6),
                             flags=IFA_F_NODAD)
                for neighbour, mac in port.neighbours.items():
                    family = socket.AF_INET6 if ":" in neighbour else socket.AF_INET
                    ipr.neigh("add", dst=neighbour, lladdr=mac, ifindex=index,
                              state=NUD_PERMANENT, family=family)
                routed.ifindex[port.name] = index

            def all_up() -> bool:
                return all(ipr.get_links(i)[0].get_attr("IFLA_OPERSTATE") == "UP"
                           for i in routed.ifindex.values())

            _wait_until(f"the veths of {name} to come up", all_up)
        # bpf_fib_lookup answers FWD_DISABLED in a namespace that does not forward.
        with inside(name):
            for knob in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
                with open(knob, "w") as f:
                    f.write("1\n")
                with open(knob) as f:
                    if f.read().strip() != "1":
                        raise BenchError(f"cannot enable forwarding in {name}; hint: run as root")
        return routed
    except BaseException:
        remove_netns(name)
        raise


@contextmanager
def routed_netns(name: str, ports: Sequence[Port]) -> Iterator[RoutedNetns]:
    """The namespace for the duration of the block; removed on the way out, whatever happened."""
    routed = create_routed_netns(name, ports)
    try:
        yield routed
    finally:
        remove_netns(name)
