"""Routes and neighbours of DSR (and full-NAT) backends: where the FIB sends a backend's address, what MAC the
neighbour table holds for it, and the "managed" entries that keep DSR backends resolved.

A DSR balancer never sends a packet to a backend's own address (it forwards frames addressed
to the VIP), so nothing would make the kernel resolve the backend's MAC, and bpf_fib_lookup
answers "no neighbour" for it forever. A managed neighbour entry (NTF_EXT_MANAGED, Linux 5.16+,
made for exactly this: lookups by BPF programs) has the kernel resolve the address itself and
keep it reachable. lbctl marks the entries it creates with its own protocol number, so it
removes only those when no DSR VIP uses the backend any more."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NTF_EXT_MANAGED = 0x1          # NDA_FLAGS_EXT bit (include/uapi/linux/neighbour.h)
LBCTL_NEIGH_PROTOCOL = 0xD5    # NDA_PROTOCOL of entries lbctl made ("ds"); 0-4 are the kernel's
# NUD_* bits: which states hold a usable link-layer address.
_NUD_NAMES = {0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay", 0x10: "probe",
              0x20: "failed", 0x40: "noarp", 0x80: "permanent", 0x00: "none"}
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80


@dataclass(frozen=True)
class Route:
    """Where the FIB sends packets for an address."""

    ifindex: int
    ifname: str
    gateway: str | None        # None: the address is on a directly attached link
    prefsrc: str | None


@dataclass(frozen=True)
class Neighbour:
    state: str                 # reachable, stale, incomplete, failed, ...
    lladdr: str | None
    managed: bool
    ours: bool                 # created by lbctl (sync_dsr_neighbours)

    @property
    def resolved(self) -> bool:
        return self.lladdr is not None and self.state in ("reachable", "stale", "delay", "probe",
                                                          "noarp", "permanent")


def _family(addr: str) -> int:
    """AF_INET or AF_INET6 for an address (ValueError for anything else)."""
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def route_to(addr: str) -> Route | None:
    """`ip route get ADDR` in this network namespace, or None when there is no route."""
    family = _family(addr)
    with IPRoute() as ipr:
        try:
            msg = ipr.route("get", dst=addr, family=family)[0]
        except NetlinkError:
            return None          # ENETUNREACH and friends
        oif = msg.get_attr("RTA_OIF")
        if oif is None:
            return None
        links = ipr.get_links(oif)
        ifname = links[0].get_attr("IFLA_IFNAME") if links else f"ifindex {oif}"
        return Route(oif, ifname, msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_PREFSRC"))


def neighbour(addr: str, ifindex: int) -> Neighbour | None:
    with IPRoute() as ipr:
        for n in ipr.get_neighbours(dst=addr, ifindex=ifindex, family=_family(addr)):
            state = n["state"]
            name = next((v for k, v in sorted(_NUD_NAMES.items(), reverse=True) if k and state & k),
                        "none")
            return Neighbour(name, n.get_attr("NDA_LLADDR"), bool((n.get_attr("NDA_FLAGS_EXT") or 0)
                                                                  & NTF_EXT_MANAGED),
                             n.get_attr("NDA_PROTOCOL") == LBCTL_NEIGH_PROTOCOL)
    return None


def sync_dsr_neighbours(addrs: Iterable[str], routed: Iterable[str] = ()) -> dict[str, str]:
    """Makes every address in `addrs` a managed neighbour on the link the FIB reaches it by,
    and removes the managed entries lbctl made earlier for addresses no longer in `addrs`.
    An entry someone else made (a static one, say) is left alone. Returns, per address that
    cannot be sent to at L2, why (one line each): the caller warns, it does not refuse, since
    a route may well come later (`lbctl backend check` says the same, with fixes).

    `routed` are full-NAT backends: the balancer sends them packets from its own address, which
    the kernel will not forward for it (a martian source), so nothing resolves their next hop
    either. Theirs (the gateway of the route, or the backend on a link) gets the entry."""
    routed_only = set(routed) - set(addrs)
    wanted = sorted(set(addrs) | routed_only)
    problems: dict[str, str] = {}
    with IPRoute() as ipr:
        keep: set[tuple[str, int]] = set()
        for addr in wanted:
            route = route_to(addr)
            if route is None:
                problems[addr] = "no route to it here"
                continue
            hop = addr
            if route.gateway is not None:
                if addr not in routed_only:
                    problems[addr] = (f"the route to it goes via {route.gateway} on {route.ifname}: a "
                                      "DSR backend must be on a link of the balancer (same L2 segment)")
                    continue
                hop = route.gateway
            keep.add((hop, route.ifindex))
            existing = neighbour(hop, route.ifindex)
            if existing is not None and (existing.managed or existing.state in ("permanent", "noarp")):
                continue
            try:
                ipr.neigh("replace", dst=hop, ifindex=route.ifindex, state=0, family=_family(hop),
                          NDA_FLAGS_EXT=NTF_EXT_MANAGED, NDA_PROTOCOL=LBCTL_NEIGH_PROTOCOL)
            except NetlinkError as exc:
                problems[addr] = f"cannot add a managed neighbour entry on {route.ifname}: {exc.args[-1]}"
        for n in ipr.get_neighbours():
            dst = n.get_attr("NDA_DST")
            if (n.get_attr("NDA_PROTOCOL") == LBCTL_NEIGH_PROTOCOL and dst is not None
                    and (dst, n["ifindex"]) not in keep):
                try:
                    ipr.neigh("del", dst=dst, ifindex=n["ifindex"], family=_family(dst))
                except NetlinkError:
                    pass         # already gone
    return problems
