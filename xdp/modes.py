"""The attach mode lbctl gives an interface when the user names none: one table keyed by the
interface's driver, each row with the reason `lbctl status` shows (figures in docs/real-hosts.md)."""
from __future__ import annotations

import array
import errno
import fcntl
import socket
import struct
from dataclasses import dataclass

from xdp.errors import AttachError

NATIVE = "native"
GENERIC = "generic"
TC = "tc"


@dataclass(frozen=True)
class ModeChoice:
    mode: str      # native | generic | tc
    reason: str    # why, as `lbctl status` prints it


# Drivers whose default is not native. Anything not listed gets native: that is where XDP
# runs before the kernel builds a socket buffer, and every real NIC driver with XDP support
# is faster there. A row belongs here only with a measurement (veth) or a refusal of native
# attach seen on this kernel (the rest); tests/netns/test_mode_by_driver.py re-checks each on real
# interfaces.
MODE_BY_DRIVER: dict[str, ModeChoice] = {
    # Native veth XDP must copy every skb a local socket sent (cloned, paged, short of the
    # 256-byte XDP headroom) into a page-pool page, and the peer builds a new skb from the
    # redirected frame. Generic XDP runs on the skb the stack has but linearises a paged
    # (GRO-merged) one first; the tc build takes the skb as it is: bulk 10.6 Gbit/s against
    # generic's 5.3 and native's 4.7, short connections and keep-alive level or better
    # (docs/benchmarks.md, the 2026-12-02 15:45 run).
    "veth": ModeChoice(TC, "veth: tc keeps the socket buffer as it is (XDP copies it), "
                           "see docs/real-hosts.md"),
    # These drivers refuse native attach (EOPNOTSUPP: no ndo_bpf) on this kernel; macvtap
    # devices report the macvlan driver too.
    **{driver: ModeChoice(GENERIC, f"{driver}: the driver has no native XDP")
       for driver in ("bridge", "vxlan", "macvlan", "ifb")},
}

# ethtool's ioctl (linux/sockios.h, linux/ethtool.h): the driver name, as `ethtool -i` shows it.
_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196     # struct ethtool_drvinfo
_DRIVER_OFFSET, _DRIVER_LEN = 4, 32
_IFREQ_SIZE = 40


def _ifreq_ioctl(ifname: str, request: int, arg: bytes) -> bytes:
    """One interface ioctl on a socket of the calling thread's network namespace, with the
    interface name in front of `arg`. A name the kernel does not know is an AttachError."""
    ifreq = (ifname.encode()[:15].ljust(16, b"\0") + arg).ljust(_IFREQ_SIZE, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            return fcntl.ioctl(sock.fileno(), request, ifreq)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise AttachError(f"unknown interface '{ifname}'; hint: 'ip link' lists the "
                                  "interfaces here") from None
            raise


def driver_of(ifname: str) -> str | None:
    """The interface's driver in the calling thread's network namespace, or None when the
    device reports none (loopback, some tunnels)."""
    drvinfo = array.array("B", struct.pack("=I", _ETHTOOL_GDRVINFO) + bytes(_DRVINFO_SIZE - 4))
    address, _ = drvinfo.buffer_info()
    try:
        _ifreq_ioctl(ifname, _SIOCETHTOOL, struct.pack("P", address))
    except OSError:         # no ethtool driver info (an unknown name is an AttachError)
        return None
    raw = drvinfo[_DRIVER_OFFSET:_DRIVER_OFFSET + _DRIVER_LEN].tobytes()
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


# SIOCGIFHWADDR (linux/sockios.h): the link type (ARPHRD_*, linux/if_arp.h) is the hardware
# address's family.
_SIOCGIFHWADDR = 0x8927
_ARPHRD_ETHER = 1
_ARPHRD_LOOPBACK = 772
_LINK_TYPES = {0xFFFE: "none", 768: "ipip", 769: "ip6tnl", 776: "sit", 778: "gre",
               823: "ip6gre", 280: "can", 32: "infiniband", 512: "ppp"}


def link_type_of(ifname: str) -> int:
    """The interface's link type (ARPHRD_*) in the calling thread's network namespace."""
    out = _ifreq_ioctl(ifname, _SIOCGIFHWADDR, b"")
    return int(struct.unpack_from("=H", out, 16)[0])


def require_ethernet(ifname: str) -> None:
    """The program reads and rewrites Ethernet frames: an interface whose frames start at the
    IP header (WireGuard, tun, IP-in-IP and GRE tunnels) would have its packets' addresses
    read as MACs; loopback carries no client's packet. Refused before anything is attached."""
    kind = link_type_of(ifname)
    if kind == _ARPHRD_LOOPBACK:
        raise AttachError(
            f"cannot attach on '{ifname}': it is the loopback interface, where no client's "
            "packet arrives; hint: attach to the interface clients reach the VIP through")
    if kind != _ARPHRD_ETHER:
        name = _LINK_TYPES.get(kind, f"type {kind}")
        raise AttachError(
            f"cannot attach on '{ifname}': its frames carry no Ethernet header (link type "
            f"{name}), and lbctl's program reads and rewrites Ethernet frames; hint: attach to "
            "the Ethernet interface the VIP's traffic arrives on (end tunnels before the balancer)")


def default_mode(driver: str | None) -> ModeChoice:
    """The mode an interface of this driver gets without --mode."""
    if driver is None:
        return ModeChoice(NATIVE, "driver unknown: native, XDP's own mode")
    return MODE_BY_DRIVER.get(driver, ModeChoice(NATIVE, f"{driver}: native runs in the driver"))


def mode_reason(driver: str | None, mode: str) -> str:
    """Why an interface runs in `mode`: the driver's default, or the user's --mode."""
    choice = default_mode(driver)
    if choice.mode == mode:
        return choice.reason
    return f"set by --mode {mode} ({driver or 'this driver'} defaults to {choice.mode})"
