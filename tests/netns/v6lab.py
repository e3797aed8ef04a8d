"""The namespace lab's own IPv6 (lbctl/lab_topology.yaml: fd77:1::/64 on the client's link,
fd77:2::/64 on the backends'), once for the IPv6 traffic tests (test_ipv6_traffic.py,
test_ipv6_fragments.py): a server started in each backend, the balancer attached; servers, XDP,
pins and namespaces removed whatever happened."""

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
    """The lab's IPv6 addresses: the VIP, the client, backend i's."""

    vip: str
    client: str
    backends: tuple[str, ...]

    @classmethod
    def of_lab(cls) -> V6Net:
        """From the lab's topology file; reading it builds nothing."""
        topology = Lab("v6topo")
        assert topology.vip6 is not None and topology.client.addr6 is not None
        return cls(topology.vip6, topology.client.addr6,
                   tuple(str(b.addr6) for b in topology.backends))

    def backend(self, i: int) -> str:
        return self.backends[i]


def ip(lab: Lab, host: LabHost, *args: str) -> None:
    lab.run(host, ["ip", *args], check=True)


@contextmanager
def v6_lab(letters: str,
           start_backend: Callable[[Lab, LabHost, int], subprocess.Popen[bytes]],
           ready: Callable[[Lab], None]) -> Iterator[Lab]:
    """A lab named `letters` + 4 hex digits (IPv6 beside IPv4, V6Net.of_lab()); `start_backend` starts
    backend i's server (and sets up what else it needs), `ready` waits until the lab can carry
    the module's traffic after the attach."""
    lab = Lab(prefix=f"{letters}{secrets.token_hex(2)}")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        lab.up()
        for i, b in enumerate(lab.backends):
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
