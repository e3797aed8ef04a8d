"""The full-NAT cases' set-up, once for both families (test_fullnat.py: IPv4, test_fullnat6.py:
IPv6): the VIPs every case starts from, one frame run and its one counted outcome, a flow opened
and checked byte for byte, the frame as it must leave, entries aged. The family is the arm's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lbctl import planner
from lbctl.control import Controller
from lbctl.model import Config, parse_endpoint
from xdp import codec
from xdp.codec import Endpoint
from xdp.libbpf import XDP_TX
from xdp.limits import OUTCOMES
from xdp.maps import LbMaps, monotonic_ns

Run = Callable[..., tuple[int, bytes]]
DEFAULT_RANGE = range(1024, 32768)
NARROW_PORTS = (5000, 5001)       # two source ports
SINGLE_PORT = 6000                # one source port


@dataclass(frozen=True)
class FullNatVips:
    """The full-NAT VIPs of a family's cases: web (TCP) and dns (UDP) on the arm, far behind a
    second arm, pinned to configured SNAT addresses, narrow (NARROW_PORTS), single
    (SINGLE_PORT), unrouted (its backend has no route) and switch (a case turns it to NAT)."""

    web: Endpoint
    web_backend: Endpoint
    dns: Endpoint
    dns_backend: Endpoint
    far: Endpoint
    far_backend: Endpoint
    pinned: Endpoint
    pinned_snat: tuple[str, ...]
    narrow: Endpoint
    single: Endpoint
    unrouted: Endpoint
    unrouted_backend: Endpoint
    switch: Endpoint
    switch_backend: Endpoint

    def baseline(self, controller: Controller, lb_maps: LbMaps,
                 nat: Sequence[tuple[Endpoint, Endpoint]] = ()) -> Config:
        """Replaces the configuration with these VIPs (and a NAT VIP per (vip, backend) of
        `nat`), each through the controller's vip add; returns it as read back."""
        setups = [
            (self.web, [self.web_backend], {}), (self.dns, [self.dns_backend], {}),
            (self.far, [self.far_backend], {}),
            (self.pinned, [self.web_backend], {"snat": self.pinned_snat}),
            (self.narrow, [self.web_backend], {"snat_ports": NARROW_PORTS}),
            (self.single, [self.web_backend], {"snat_ports": (SINGLE_PORT, SINGLE_PORT)}),
            (self.unrouted, [self.unrouted_backend], {}), (self.switch, [self.switch_backend], {}),
        ]
        controller.change(lambda _config: {})
        for vip, backends, options in setups:
            controller.vip_add(vip, forwarding="fullnat", **options)  # type: ignore[arg-type]
            for backend in backends:
                controller.backend_add(vip, parse_endpoint(str(backend), vip.proto))
        for vip, backend in nat:
            controller.vip_add(vip)
            controller.backend_add(vip, parse_endpoint(str(backend), vip.proto))
        return {vip: live.spec for vip, live in planner.read_live(lb_maps).items()}


def rewritten(frame: bytes, src: tuple[str, int], dst: tuple[str, int],
              macs: tuple[str, str]) -> bytes:
    """The frame as it must leave: both ends rewritten, MACs from the FIB, TTL or hop limit down
    by one, every checksum computed afresh by scapy (IPv6's L4 one over its pseudo-header)."""
    pkt = Ether(frame)
    pkt.src, pkt.dst = macs
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    if IPv6 in pkt:
        ip = pkt[IPv6]
        ip.hlim -= 1
    else:
        ip = pkt[IP]
        ip.ttl -= 1
        del ip.chksum
    ip.src, l4.sport = src
    ip.dst, l4.dport = dst
    del l4.chksum
    return bytes(pkt)


def source_of(out: bytes) -> tuple[str, int]:
    pkt = Ether(out)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    return (pkt[IPv6] if IPv6 in pkt else pkt[IP]).src, l4.sport


def assert_frame(out: bytes, expected: bytes) -> None:
    assert out == expected, (f"output differs\n--- got\n{Ether(out).show(dump=True)}"
                             f"\n--- expected\n{Ether(expected).show(dump=True)}")


@dataclass(frozen=True)
class OneArm:
    """The arm that carries clients and backends alike, with the family's frame to a VIP
    (`to_vip(vip, sport, client=...)`) and the MAC of a neighbour (`mac_of`)."""

    name: str
    mac: str
    addr: str
    client: str
    to_vip: Callable[..., bytes]
    mac_of: Callable[[str], str]

    @property
    def ipv6(self) -> bool:
        return ":" in self.addr

    def counted(self, lb_maps: LbMaps, run: Run, frame: bytes, ingress: str | None = None
                ) -> tuple[int, bytes, str]:
        """Runs one frame (in on this arm unless `ingress` names another); returns action,
        output and the one outcome that counted it."""
        before = lb_maps.global_counters()
        action, out = run(frame, ingress or self.name)
        after = lb_maps.global_counters()
        moved = [n for n in OUTCOMES if after[n]["packets"] != before[n]["packets"]]
        assert len(moved) == 1, f"outcomes moved: {moved}"
        return action, out, moved[0]

    def open_flow(self, lb_maps: LbMaps, run: Run, vip: Endpoint, backend: Endpoint,
                  sport: int = 40000, client: str | None = None,
                  snat_addrs: tuple[str, ...] | None = None, ports: range = DEFAULT_RANGE,
                  macs: tuple[str, str] | None = None, action: int = XDP_TX) -> tuple[str, int]:
        """A client's first packet to a full-NAT VIP: checks it leaves rewritten byte for byte
        from a SNAT address (the arm's own by default) and a port of the range; returns that
        source."""
        frame = self.to_vip(vip, sport, client=client or self.client)
        got, out, outcome = self.counted(lb_maps, run, frame)
        assert (got, outcome) == (action, "tx" if action == XDP_TX else "redirect")
        snat = source_of(out)
        assert snat[0] in (snat_addrs or (self.addr,)) and snat[1] in ports, f"source {snat}"
        assert_frame(out, rewritten(frame, snat, (backend.addr, backend.port),
                                    macs or (self.mac, self.mac_of(backend.addr))))
        return snat

    def age_entries(self, lb_maps: LbMaps, seconds: float) -> None:
        """Makes every full-NAT entry of the family look last seen `seconds` ago (as if no
        packet came since)."""
        stamp = monotonic_ns() - int(seconds * 1e9)
        suffix = "6" if self.ipv6 else ""
        for name in (f"snat_flows{suffix}", f"snat_rnat{suffix}"):
            table = lb_maps[name]
            for key, raw in list(table.items()):
                if self.ipv6:
                    entry6 = codec.SnatEntry6.from_buffer_copy(raw)
                    entry, nat = entry6, entry6.nat.e
                else:
                    entry4 = codec.SnatEntry.from_buffer_copy(raw)
                    entry, nat = entry4, entry4.nat
                nat.last_seen_ns = stamp
                nat.created_ns = min(nat.created_ns, stamp)
                table.update(key, bytes(entry))
