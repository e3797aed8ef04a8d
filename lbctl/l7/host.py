"""Makes an L7 VIP's address local so the proxy can listen on it: the address goes on the
loopback device (as a /32 or /128, so it answers for itself and routes nothing else), and only
addresses the agent added are ever removed."""
from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbctl.errors import LbctlError

DEVICE = "lo"


class AddressError(LbctlError):
    exit_code = 1


def local_addresses(ipr: IPRoute) -> set[str]:
    return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def add_vip_address(addr: str) -> bool:
    """Puts addr on lo unless some interface here already has it; True when this call added
    it (and so its removal is ours)."""
    ip = ipaddress.ip_address(addr)
    with IPRoute() as ipr:
        if addr in local_addresses(ipr):
            return False
        index = ipr.link_lookup(ifname=DEVICE)[0]
        try:
            ipr.addr("add", index=index, address=addr, prefixlen=ip.max_prefixlen)
        except NetlinkError as exc:
            raise AddressError(f"cannot add the L7 VIP address {addr} to {DEVICE}: {exc.args[-1]}; "
                               "hint: the agent needs CAP_NET_ADMIN") from None
    return True


def remove_vip_address(addr: str) -> None:
    ip = ipaddress.ip_address(addr)
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=DEVICE)[0]
        try:
            ipr.addr("del", index=index, address=addr, prefixlen=ip.max_prefixlen)
        except NetlinkError as exc:
            if exc.code != 99:      # EADDRNOTAVAIL: already gone
                raise
