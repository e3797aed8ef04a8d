"""`lbctl doctor`: the checks that explain why a balancer does not forward, each a verdict
with the evidence it rests on and the one command that fixes it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from lbctl.errors import ConflictError
from xdp import libbpf
from xdp.balancer import Balancer, ipv4_forwarding, require_root
from xdp.codec import Endpoint
from xdp.errors import IncompatibleMapsError, NotAttachedError
from xdp.limits import DEFAULT_LIMITS, Limits
from xdp.modes import default_mode
from xdp.tracing import TraceSwitch

NETNS_DIR = "/var/run/netns"
BPFFS = "/sys/fs/bpf"
# A SYN whose flow saw no answer for this long is lost: a LAN answers in well under a
# millisecond and the client's first retransmission comes after 1 s.
SYN_STUCK_S = 2.0
# The tracking tables are LRU: past this, new flows evict live ones (the kernel does not
# count evictions, so the fill level is the only early warning).
FILL_WARN = 0.9
# Native XDP on veth (and most drivers without multi-buffer support) takes frames that fit
# one page: 4096 - 256 B headroom - 320 B skb_shared_info, including the Ethernet header.
NATIVE_FRAME_MAX = 4096 - 256 - 320
# On a veth the limit is on what the peer sends: the kernel refuses native XDP while the peer's
# MTU is above this ("Peer MTU is too large to set XDP") and caps the peer's MTU at it while
# attached; the end's own MTU may stay larger (it only bounds what leaves through the peer).
VETH_PEER_MTU_MAX = NATIVE_FRAME_MAX - 14
# Neighbour states in which the kernel has (or is re-confirming) a link-layer address.
_NEIGH_OK = {"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"}


@dataclass(frozen=True)
class Check:
    name: str        # which check: ip_forward, rp_filter, neighbour, replies, ...
    subject: str     # what it looked at: an interface, a backend, a table ('-' for the host)
    ok: bool
    evidence: str    # what was seen
    fix: str = ""    # one line that fixes it (empty when ok)


class _Probe:
    """Reads the host (in the calling thread's network namespace) for the checks."""

    def __init__(self, instance: str, limits: Limits):
        self.balancer = Balancer(instance, limits)
        self.limits = limits
        self.links = {link["ifname"]: link for link in _ip_json(["-d", "link", "show"])}
        self.attachments = self.balancer.attachments()
        self.prog_id = self.balancer.pinned_prog_id()


def diagnose(instance: str, vip: Endpoint | None = None, config_path: str | None = None,
             limits: Limits = DEFAULT_LIMITS, syn_stuck_s: float = SYN_STUCK_S) -> list[Check]:
    """Every check, in the order a packet needs them; `vip` narrows the per-VIP checks and
    `config_path` (an agent config file) says where the program should be attached and how."""
    require_root()
    probe = _Probe(instance, limits)
    checks = [_bpffs(), *_program(probe, config_path), *_foreign(probe)]
    maps_check, live, flows, fill = _maps(probe)
    checks.append(maps_check)
    checks += [_ip_forward(), *_rp_filter(probe), *_offloads(probe, _config_native(config_path))]
    if live is None:
        return checks
    if any(v.ipv6 for v in live):
        checks.append(_ipv6_forward())
    if vip is not None and vip not in live:
        raise ConflictError(f"no VIP {vip} ({vip.proto}); hint: 'lbctl vip list' shows the VIPs")
    chosen = {v: lv for v, lv in live.items() if vip is None or v == vip}
    checks.append(_trace_flag(probe))
    checks += _tables(fill, limits)
    checks += _vip_backends(chosen)
    checks += _ring_shares(probe, chosen)
    checks += _neighbours(probe, chosen)
    checks += _replies(chosen, flows, syn_stuck_s)
    return checks


def render(checks: Iterable[Check]) -> list[str]:
    lines = []
    for c in checks:
        mark = "✓" if c.ok else "✗"
        subject = "" if c.subject == "-" else f" [{c.subject}]"
        lines.append(f"{mark} {c.name}{subject}: {c.evidence}")
        if not c.ok and c.fix:
            lines.append(f"    fix: {c.fix}")
    return lines


def as_json(checks: list[Check]) -> dict:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


# -- the program -------------------------------------------------------------------------------
def _bpffs() -> Check:
    with open("/proc/self/mounts") as mounts:
        mounted = any(line.split()[1:3] == [BPFFS, "bpf"] for line in mounts)
    if mounted:
        return Check("bpffs", "-", True, f"{BPFFS} is a bpf filesystem")
    return Check("bpffs", "-", False, f"no bpf filesystem at {BPFFS}: nothing can be pinned",
                 f"mount -t bpf bpf {BPFFS}")


def _program(probe: _Probe, config_path: str | None) -> list[Check]:
    if probe.prog_id is None:
        return [Check("attached", "-", False, f"no program pinned at {probe.balancer.prog_pin}",
                      "lbctl attach IFACE... (the interfaces that carry VIP traffic)")]
    by_name = {a.ifname: a for a in probe.attachments}
    if config_path is None:
        if not by_name:
            return [Check("attached", "-", False,
                          f"program {probe.prog_id} is pinned but attached to no interface",
                          "lbctl attach IFACE...")]
        out = []
        for a in probe.attachments:
            intended = default_mode(a.driver).mode
            out.append(Check("attached", a.ifname, True,
                             f"program {a.prog_id} in {a.mode} mode ({a.reason})"
                             + ("" if a.mode == intended else f"; the driver default is {intended}")))
        return out
    from lbctl.config import load_file

    desired = load_file(config_path)
    out = []
    for ifname in desired.interfaces:
        a = by_name.get(ifname)
        if a is None:
            out.append(Check("attached", ifname, False, f"{config_path} lists {ifname}, which runs no "
                             "lbctl program", f"lbctl attach {ifname} --mode {desired.xdp_mode}"))
        elif a.mode != desired.xdp_mode:
            out.append(Check("attached", ifname, False, f"{a.mode} mode; {config_path} says "
                             f"xdp_mode: {desired.xdp_mode}",
                             f"lbctl attach {ifname} --mode {desired.xdp_mode}"))
        else:
            out.append(Check("attached", ifname, True, f"program {a.prog_id} in {a.mode} mode, as "
                             f"{config_path} says"))
    for a in probe.attachments:
        if a.ifname not in desired.interfaces:
            out.append(Check("attached", a.ifname, False, f"attached, but {config_path} does not "
                             "list it", f"lbctl detach {a.ifname}"))
    return out


def _foreign(probe: _Probe) -> list[Check]:
    out = []
    for ifindex, ifname in socket.if_nameindex():
        q = libbpf.xdp_query(ifindex)
        for kind, prog_id in (("native", q.drv_prog_id), ("generic", q.skb_prog_id),
                              ("offloaded", q.hw_prog_id)):
            if prog_id and prog_id != probe.prog_id:
                out.append(Check("foreign_xdp", ifname, False,
                                 f"another XDP program (id {prog_id}, {kind} mode) runs here",
                                 f"ip link set dev {ifname} xdp{'' if kind == 'native' else 'generic'}"
                                 f" off   (after checking who loaded it: bpftool prog show id {prog_id})"))
    if not out:
        out.append(Check("foreign_xdp", "-", True, "no other XDP program on any interface here"))
    return out


def _maps(probe: _Probe) -> tuple[Check, dict | None, list, dict[str, tuple[int, int]]]:
    from lbctl import planner

    try:
        with probe.balancer.maps() as maps:
            live = planner.read_live(maps)
            flows = list(maps.flows())
            frags = sum(1 for _ in maps["frags"].items())
            # full-NAT's reverse table holds every claimed port, live or waiting to be reused.
            snat_ports = sum(1 for _ in maps["snat_rnat"].items())
            snat_ports6 = sum(1 for _ in maps["snat_rnat6"].items())
            rings = {v: maps.ring(lv.vip_id, lv.ring_generation) for v, lv in live.items()}
            stale_tracer = TraceSwitch(maps["trace_ctl"]).clear_stale()
    except (NotAttachedError, IncompatibleMapsError) as exc:
        text = str(exc)
        evidence, _, hint = text.partition("; hint: ")
        return Check("maps", "-", False, evidence, hint or "lbctl attach IFACE..."), None, [], {}
    probe.rings = rings  # type: ignore[attr-defined]
    probe.stale_tracer = stale_tracer  # type: ignore[attr-defined]
    fullnat = sum(1 for f in flows if f.forwarding == "fullnat" and ":" not in f.client)
    fullnat6 = sum(1 for f in flows if f.forwarding == "fullnat" and ":" in f.client)
    fill = {"flows": (len(flows) - fullnat - fullnat6, probe.limits.flow_table_size),
            "frags": (frags, probe.limits.frag_table_size),
            "snat_flows": (fullnat, probe.limits.snat_table_size),
            "snat_rnat": (snat_ports, 2 * probe.limits.snat_table_size),
            "snat_flows6": (fullnat6, probe.limits.snat_table_size),
            "snat_rnat6": (snat_ports6, 2 * probe.limits.snat_table_size)}
    return (Check("maps", "-", True, f"{probe.balancer.pin_dir}: every map has this build's layout"),
            live, flows, fill)


# -- the host's forwarding ---------------------------------------------------------------------
def _ip_forward() -> Check:
    if ipv4_forwarding():
        return Check("ip_forward", "-", True, "net.ipv4.ip_forward = 1")
    return Check("ip_forward", "-", False, "net.ipv4.ip_forward = 0: bpf_fib_lookup refuses to "
                 "forward and the kernel drops what the program passes to it",
                 "sysctl -w net.ipv4.ip_forward=1")


def _ipv6_forward() -> Check:
    """IPv6 VIPs need IPv6 forwarding as IPv4 ones need ip_forward (bpf_fib_lookup checks
    the same switch per family)."""
    value = _sysctl_file("/proc/sys/net/ipv6/conf/all/forwarding")
    if value == 1:
        return Check("ipv6_forward", "-", True, "net.ipv6.conf.all.forwarding = 1")
    return Check("ipv6_forward", "-", False, f"net.ipv6.conf.all.forwarding = {value}: IPv6 VIPs "
                 "are passed to a kernel that does not forward them",
                 "sysctl -w net.ipv6.conf.all.forwarding=1")


def _sysctl_file(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _sysctl(path: str) -> int | None:
    try:
        with open(os.path.join("/proc/sys/net/ipv4/conf", path, "rp_filter")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _rp_filter(probe: _Probe) -> list[Check]:
    out = []
    all_value = _sysctl("all") or 0
    for a in probe.attachments:
        own = _sysctl(a.ifname) or 0
        effective = max(all_value, own)   # the kernel applies the larger of the two
        seen = f"rp_filter = {effective} (all {all_value}, {a.ifname} {own})"
        if effective == 1:
            out.append(Check("rp_filter", a.ifname, False, f"{seen}: strict; what the program "
                             "passes to the kernel (first packets while a neighbour resolves, "
                             "fragments, ICMP errors) is dropped when its source routes out "
                             "another interface",
                             f"sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.{a.ifname}.rp_filter=0"))
        else:
            out.append(Check("rp_filter", a.ifname, True,
                             seen + (": loose, sources are only checked to be routable"
                                     if effective == 2 else ": off")))
    return out


# -- offloads ----------------------------------------------------------------------------------
def _config_native(config_path: str | None) -> set[str]:
    """The interfaces a config file wants in native mode (empty without a file)."""
    if config_path is None:
        return set()
    from lbctl.config import load_file

    desired = load_file(config_path)
    return set(desired.interfaces) if desired.xdp_mode == "native" else set()


def lro_check(ifname: str, features: dict[str, str]) -> Check:
    """Native XDP and LRO: the driver would hand the program merged super-frames (most
    drivers refuse XDP then, some turn LRO off themselves)."""
    if features.get("large-receive-offload") == "on":
        return Check("lro", ifname, False, "LRO is on: native XDP sees merged super-frames "
                     "(most drivers refuse XDP then)", f"ethtool -K {ifname} lro off")
    return Check("lro", ifname, True, "LRO off")


def _mtu_check(ifname: str, link: dict) -> Check:
    """Whether the frames native XDP on `ifname` receives fit the driver's XDP limit."""
    peer = _veth_peer(link) if _kind(link) == "veth" else None
    if peer is not None:
        peer_ns, peer_if = peer
        peer_link = next(iter(_ip_json(["link", "show", "dev", peer_if], peer_ns)), {})
        mtu = int(peer_link.get("mtu", 1500))
        if mtu > VETH_PEER_MTU_MAX:
            return Check("mtu", ifname, False,
                         f"{peer_if} in {peer_ns}, the veth peer that sends to {ifname}, has MTU "
                         f"{mtu}: native XDP on a veth takes frames of at most "
                         f"{VETH_PEER_MTU_MAX} B from its peer (one page), so the kernel "
                         "refuses it ('Peer MTU is too large to set XDP')",
                         f"ip netns exec {peer_ns} ip link set dev {peer_if} mtu "
                         f"{VETH_PEER_MTU_MAX}   (or run {ifname} in generic mode)")
        return Check("mtu", ifname, True, f"the veth peer's MTU {mtu} fits native XDP "
                     f"(at most {VETH_PEER_MTU_MAX})")
    mtu = int(link.get("mtu", 1500))
    if mtu + 14 > NATIVE_FRAME_MAX:
        return Check("mtu", ifname, False, f"MTU {mtu}: frames up to {mtu + 14} B do not fit "
                     f"native XDP's one page ({NATIVE_FRAME_MAX} B)",
                     f"ip link set dev {ifname} mtu {NATIVE_FRAME_MAX - 14}")
    return Check("mtu", ifname, True, f"MTU {mtu} fits native XDP's one page")


def _offloads(probe: _Probe, config_native: set[str]) -> list[Check]:
    out = []
    native = any(a.mode == "native" for a in probe.attachments)
    # Interfaces running native XDP, or meant to by the config file (an MTU or LRO is often
    # why the kernel refused it).
    for ifname in sorted({a.ifname for a in probe.attachments if a.mode == "native"} | config_native):
        if ifname not in probe.links:
            continue
        out.append(lro_check(ifname, _features(None, ifname)))
        out.append(_mtu_check(ifname, probe.links[ifname]))
    for a in probe.attachments:
        link = probe.links.get(a.ifname, {})
        if _kind(link) != "veth":
            continue
        peer = _veth_peer(link)
        if peer is None:
            continue
        peer_ns, peer_if = peer
        if native and len(probe.attachments) > 1:
            # Native redirects into a veth go through ndo_xdp_xmit: the peer takes them
            # only with XDP or GRO (NAPI) on, and drops them silently otherwise.
            peer_features = _features(peer_ns, peer_if)
            peer_xdp = _xdp_on(peer_ns, peer_if)
            if peer_features.get("generic-receive-offload") != "on" and not peer_xdp:
                out.append(Check("veth_gro", f"{a.ifname}->{peer_if}@{peer_ns}", False,
                                 f"GRO is off on {peer_if} in {peer_ns}, the veth peer that "
                                 f"receives frames redirected out of {a.ifname}: they vanish",
                                 f"ip netns exec {peer_ns} ethtool -K {peer_if} gro on"))
            else:
                out.append(Check("veth_gro", f"{a.ifname}->{peer_if}@{peer_ns}", True,
                                 "the veth peer has " + ("XDP" if peer_xdp else "GRO on")))
        for sender_ns, sender_if in _senders(peer_ns, peer_if):
            tx = _features(sender_ns, sender_if).get("tx-checksumming")
            where = f"{sender_if}@{sender_ns}"
            if tx is not None and a.mode == "tc":
                # The tc build updates a partial checksum as the kernel's own NAT does.
                out.append(Check("tx_checksum", where, True, f"tx checksum offload {tx} at "
                                 f"{sender_if} in {sender_ns}: {a.ifname} runs the tc build, "
                                 "which keeps partial checksums valid"))
            elif tx == "on":
                out.append(Check("tx_checksum", where, False,
                                 f"tx checksum offload is on at {sender_if} in {sender_ns}, "
                                 f"which sends to {a.ifname}: its frames carry partial "
                                 f"checksums, dropped as corrupt once the {a.mode} XDP program "
                                 "rewrites them (the tc build keeps them valid)",
                                 f"ip netns exec {sender_ns} ethtool -K {sender_if} tx off"))
            elif tx is not None:
                out.append(Check("tx_checksum", where, True, f"tx checksum offload off on the "
                                 f"veth end sending to {a.ifname}"))
    return out


def _kind(link: dict) -> str | None:
    return (link.get("linkinfo") or {}).get("info_kind")


def _veth_peer(link: dict, netns: str | None = None) -> tuple[str, str] | None:
    """(namespace, ifname) at the other end of a veth seen from `netns` (None: here)."""
    peer_index = link.get("link_index")
    if peer_index is None:
        return None
    nsid = link.get("link_netnsid")
    if nsid is None:
        peer_ns = netns
    else:
        ids = {n.get("id"): n["name"] for n in _ip_json(["netns", "list"], netns)}
        peer_ns = ids.get(nsid)
        if peer_ns is None:
            return None
    for other in _ip_json(["-d", "link", "show"], peer_ns):
        if other.get("ifindex") == peer_index:
            return (peer_ns or "-", other["ifname"])
    return None


def _senders(netns: str, ifname: str) -> list[tuple[str, str]]:
    """The veth ends whose frames arrive through this peer: the peer itself, or, when it is a
    bridge port, the far ends of the bridge's other veth ports."""
    links = {link["ifname"]: link for link in _ip_json(["-d", "link", "show"], netns)}
    master = links.get(ifname, {}).get("master")
    if master is None or _kind(links.get(master, {})) != "bridge":
        return [(netns, ifname)]
    out = []
    for name, link in links.items():
        if name == ifname or link.get("master") != master or _kind(link) != "veth":
            continue
        far = _veth_peer(link, netns)
        if far is not None:
            out.append(far)
    return out


def _in_ns(netns: str | None, argv: list[str]) -> list[str]:
    if netns is None or netns == "-":
        return argv
    return ["nsenter", f"--net={os.path.join(NETNS_DIR, netns)}", "--", *argv]


def _ip_json(args: list[str], netns: str | None = None) -> list[dict]:
    proc = subprocess.run(_in_ns(netns, ["ip", "-j", *args]), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return json.loads(proc.stdout)


def parse_features(text: str) -> dict[str, str]:
    """`ethtool -k` output as feature -> 'on' | 'off': the state the device is in ('off
    [requested on]' is off, 'on [fixed]' is on), sub-features included."""
    out = {}
    for line in text.splitlines()[1:]:
        name, _, value = line.strip().partition(":")
        if value.strip():
            out[name.strip()] = value.split()[0]
    return out


def _features(netns: str | None, ifname: str) -> dict[str, str]:
    proc = subprocess.run(_in_ns(netns, ["ethtool", "-k", ifname]), capture_output=True,
                          text=True, check=False)
    return parse_features(proc.stdout)


def _xdp_on(netns: str | None, ifname: str) -> bool:
    return any("xdp" in link for link in _ip_json(["link", "show", "dev", ifname], netns))


def _trace_flag(probe: _Probe) -> Check:
    pid = getattr(probe, "stale_tracer", None)
    if pid is None:
        return Check("trace_off", "-", True, "tracing is off, or on for a tracer that runs")
    return Check("trace_off", "-", False, f"tracing was left on by pid {pid}, which is gone (killed?): "
                 "every packet paid for an event nobody read; doctor has turned it off",
                 "nothing more: tracing is off now")


# -- tables, VIPs and backends -----------------------------------------------------------------
# The Limits field that sizes each table the fill check looks at.
_SIZE_OF = {"flows": "flow_table_size", "frags": "frag_table_size",
            "snat_flows": "snat_table_size", "snat_rnat": "snat_table_size",
            "snat_flows6": "snat_table_size", "snat_rnat6": "snat_table_size"}


def _tables(fill: dict[str, tuple[int, int]], limits: Limits) -> list[Check]:
    out = []
    for name, (used, size) in fill.items():
        seen = f"{used}/{size} entries ({used / size:.1%})"
        if used >= FILL_WARN * size:
            out.append(Check("table_fill", name, False, f"{seen}: new {name} evict live ones "
                             "(LRU; the kernel does not count evictions)",
                             f"raise {_SIZE_OF.get(name, name + '_table_size')} in xdp/limits.py "
                             "and 'lbctl reload', or "
                             "'lbctl flows flush' once the burst is over"))
        else:
            out.append(Check("table_fill", name, True, seen))
    return out


def _vip_backends(live: dict) -> list[Check]:
    out = []
    for vip, lv in sorted(live.items()):
        usable = [b for b in lv.spec.backends if b.in_ring]
        name = f"{vip} {vip.proto}"
        if usable:
            out.append(Check("vip_backends", name, True, f"{len(usable)} usable of "
                             f"{len(lv.spec.backends)} backends"))
            continue
        states = ", ".join(f"{b.name} {b.state}" for b in lv.spec.backends) or "none"
        fix = (f"lbctl backend set {vip} {lv.spec.backends[0].name} --state active"
               if lv.spec.backends else f"lbctl backend add {vip} ADDR:PORT")
        out.append(Check("vip_backends", name, False, f"no usable backend (backends: {states}): "
                         "every new connection is dropped", fix))
    return out


def _ring_shares(probe: _Probe, live: dict) -> list[Check]:
    out = []
    rings: dict = getattr(probe, "rings", {})
    for vip, lv in sorted(live.items()):
        slots = Counter(rings.get(vip, []))
        for b in lv.spec.backends:
            if not b.in_ring:
                continue
            n = slots.get(lv.backend_ids[b.name], 0)
            subject = f"{vip} {vip.proto} -> {b.name}"
            if n == 0:
                out.append(Check("ring_share", subject, False, f"weight {b.weight} but 0 of "
                                 f"{probe.limits.ring_size} slots in the live ring: never picked",
                                 f"lbctl backend set {vip} {b.name} --weight {b.weight}   "
                                 "(rewrites the ring)"))
            else:
                out.append(Check("ring_share", subject, True, f"weight {b.weight}, {n} ring slots "
                                 f"({n / probe.limits.ring_size:.1%})"))
    return out


def _neighbours(probe: _Probe, live: dict) -> list[Check]:
    attached = {a.ifname for a in probe.attachments}
    out = []
    seen: set[str] = set()
    for lv in live.values():
        for b in lv.spec.backends:
            if b.addr in seen:
                continue
            seen.add(b.addr)
            out.append(_neighbour(b.addr, attached))
    return out


def _neighbour(addr: str, attached: set[str]) -> Check:
    routes = _ip_json(["route", "get", addr])
    if not routes:
        return Check("neighbour", addr, False, "no route to this backend",
                     f"ip route add {addr} via GATEWAY (or an address on its subnet)")
    route = routes[0]
    dev, hop = route.get("dev", "?"), route.get("gateway", addr)
    if dev not in attached:
        return Check("neighbour", addr, False, f"the route leaves by {dev}, which runs no lbctl "
                     "program: the program cannot redirect there", f"lbctl attach {dev}")
    state = _neigh_state(hop, dev)
    if state is None or state not in _NEIGH_OK:
        _solicit(addr)   # any packet makes the kernel resolve the next hop
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            state = _neigh_state(hop, dev)
            if state in _NEIGH_OK:
                break
            time.sleep(0.05)
    via = "" if hop == addr else f" via {hop}"
    if state in _NEIGH_OK:
        return Check("neighbour", addr, True, f"out {dev}{via}, neighbour {state.lower()}")
    return Check("neighbour", addr, False, f"out {dev}{via}, but {hop} does not answer "
                 f"{'neighbour solicitation' if ':' in addr else 'ARP'} "
                 f"({(state or 'no entry').lower()}): the program passes its packets to the kernel",
                 f"bring {hop} up on {dev}'s segment, or fix its address (ip neigh show dev {dev})")


def _neigh_state(addr: str, dev: str) -> str | None:
    for entry in _ip_json(["neigh", "show", addr, "dev", dev]):
        states = entry.get("state") or []
        return states[0] if states else None
    return None


def _solicit(addr: str) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"", (addr, 9))   # discard: nothing listens, only ARP is wanted
        except OSError:
            pass


def _replies(live: dict, flows: list, syn_stuck_s: float) -> list[Check]:
    """Two-arm NAT needs the backend's reply to come back through the balancer; a flow whose
    SYN went out but whose client never completed the handshake stays in 'syn'. Full-NAT needs
    the reply to reach the SNAT address (plain routing), so its hint differs. A DSR VIP's
    replies never come here by design: its check is whether clients complete handshakes."""
    now_ns = time.monotonic_ns()   # bpf_ktime_get_ns is CLOCK_MONOTONIC too
    # By VIP and backend: a backend several VIPs share may answer one mode and not another.
    stuck_by_vip: Counter[tuple[str, int, str, str, int]] = Counter()
    answered_by_vip: Counter[tuple[str, int, str, str, int]] = Counter()
    for f in flows:
        key = (f.vip, f.vip_port, f.proto, f.backend, f.backend_port)
        if f.state == "syn" and now_ns - f.created_ns > syn_stuck_s * 1e9:
            stuck_by_vip[key] += 1
        elif f.state in ("established", "closing"):
            answered_by_vip[key] += 1
    out = []
    for vip, lv in sorted(live.items()):
        if vip.proto != "tcp":
            continue
        mine = (vip.addr, vip.port, vip.proto)
        stuck = Counter({k[3:]: n for k, n in stuck_by_vip.items() if k[:3] == mine})
        answered = Counter({k[3:]: n for k, n in answered_by_vip.items() if k[:3] == mine})
        if lv.spec.forwarding == "dsr":
            out += _dsr_handshakes(vip, lv, stuck, answered)
            continue
        for b in lv.spec.backends:
            key = (b.addr, b.port)
            if stuck[key] and not answered[key]:
                routes = _ip_json(["route", "get", b.addr])
                lb_addr = routes[0].get("prefsrc", "<balancer's address>") if routes else \
                    "<balancer's address>"
                if lv.spec.forwarding == "fullnat":
                    # Replies go to the SNAT address by plain routing: no route change is asked
                    # of the backend, only that it reaches that address.
                    snat = ", ".join(lv.spec.snat) or lb_addr
                    out.append(Check("replies", b.name, False,
                                     f"{stuck[key]} full-NAT flows in SYN for over {syn_stuck_s:g} s, "
                                     f"none answered: the backend's replies to {snat} do not reach "
                                     "the balancer (or the host is gone)",
                                     f"on {b.addr}: 'ip route get {snat.split(',')[0]}' must lead to "
                                     f"the balancer and nothing may filter it; or lbctl backend set "
                                     f"{vip} {b.name} --state down if it is gone"))
                    continue
                out.append(Check("replies", b.name, False,
                                 f"{stuck[key]} flows in SYN for over {syn_stuck_s:g} s, none "
                                 "answered: the backend's replies do not come back through the "
                                 "balancer (or the host is gone)",
                                 f"on {b.addr}: ip route replace default via {lb_addr}; or, when "
                                 "the backends cannot route through the balancer, full-NAT: "
                                 f"lbctl vip add {vip} --forwarding fullnat (one-arm, replies come "
                                 f"back by plain routing); or lbctl backend set {vip} {b.name} "
                                 "--state down if it is gone"))
            else:
                out.append(Check("replies", b.name, True, f"{answered[key]} answered flows, "
                                 f"{stuck[key]} stuck in SYN"))
    return out



def _dsr_handshakes(vip: Endpoint, lv, stuck: Counter, answered: Counter) -> list[Check]:
    """DSR: the balancer sees no reply, but it sees the client's ACK of the backend's SYN-ACK
    (the flow turns established). Flows that stay in SYN with none established mean the
    backend does not answer from the VIP: the VIP is not on its loopback/dummy interface, or
    its rp_filter or firewall drops the client's packet."""
    out = []
    for b in lv.spec.backends:
        key = (b.addr, b.port)
        if stuck[key] and not answered[key]:
            out.append(Check("dsr_handshakes", b.name, False,
                             f"{stuck[key]} flows of DSR VIP {vip} stuck in SYN, no client completed "
                             "a handshake: the backend does not answer clients from the VIP",
                             f"on {b.addr}: ip addr add {vip.addr}/32 dev lo, arp_ignore=1, "
                             "arp_announce=2, rp_filter 0 or 2 (docs/modes.md); then "
                             f"lbctl backend check {vip} {b.addr}"))
        else:
            out.append(Check("dsr_handshakes", b.name, True,
                             f"{answered[key]} handshakes completed, {stuck[key]} stuck in SYN "
                             "(DSR: replies go straight to clients, the balancer sees the client's ACKs)"))
    return out


# -- lbctl backend check -----------------------------------------------------------------------
def check_backend(instance: str, vip: Endpoint, addr: str, port: int | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> list[Check]:
    """What the balancer can check of one backend for a VIP, before or after it is added: the
    FIB's route to it (DSR: on an attached link, no gateway), the interface runs the program,
    the neighbour table resolves it to a MAC, and (DSR) the port is the VIP's."""
    from lbctl import planner
    from lbctl.neigh import neighbour, route_to

    require_root()
    balancer = Balancer(instance, limits)
    with balancer.maps() as maps:
        live = planner.read_live(maps)
    if vip not in live:
        raise ConflictError(f"no VIP {vip} ({vip.proto}); hint: 'lbctl vip list' shows the VIPs")
    spec = live[vip].spec
    known = next((b for b in spec.backends if b.addr == addr and (port is None or b.port == port)), None)
    port = port if port is not None else known.port if known is not None else vip.port
    dsr = spec.forwarding == "dsr"
    name = f"{addr}:{port}"
    out = [Check("backend", name, True, f"{'a backend' if known else 'not (yet) a backend'} of "
                 f"VIP {vip} ({vip.proto}), forwarding {spec.forwarding}")]
    attached = {a.ifname for a in balancer.attachments()}

    route = route_to(addr)
    if route is None:
        out.append(Check("route", addr, False, "no route to it from the balancer",
                         f"ip route add {addr}/32 dev IFACE (the link the backend is on)"))
        return out + _port_check(vip, spec.forwarding, addr, port)
    if route.gateway is not None and dsr:
        out.append(Check("route", addr, False, f"reached via {route.gateway} on {route.ifname}: DSR "
                         "rewrites only MACs, so the backend must be on a link of the balancer; the "
                         "gateway would route the frame by its destination, the VIP",
                         f"put the backend on a segment {route.ifname} or another attached interface is "
                         f"on, or use --forwarding nat for {vip}"))
    else:
        via = f"via {route.gateway} " if route.gateway else "directly connected "
        out.append(Check("route", addr, True, f"{via}on {route.ifname}"
                         + (" (same L2 segment)" if route.gateway is None else "")))
    if route.ifname in attached:
        out.append(Check("attached", route.ifname, True, f"{route.ifname} runs the lbctl program"))
    else:
        out.append(Check("attached", route.ifname, False, f"{route.ifname}, the way to {addr}, runs no "
                         "lbctl program: the program cannot redirect there", f"lbctl attach {route.ifname}"))
    hop = route.gateway or addr
    n = neighbour(hop, route.ifindex)
    if n is None or not n.resolved:
        _solicit(hop)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            n = neighbour(hop, route.ifindex)
            if n is not None and n.resolved:
                break
            time.sleep(0.05)
    if n is not None and n.resolved:
        out.append(Check("neighbour", hop, True, f"{hop} is at {n.lladdr} on {route.ifname} "
                         f"({n.state}{', managed' if n.managed else ''})"))
    else:
        out.append(Check("neighbour", hop, False, f"{hop} does not answer ARP on {route.ifname} "
                         f"({n.state if n else 'no entry'}): no MAC to send its frames to",
                         f"bring {hop} up on {route.ifname}'s segment, or fix the address "
                         f"(ip neigh show dev {route.ifname})"))
    if dsr and route.gateway is None and known is not None:
        if n is not None and (n.managed or n.state in ("permanent", "noarp")):
            out.append(Check("neighbour_kept", addr, True, "the kernel keeps it resolved "
                             + ("(managed entry)" if n.managed else f"({n.state})")))
        else:
            out.append(Check("neighbour_kept", addr, False, "no managed entry: the balancer sends "
                             "nothing to this address itself, so once the entry ages out "
                             "bpf_fib_lookup finds no MAC and the VIP's frames are dropped",
                             f"ip neigh replace {addr} dev {route.ifname} managed   (lbctl makes "
                             "it on every change of a DSR VIP)"))
    return out + _port_check(vip, spec.forwarding, addr, port)


def _port_check(vip: Endpoint, forwarding: str, addr: str, port: int) -> list[Check]:
    from lbctl.model import backend_problem

    if forwarding != "dsr":
        return []
    problem = backend_problem(vip, forwarding, addr, port)
    if problem is None:
        return [Check("dsr_port", f"{addr}:{port}", True, f"port {port} is the VIP's: the frame "
                      "arrives unchanged")]
    what, _, hint = problem.partition("; hint: ")
    return [Check("dsr_port", f"{addr}:{port}", False, what, hint)]
