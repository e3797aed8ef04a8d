"""The namespace lab with IPv6 beside its IPv4, once for the IPv6 traffic tests
(test_ipv6_traffic.py, test_ipv6_fragments.py): addresses of one /48 on the client's and the
backends' links, forwarding on the balancer, a server started in each backend, the balancer
attached; servers, XDP, pins and namespaces removed whatever happened."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from labcli import lbctl

from lbctl.lab import NETNS_DIR, Lab, LabHost

CLI_TIMEOUT_S = 120.0          # the first attach compiles the program with bcc


@dataclass(frozen=True)
class V6Net:
    """The lab's IPv6 addresses in one /48: the VIP, the client's link (:1::/64) and the
    backends' (:2::/64), backend i at :2::(11+i)."""

    vip: str
    client: str
    lb_client_side: str
    lb_backend_side: str
    backends: str

    @classmethod
    def of(cls, prefix: str) -> V6Net:
        return cls(f"{prefix}::10", f"{prefix}:1::2", f"{prefix}:1::1", f"{prefix}:2::1", f"{prefix}:2::")

    def backend(self, i: int) -> str:
        return f"{self.backends}{11 + i}"


def ip(lab: Lab, host: LabHost, *args: str) -> None:
    lab.run(host, ["ip", *args], check=True)


def enable_ipv6(lab: Lab, host: LabHost, addrs: dict[str, str], gateway: str | None) -> None:
    """The lab turns IPv6 off everywhere (no ND/MLD noise in its IPv4 tests): back on here,
    without duplicate address detection so the addresses are usable at once."""
    knobs = ["net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
             "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
    knobs += [f"net.ipv6.conf.{ifname}.disable_ipv6=0" for ifname in addrs]
    knobs += [f"net.ipv6.conf.{ifname}.accept_dad=0" for ifname in addrs]
    lab.run(host, ["sysctl", "-q", "-w", *knobs], check=True)
    for ifname, cidr in addrs.items():
        ip(lab, host, "-6", "addr", "add", cidr, "dev", ifname, "nodad")
    if gateway is not None:
        ip(lab, host, "-6", "route", "add", "default", "via", gateway)


@contextmanager
def v6_lab(letters: str, net: V6Net,
           start_backend: Callable[[Lab, LabHost, int], subprocess.Popen[bytes]],
           ready: Callable[[Lab], None]) -> Iterator[Lab]:
    """A lab named `letters` + 4 hex digits with `net`'s addresses; `start_backend` starts
    backend i's server (and sets up what else it needs), `ready` waits until the lab can carry
    the module's traffic after the attach."""
    lab = Lab(prefix=f"{letters}{secrets.token_hex(2)}")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        lab.up()
        client_if, backend_if = lab.lb_ifaces
        enable_ipv6(lab, lab.lb, {client_if: f"{net.lb_client_side}/64",
                                  backend_if: f"{net.lb_backend_side}/64"}, None)
        lab.run(lab.lb, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"], check=True)
        enable_ipv6(lab, lab.client, {lab.client.ifname: f"{net.client}/64"}, net.lb_client_side)
        for i, b in enumerate(lab.backends):
            enable_ipv6(lab, b, {b.ifname: f"{net.backend(i)}/64"}, net.lb_backend_side)
            servers.append(start_backend(lab, b, i))
        lbctl(lab, "attach", *lab.lb_ifaces, timeout_s=CLI_TIMEOUT_S)
        ready(lab)
        yield lab
    finally:
        for s in servers:
            s.kill()
            s.wait()
        try:
            if (NETNS_DIR / lab.lb.netns).exists():
                lbctl(lab, "detach", "--all", "--purge", "--force", check=False,
                      timeout_s=CLI_TIMEOUT_S)
        finally:
            lab.down()
