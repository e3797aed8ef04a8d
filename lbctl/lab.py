"""Namespace lab: client, balancer, L2 switch and backends wired by veth, with HTTP/UDP servers."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml  # type: ignore[import-untyped]
from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

from lbctl import runlock
from lbctl.errors import LbctlError
from xdp.errors import NeedRootError
from xdp.maps import pin_dir_for

TOPOLOGY_PATH = Path(__file__).with_name("lab_topology.yaml")
# State a later process needs to take the lab down: pid files, server logs, the ready marker.
RUN_ROOT = Path("/run/lbctl/lab")
NETNS_DIR = Path(netns.NETNS_RUN_DIR)
# Absent when the kernel was booted with ipv6.disable=1.
KERNEL_IPV6 = Path("/proc/sys/net/ipv6")
# Repository root, so servers started with another interpreter still import lbctl.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent

_IFNAME_MAX = 15  # IFNAMSIZ - 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_PREFIX_MAX = 20

SERVER_READY_TIMEOUT_S = 10.0
PROCESS_EXIT_TIMEOUT_S = 3.0
LINKS_UP_TIMEOUT_S = 5.0


class LabError(LbctlError):
    """The lab could not be built, inspected or used."""

    exit_code = 7


class LabNeedsRootError(LabError, NeedRootError):
    """Building or removing a lab needs root; exits like every other command without it."""

    exit_code = 77


class LabTrafficError(LabError):
    """Some lab requests failed; `results` holds every request's outcome, in order."""

    def __init__(self, message: str, results: list[Any]) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class LabIface:
    """One interface of a lab host: its name inside the host's namespace and its address."""

    name: str
    addr: str
    prefixlen: int
    network: str
    addr6: str | None = None  # IPv6 address beside addr, if the topology gives one
    prefixlen6: int = 64


@dataclass(frozen=True)
class LabHost:
    """A lab host: `name` is its role name ("client", "lb", "be1"), `netns` the namespace."""

    name: str
    role: str  # "client", "balancer" or "backend"
    netns: str
    ifname: str  # first interface (for the balancer: the client side)
    addr: str  # address on `ifname`, without prefix length
    gateway: str | None
    ifaces: tuple[LabIface, ...] = ()
    addr6: str | None = None  # IPv6 address on `ifname`, if the lab has IPv6
    gateway6: str | None = None


@dataclass
class LabStatus:
    """What of a lab exists right now, as found in the system (not as remembered)."""

    prefix: str
    namespaces: dict[str, bool]  # netns name -> exists
    servers: dict[str, int | None]  # backend name -> pid of its live server, else None
    # host name -> "addr/prefixlen" configured in its netns: IPv4, then global IPv6
    addresses: dict[str, list[str]]
    ready: bool  # a completed up() left its marker

    @property
    def up(self) -> bool:
        return (
            self.ready
            and all(self.namespaces.values())
            and all(pid is not None for pid in self.servers.values())
        )

    @property
    def down(self) -> bool:
        return not any(self.namespaces.values()) and all(
            pid is None for pid in self.servers.values()
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "up": self.up, "down": self.down}


@dataclass(frozen=True)
class HttpResult:
    """One HTTP request made from inside a lab namespace."""

    target: str  # "host:port"
    status: int | None = None
    body: str | None = None
    backend: str | None = None  # X-Backend header
    client_addr: str | None = None  # X-Client-Addr header: the peer the backend saw
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


@dataclass
class _Topology:
    vip: str
    http_port: int
    udp_port: int
    networks: dict[str, str]  # name -> cidr
    bridges: dict[str, str]  # network name -> bridge ifname (switched networks)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    vip6: str | None = None
    networks6: dict[str, str] = field(default_factory=dict)  # name -> IPv6 cidr, where given


def load_topology(path: Path | str = TOPOLOGY_PATH) -> _Topology:
    """Read and check the lab topology file; raise LabError naming the first problem."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LabError(f"cannot read lab topology {path}: {exc}") from exc

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise LabError(f"lab topology {path}: {what}")

    need(isinstance(raw, dict), "top level must be a mapping")
    for key in ("vip", "ports", "networks", "hosts"):
        need(key in raw, f"missing '{key}'")
    networks: dict[str, str] = {}
    networks6: dict[str, str] = {}
    bridges: dict[str, str] = {}
    for name, net in raw["networks"].items():
        need(isinstance(net, dict) and "cidr" in net, f"network '{name}' needs a cidr")
        try:
            networks[name] = str(ipaddress.IPv4Network(net["cidr"]))
            if "cidr6" in net:
                networks6[name] = str(ipaddress.IPv6Network(net["cidr6"]))
        except ValueError as exc:
            need(False, f"network '{name}': {exc}")
        if "bridge" in net:
            need(len(net["bridge"]) <= _IFNAME_MAX, f"bridge name '{net['bridge']}' too long")
            bridges[name] = net["bridge"]
    hosts: dict[str, dict[str, Any]] = {}
    for name, host in raw["hosts"].items():
        need(bool(_NAME_RE.match(name)), f"bad host name '{name}'")
        # Switch ports are named "p-<host>" and must fit IFNAMSIZ.
        need(len(name) <= _IFNAME_MAX - 2, f"host name '{name}' too long")
        need(host.get("role") in ("client", "balancer", "backend"), f"host '{name}': bad role")
        ifaces = host.get("interfaces") or []
        need(len(ifaces) >= 1, f"host '{name}' has no interfaces")
        for iface in ifaces:
            need(iface.get("network") in networks, f"host '{name}': unknown network")
            need(len(iface.get("name", "")) <= _IFNAME_MAX, f"host '{name}': bad ifname")
            cidr = ipaddress.IPv4Network(networks[iface["network"]])
            need(
                ipaddress.IPv4Address(iface["address"]) in cidr,
                f"host '{name}': {iface['address']} is not in {cidr}",
            )
            if "address6" in iface:
                cidr6 = networks6.get(iface["network"])
                need(cidr6 is not None,
                     f"host '{name}': address6 on network '{iface['network']}', which has no cidr6")
                need(_ip6(iface["address6"]) in ipaddress.IPv6Network(str(cidr6)),
                     f"host '{name}': {iface['address6']} is not in {cidr6}")
        if "gateway6" in host:
            need(_ip6(host["gateway6"]) is not None, f"host '{name}': bad gateway6")
        hosts[name] = host
    roles = [h["role"] for h in hosts.values()]
    need(roles.count("client") == 1, "needs exactly one client")
    need(roles.count("balancer") == 1, "needs exactly one balancer")
    need(roles.count("backend") >= 1, "needs at least one backend")
    vip6 = raw.get("vip6")
    if vip6 is not None:
        need(_ip6(vip6) is not None, f"vip6 '{vip6}' is not an IPv6 address")
        # The v6 VIP's path: the client and the balancer need IPv6 on every interface. A
        # backend without address6 is simply not among the v6 VIP's backends.
        for name, host in hosts.items():
            if host["role"] != "backend" and not all("address6" in i for i in host["interfaces"]):
                need(False, f"vip6 is set, so host '{name}' needs address6 on every interface")
    return _Topology(
        vip=str(ipaddress.IPv4Address(raw["vip"])),
        http_port=int(raw["ports"]["http"]),
        udp_port=int(raw["ports"]["udp"]),
        networks=networks,
        bridges=bridges,
        hosts=hosts,
        vip6=None if vip6 is None else str(ipaddress.IPv6Address(vip6)),
        networks6=networks6,
    )


def _ip6(text: Any) -> ipaddress.IPv6Address | None:
    try:
        return ipaddress.IPv6Address(str(text))
    except ValueError:
        return None


HostRef = Union[LabHost, str]


class Lab:
    """The namespace lab. Every name derives from `prefix`, so labs with different prefixes coexist.

    Namespaces: <prefix>-client, <prefix>-lb, <prefix>-sw (the backend-side bridge), and one
    per backend (<prefix>-be1 ...). `up()` builds it, `down()` removes it from any process.
    """

    def __init__(self, prefix: str = "lbl", topology_path: Path | str = TOPOLOGY_PATH,
                 ipv6: bool = True) -> None:
        if not (_NAME_RE.match(prefix) and len(prefix) <= _PREFIX_MAX):
            raise LabError(
                f"bad lab prefix '{prefix}'; hint: use up to {_PREFIX_MAX} letters, digits, '-' or '_'"
            )
        self.prefix = prefix
        self._topo = load_topology(topology_path)
        self.vip: str = self._topo.vip
        # The IPv6 VIP, None when the topology has no IPv6, ipv6=False, or the kernel runs
        # without IPv6 (ipv6.disable=1): the lab is then IPv4 only.
        self.ipv6_missing = self._topo.vip6 is not None and not KERNEL_IPV6.exists()
        self.vip6: str | None = self._topo.vip6 if ipv6 and not self.ipv6_missing else None
        self.http_port: int = self._topo.http_port
        self.udp_port: int = self._topo.udp_port
        self.networks: dict[str, str] = dict(self._topo.networks)
        self.hosts: dict[str, LabHost] = {}
        for name, spec in self._topo.hosts.items():
            with6 = self.vip6 is not None
            ifaces = tuple(
                LabIface(
                    name=i["name"],
                    addr=str(i["address"]),
                    prefixlen=ipaddress.IPv4Network(self.networks[i["network"]]).prefixlen,
                    network=i["network"],
                    addr6=str(ipaddress.IPv6Address(i["address6"]))
                    if with6 and "address6" in i else None,
                    prefixlen6=(ipaddress.IPv6Network(self._topo.networks6[i["network"]]).prefixlen
                                if with6 else 64),
                )
                for i in spec["interfaces"]
            )
            self.hosts[name] = LabHost(
                name=name,
                role=spec["role"],
                netns=f"{prefix}-{name}",
                ifname=ifaces[0].name,
                addr=ifaces[0].addr,
                gateway=spec.get("gateway"),
                ifaces=ifaces,
                addr6=ifaces[0].addr6,
                gateway6=str(ipaddress.IPv6Address(spec["gateway6"]))
                if with6 and spec.get("gateway6") else None,
            )
        self.client: LabHost = next(h for h in self.hosts.values() if h.role == "client")
        self.lb: LabHost = next(h for h in self.hosts.values() if h.role == "balancer")
        self.backends: list[LabHost] = [h for h in self.hosts.values() if h.role == "backend"]
        self.switch_netns = f"{prefix}-sw"
        client_nets = {i.network for i in self.client.ifaces}
        backend_nets = {i.network for b in self.backends for i in b.ifaces}
        # A client may also sit on the backends' segment (the DSR test's lab, where backends
        # answer it there): the balancer's client side is the network only the client is on.
        client_side = [i for i in self.lb.ifaces if i.network in client_nets - backend_nets]
        backend_side = [i for i in self.lb.ifaces if i.network in backend_nets]
        if len(client_side) != 1 or len(backend_side) != 1 or len(self.lb.ifaces) != 2:
            raise LabError(
                "lab topology: the balancer needs exactly one client-side and one backend-side "
                "interface"
            )
        # What `lbctl -n <lb netns> attach` gets: client side first, then backend side.
        self.lb_ifaces: list[str] = [client_side[0].name, backend_side[0].name]
        self.run_dir = RUN_ROOT / prefix
        self.bpf_pin_dir = Path(pin_dir_for(self.lb.netns))

    # ---------------------------------------------------------------- names

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this lab owns, in build order."""
        names = [self.client.netns, self.lb.netns]
        if self._topo.bridges:
            names.append(self.switch_netns)
        return names + [b.netns for b in self.backends]

    def host(self, ref: HostRef) -> LabHost:
        """Resolve a host by object, role name ("be1") or namespace name ("lbl-be1")."""
        if isinstance(ref, LabHost):
            return ref
        for h in self.hosts.values():
            if ref in (h.name, h.netns):
                return h
        raise LabError(f"no lab host '{ref}' (hosts: {', '.join(self.hosts)})")

    def _netns_of(self, ref: HostRef) -> str:
        if isinstance(ref, str) and ref in ("sw", self.switch_netns):
            return self.switch_netns
        return self.host(ref).netns

    # ---------------------------------------------------------------- commands

    def run(
        self,
        host: HostRef,
        argv: list[str],
        *,
        check: bool = False,
        keep_mounts: bool = False,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in a host's namespace ("sw" names the switch); subprocess.run semantics.

        `check` and the other keywords go to subprocess.run. Output is captured as text
        unless the caller passes stdout/stderr/capture_output.
        `ip netns exec` remounts /sys for the namespace, which hides the host's bpffs pins;
        keep_mounts=True switches only the network namespace (nsenter --net) so they stay
        visible.
        """
        ns = self._netns_of(host)
        prefix = (
            ["nsenter", f"--net={NETNS_DIR / ns}", "--"]
            if keep_mounts
            else ["ip", "netns", "exec", ns]
        )
        kw.setdefault("text", True)
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        return subprocess.run([*prefix, *argv], check=check, **kw)

    def _must(self, ns_ref: HostRef, argv: list[str], timeout_s: float = 30.0) -> str:
        try:
            proc = self.run(ns_ref, argv, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"in netns {self._netns_of(ns_ref)}: {' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise LabError(
                f"in netns {self._netns_of(ns_ref)}: '{' '.join(argv)}' exited "
                f"{proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    # ---------------------------------------------------------------- lifecycle

    def up(self) -> None:
        """Build the lab and start its servers; no-op if it is fully up already.

        A partial lab (a crashed run, a killed server) is torn down and rebuilt. If building
        fails (or is interrupted), everything built so far is removed again (namespaces with
        their links, servers, pins, run state) and the error raised as a LabError.
        """
        need_root("lab up")
        with _run_lock(self.prefix) as lock:
            if self.status().up:
                return
            self._down_locked()
            try:
                self._build()
            except BaseException as exc:
                try:
                    self._down_locked()
                except LabError as cleanup_exc:
                    raise LabError(
                        f"cannot build lab '{self.prefix}': {_one_line(exc)}; and cleaning up "
                        f"failed too: {cleanup_exc}"
                    ) from exc
                lock.remove = True  # nothing of this lab is left, not even its lock file
                if isinstance(exc, LabError) or not isinstance(exc, Exception):
                    raise
                # A kernel refusal (netlink, a file) mid-build: one line, not a traceback.
                raise LabError(f"cannot build lab '{self.prefix}': {_one_line(exc)}") from exc

    def down(self) -> None:
        """Stop the lab's processes, delete its namespaces and the balancer's pins.

        Safe to call from any process, any number of times, on a lab in any state.
        """
        need_root("lab down")
        with _run_lock(self.prefix) as lock:
            self._down_locked()
            lock.remove = True

    def status(self) -> LabStatus:
        """Look at the system: which namespaces exist, which servers live, what addresses."""
        namespaces = {ns: (NETNS_DIR / ns).exists() for ns in self.namespaces}
        servers = {b.name: self._live_server_pid(b) for b in self.backends}
        addresses: dict[str, list[str]] = {}
        for h in self.hosts.values():
            addresses[h.name] = self._addresses_in(h.netns) if namespaces[h.netns] else []
        return LabStatus(
            prefix=self.prefix,
            namespaces=namespaces,
            servers=servers,
            addresses=addresses,
            ready=(self.run_dir / "ready").exists(),
        )

    # ---------------------------------------------------------------- traffic

    def http_requests(
        self,
        host: str,
        port: int | None = None,
        path: str = "/",
        *,
        count: int = 1,
        new_connection: bool = True,
        timeout_s: float = 5.0,
        total_timeout_s: float | None = None,
        src: HostRef = "client",
    ) -> list[HttpResult]:
        """Make `count` HTTP GETs to host:port from inside `src`'s namespace, in one subprocess.

        new_connection=True opens a TCP connection per request ("Connection: close");
        False reuses one keep-alive connection (reconnecting after an error). timeout_s bounds
        each request; requests not started by total_timeout_s are reported as errors.
        """
        port = self.http_port if port is None else port
        total = total_timeout_s if total_timeout_s is not None else 10.0 + count * 0.2
        spec = {
            "targets": [
                {
                    "host": host,
                    "port": port,
                    "path": path,
                    "count": count,
                    "new_connection": new_connection,
                }
            ],
            "timeout_s": timeout_s,
            "total_timeout_s": total,
        }
        records = self._run_snippet(src, _HTTP_SNIPPET, spec, total + timeout_s + 10.0)
        return [HttpResult(**r) for r in records]

    def http_get(
        self,
        host: str,
        port: int | None = None,
        path: str = "/",
        *,
        count: int = 1,
        new_connection: bool = True,
        timeout_s: float = 5.0,
        total_timeout_s: float | None = None,
        src: HostRef = "client",
    ) -> list[str]:
        """Like http_requests, but return the bodies, stripped (a backend's name: "be1").

        Raises LabTrafficError (with every result attached) if any request failed.
        """
        results = self.http_requests(
            host,
            port,
            path,
            count=count,
            new_connection=new_connection,
            timeout_s=timeout_s,
            total_timeout_s=total_timeout_s,
            src=src,
        )
        failed = [r for r in results if not r.ok]
        if failed:
            raise LabTrafficError(
                f"{len(failed)} of {len(results)} HTTP requests to {host}:{port or self.http_port}"
                f" from {self._netns_of(src)} failed; first: "
                f"{failed[0].error or f'status {failed[0].status}'}",
                results,
            )
        return [(r.body or "").strip() for r in results]

    def udp_echo(
        self,
        host: str,
        port: int | None = None,
        payload: str | bytes = "ping",
        count: int = 1,
        *,
        new_socket: bool = True,
        timeout_s: float = 2.0,
        src: HostRef = "client",
    ) -> list[str]:
        """Send `count` datagrams to host:port from `src`'s namespace; return the replies.

        new_socket=True uses a fresh socket (so a fresh source port, a new flow) per datagram.
        A backend replies "<name> <payload>". Raises LabTrafficError if any reply is missing.
        """
        port = self.udp_port if port is None else port
        data = payload.encode() if isinstance(payload, str) else payload
        spec = {
            "host": host,
            "port": port,
            "payload_hex": data.hex(),
            "count": count,
            "new_socket": new_socket,
            "timeout_s": timeout_s,
        }
        records = self._run_snippet(src, _UDP_SNIPPET, spec, count * timeout_s + 10.0)
        failed = [r for r in records if r.get("error")]
        if failed:
            raise LabTrafficError(
                f"{len(failed)} of {len(records)} UDP echoes to {host}:{port} from "
                f"{self._netns_of(src)} failed; first: {failed[0]['error']}",
                records,
            )
        return [bytes.fromhex(r["reply_hex"]).decode(errors="replace") for r in records]

    def _run_snippet(
        self, src: HostRef, code: str, spec: dict[str, Any], timeout_s: float
    ) -> list[dict[str, Any]]:
        # -I -S: stdlib only, no site-packages to import, so each call starts fast.
        argv = [sys.executable, "-I", "-S", "-c", code, json.dumps(spec)]
        try:
            proc = self.run(src, argv, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"traffic helper in netns {self._netns_of(src)} did not finish in {timeout_s:.0f} s"
            ) from exc
        if proc.returncode != 0:
            raise LabError(
                f"traffic helper in netns {self._netns_of(src)} exited {proc.returncode}: "
                f"{proc.stderr.strip()[-500:]}"
            )
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    # ---------------------------------------------------------------- building

    def _build(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for ns in self.namespaces:
            netns.create(ns)
        self._sysctls_before_links()
        lb_peers = self._wire()
        self._configure_addresses()
        self._tune_offloads(lb_peers)
        self._start_servers()
        self._wait_servers_ready()
        self._wait_links_up()
        self._check_paths()
        (self.run_dir / "ready").write_text(
            json.dumps({"prefix": self.prefix, "namespaces": self.namespaces}) + "\n"
        )

    def _sysctls_before_links(self) -> None:
        # "default" covers the interfaces created afterwards.
        if self.vip6 is None:
            # IPv6 off: no router solicitations, MLD or DAD noise in the balancer's pass
            # counters, and no DAD wait.
            knobs = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        else:
            # IPv6 on, quiet and at once: no duplicate address detection (addresses usable
            # when added, no DAD probes), no router advertisements taken and no router
            # solicitations sent (the routes are static). What remains is neighbour
            # discovery for real traffic, which the balancer passes as it passes ARP.
            knobs = [f"net.ipv6.conf.{scope}.{knob}"
                     for scope in ("all", "default")
                     for knob in ("disable_ipv6=0", "accept_dad=0", "accept_ra=0",
                                  "router_solicitations=0")]
        for ns in self.namespaces:
            self._must(ns, ["sysctl", "-q", "-e", "-w", *knobs])
        if self.vip6 is not None:
            # bpf_fib_lookup answers IPv6 only where forwarding is on, as the kernel's own
            # routing does.
            self._must(self.lb, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        # rp_filter: the effective value is max(all, iface), so both must be 0; "default"
        # makes the interfaces created next start at 0.
        self._must(
            self.lb,
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )

    def _wire(self) -> dict[str, tuple[str, str]]:
        """Create the veths and bridges; return lb ifname -> (peer netns, peer ifname)."""
        lb_peers: dict[str, tuple[str, str]] = {}
        for net in self.networks:
            members = [(h, i) for h in self.hosts.values() for i in h.ifaces if i.network == net]
            bridge = self._topo.bridges.get(net)
            if bridge is None:
                if len(members) != 2:
                    raise LabError(
                        f"lab topology: network '{net}' has {len(members)} hosts; a network "
                        "without a bridge must join exactly two"
                    )
                (a, a_if), (b, b_if) = members
                # The veth is born with its peer already in the other namespace, so no
                # temporary name ever appears on the host.
                _veth(a.netns, a_if.name, b.netns, b_if.name)
                for h, i, peer_h, peer_i in ((a, a_if, b, b_if), (b, b_if, a, a_if)):
                    if h.role == "balancer":
                        lb_peers[i.name] = (peer_h.netns, peer_i.name)
                continue
            with IPRoute(netns=self.switch_netns, flags=0) as ipr:
                ipr.link("add", ifname=bridge, kind="bridge")
                br_index = ipr.link_lookup(ifname=bridge)[0]
                ipr.link("set", index=br_index, state="up")
            for h, i in members:
                port = f"p-{h.name}"
                _veth(self.switch_netns, port, h.netns, i.name)
                with IPRoute(netns=self.switch_netns, flags=0) as ipr:
                    idx = ipr.link_lookup(ifname=port)[0]
                    ipr.link("set", index=idx, master=br_index)
                    ipr.link("set", index=idx, state="up")
                if h.role == "balancer":
                    # Keyed by namespace too: several balancer nodes each have an eth0.
                    lb_peers[f"{h.netns}/{i.name}" if h is not self.lb else i.name] = (
                        self.switch_netns, port)
        return lb_peers

    def _configure_addresses(self) -> None:
        """Addresses and default routes; IPv6 ones beside IPv4 where the lab has them (a host's
        addr6/gateway6 are None otherwise). DAD is off (see _sysctls_before_links)."""
        for h in self.hosts.values():
            with IPRoute(netns=h.netns, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for i in h.ifaces:
                    idx = ipr.link_lookup(ifname=i.name)[0]
                    ipr.addr("add", index=idx, address=i.addr, prefixlen=i.prefixlen)
                    if i.addr6 is not None:
                        ipr.addr("add", index=idx, address=i.addr6, prefixlen=i.prefixlen6,
                                 family=socket.AF_INET6)
                    ipr.link("set", index=idx, state="up")
                if h.gateway:
                    ipr.route("add", dst="0.0.0.0/0", gateway=h.gateway)
                if h.gateway6:
                    ipr.route("add", dst="::/0", gateway=h.gateway6, family=socket.AF_INET6)

    def _tune_offloads(self, lb_peers: dict[str, tuple[str, str]]) -> None:
        for ifname in self.lb_ifaces:
            self._must(self.lb, ["sysctl", "-q", "-w", f"net.ipv4.conf.{ifname}.rp_filter=0"])
        for peer_ns, peer_if in lb_peers.values():
            # XDP_REDIRECT into a veth delivers only if the peer has XDP or GRO on;
            # otherwise frames vanish silently.
            self._must(peer_ns, ["ethtool", "-K", peer_if, "gro", "on"])
        for h in [self.client, *self.backends]:
            for i in h.ifaces:
                # Local sockets over veth leave checksums partial; once an XDP build
                # redirects such a frame the receiver drops it as corrupt (the tc build
                # keeps them valid). Full checksums let every mode run in the lab.
                self._must(h, ["ethtool", "-K", i.name, "tx", "off"])

    def _start_servers(self) -> None:
        env_path = os.environ.get("PYTHONPATH")
        pythonpath = f"{_SOURCE_ROOT}{os.pathsep}{env_path}" if env_path else str(_SOURCE_ROOT)
        commands = []
        for b in self.backends:
            argv = [
                "ip",
                "netns",
                "exec",
                b.netns,
                "env",
                f"PYTHONPATH={pythonpath}",
                sys.executable,
                "-m",
                "lbctl.labserver",
                "--name",
                b.name,
                "--http-port",
                str(self.http_port),
                "--udp-port",
                str(self.udp_port),
            ]
            if self.vip6 is not None:
                argv += ["--bind", "0.0.0.0", "--bind", "::"]
            commands.append({"argv": argv, "log": str(self.run_dir / f"{b.name}.log")})
        # The launcher exits right after spawning, so the servers are nobody's children
        # here: no zombies when down() runs in this same process, none left to reap.
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _LAUNCH_SNIPPET, json.dumps(commands)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise LabError(f"cannot start lab servers: {proc.stderr.strip()[-500:]}")
        for b, pid in zip(self.backends, json.loads(proc.stdout)):
            (self.run_dir / f"{b.name}.pid").write_text(f"{pid}\n")

    def _wait_servers_ready(self) -> None:
        probes = {
            b.name: subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    b.netns,
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _PROBE_SNIPPET,
                    ",".join(a for a in (b.addr, b.addr6 if self.vip6 else None) if a),
                    str(self.http_port),
                    str(SERVER_READY_TIMEOUT_S),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for b in self.backends
        }
        failed = []
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S + 10
        pending = dict(probes)
        # The pids _start_servers just wrote. Only liveness is checked: the command line
        # check of _live_server_pid can read empty while a server is mid-exec.
        server_pids = {
            b.name: int((self.run_dir / f"{b.name}.pid").read_text()) for b in self.backends
        }
        try:
            while pending:
                for b in self.backends:
                    probe = pending.get(b.name)
                    if probe is None:
                        continue
                    if probe.poll() is not None:
                        del pending[b.name]
                        if probe.returncode != 0:
                            out = probe.communicate()[0]
                            failed.append(f"{b.name}: {out.strip()}; log: {self._log_tail(b.name)}")
                    elif not _alive(server_pids[b.name]):
                        # The server exited (a port taken, a bad argument): say why now
                        # instead of waiting out the probe.
                        del pending[b.name]
                        failed.append(f"{b.name}: server exited; log: {self._log_tail(b.name)}")
                    elif time.monotonic() >= deadline:
                        del pending[b.name]
                        failed.append(f"{b.name}: readiness probe hung")
                time.sleep(0.05)
        finally:
            for probe in probes.values():
                if probe.poll() is None:
                    probe.kill()
                if probe.stdout is not None and not probe.stdout.closed:
                    probe.communicate()   # reaped; a failed probe's output was read above
        if failed:
            raise LabError("lab servers did not start: " + " | ".join(failed))

    def _wait_links_up(self) -> None:
        """Wait until every lab interface reports operstate UP.

        Carrier is on as soon as both veth ends are up, but the kernel publishes operstate
        (and clears the routes' "linkdown" flag) from deferred link-watch work, up to a
        second later. Tools that read link state should never see a half-up lab.
        """
        deadline = time.monotonic() + LINKS_UP_TIMEOUT_S
        pending = list(self.namespaces)
        while True:
            not_up = []
            for ns in pending:
                with IPRoute(netns=ns, flags=0) as ipr:
                    not_up += [
                        f"{ns}/{link.get('IFLA_IFNAME')}"
                        for link in ipr.get_links()
                        if link.get("IFLA_IFNAME") != "lo" and link.get("IFLA_OPERSTATE") != "UP"
                    ]
            if not not_up:
                return
            if time.monotonic() >= deadline:
                raise LabError(f"lab links not up after {LINKS_UP_TIMEOUT_S:.0f} s: {not_up}")
            pending = sorted({name.split("/")[0] for name in not_up})
            time.sleep(0.05)

    def _check_paths(self) -> None:
        """Reach every backend from the client through the balancer, by plain forwarding.

        Besides proving the wiring, this leaves every neighbour entry on the path resolved,
        which bpf_fib_lookup needs before the balancer's first forwarded packet.
        """
        for b in self.backends:
            for addr in (b.addr, b.addr6 if self.vip6 else None):
                if addr is None:
                    continue
                bodies = self.http_get(addr, timeout_s=3.0, total_timeout_s=10.0)
                if bodies != [b.name]:
                    raise LabError(f"client reached {addr} but got {bodies!r}, not {b.name!r}")

    def _log_tail(self, backend: str) -> str:
        """The last line a server wrote (for a crash: the exception), for a one-line error."""
        try:
            lines = (self.run_dir / f"{backend}.log").read_text().strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return lines[-1].strip()[-300:] if lines else "(empty)"

    # ---------------------------------------------------------------- teardown

    def _down_locked(self) -> None:
        """Remove every part of the lab, each step tried even if an earlier one failed."""
        failures: list[str] = []
        try:
            self._stop_processes()
        except (LabError, OSError) as exc:
            failures.append(str(exc))
        for ns in self.namespaces:
            # Deleting a namespace deletes its links: veth pairs and the bridge go with it.
            try:
                netns.remove(ns)
            except FileNotFoundError:
                pass  # already gone
            except OSError as exc:
                failures.append(f"cannot remove netns {ns}: {exc}")
        for directory in (self.bpf_pin_dir, self.run_dir):
            try:
                shutil.rmtree(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failures.append(f"cannot remove {directory}: {exc}")
        if failures:
            raise LabError(f"lab '{self.prefix}' not fully removed: " + "; ".join(failures))

    def _stop_processes(self) -> None:
        """End the servers from the pid files and anything else living in the lab's netns."""
        pids: set[int] = set()
        for b in self.backends:
            pid = self._live_server_pid(b)
            if pid is not None:
                pids.add(pid)
        ns_ids = set()
        for ns in self.namespaces:
            try:
                st = os.stat(NETNS_DIR / ns)
            except FileNotFoundError:
                continue
            ns_ids.add((st.st_dev, st.st_ino))
        if ns_ids:
            pids |= {pid for pid, ns_id in _process_netns() if ns_id in ns_ids}
        pids.discard(os.getpid())
        if not pids:
            return
        _signal_all(pids, signal.SIGTERM)
        if _wait_gone(pids, PROCESS_EXIT_TIMEOUT_S):
            return
        _signal_all(pids, signal.SIGKILL)
        if not _wait_gone(pids, PROCESS_EXIT_TIMEOUT_S):
            left = sorted(p for p in pids if _alive(p))
            raise LabError(f"lab processes would not exit after SIGKILL: {left}")

    def _live_server_pid(self, backend: LabHost) -> int | None:
        try:
            pid = int((self.run_dir / f"{backend.name}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        # The cmdline check guards against a recycled pid belonging to someone else.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return None
        if b"lbctl.labserver" not in cmdline or backend.name.encode() not in cmdline:
            return None
        return pid if _alive(pid) else None

    def _addresses_in(self, ns: str) -> list[str]:
        try:
            with IPRoute(netns=ns, flags=0) as ipr:
                v4 = sorted(
                    f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                    for a in ipr.addr("dump", family=socket.AF_INET)
                    if a.get("IFA_ADDRESS") != "127.0.0.1"
                )
                # Global IPv6 only: link-local addresses say nothing about the lab's wiring.
                v6 = sorted(
                    f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                    for a in ipr.addr("dump", family=socket.AF_INET6)
                    if a.get("scope") == 0 and a.get("IFA_ADDRESS") != "::1"
                )
                return v4 + v6
        except FileNotFoundError:
            return []  # deleted between the existence check and here


# ---------------------------------------------------------------- helpers


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise LabNeedsRootError(f"{what} needs root (network namespaces, veth, sysctls); hint: sudo lbctl")


class _LockHandle:
    """Set `remove` to delete the lock file on release (the lab is gone)."""

    remove = False


@contextmanager
def _run_lock(prefix: str) -> Iterator[_LockHandle]:
    """Serialise up/down of one lab across processes; labs of other prefixes never wait."""
    path = str(RUN_ROOT / f"{prefix}.lock")
    fd = runlock.acquire(path)
    handle = _LockHandle()
    try:
        yield handle
    finally:
        if handle.remove:
            runlock.release(path, fd)
        else:
            os.close(fd)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, LabError) else f"{type(exc).__name__}: {text}"


def _veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    with IPRoute(netns=ns_a, flags=0) as ipr:
        ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})


def _process_netns() -> Iterator[tuple[int, tuple[int, int]]]:
    """Yield (pid, (dev, inode) of its network namespace) for every visible process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        yield int(entry), (st.st_dev, st.st_ino)


def _alive(pid: int) -> bool:
    """True if pid runs; a zombie counts as gone (it holds no sockets or namespace)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself hold ") ".
    return stat[stat.rindex(")") + 2] != "Z"


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already gone
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise


def _wait_gone(pids: set[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if not any(_alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# Snippets run by `python -I -S -c` inside a namespace: stdlib only, one JSON argument,
# JSON lines out.

_LAUNCH_SNIPPET = r"""
import json, subprocess, sys
pids = []
for c in json.loads(sys.argv[1]):
    with open(c["log"], "ab") as log:
        p = subprocess.Popen(c["argv"], stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    pids.append(p.pid)
print(json.dumps(pids))
"""

_PROBE_SNIPPET = r"""
import socket, sys, time
hosts, port, timeout_s = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout_s
for host in hosts:
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                print(f"nothing accepts on {host}:{port} after {timeout_s:.0f} s: {exc}")
                sys.exit(1)
            time.sleep(0.05)
"""

_HTTP_SNIPPET = r"""
import http.client, json, sys, time
spec = json.loads(sys.argv[1])
deadline = time.monotonic() + spec["total_timeout_s"]
lines = []
for t in spec["targets"]:
    target = f"{t['host']}:{t['port']}"
    headers = {"Connection": "close"} if t["new_connection"] else {}
    conn = None
    for _ in range(t["count"]):
        rec = {"target": target}
        left = deadline - time.monotonic()
        if left <= 0:
            rec["error"] = "not started: total timeout reached"
            lines.append(json.dumps(rec))
            continue
        try:
            if conn is None:
                conn = http.client.HTTPConnection(
                    t["host"], t["port"], timeout=min(spec["timeout_s"], left))
            conn.request("GET", t["path"], headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            rec.update(status=resp.status, body=body.decode("utf-8", "replace"),
                       backend=resp.getheader("X-Backend"),
                       client_addr=resp.getheader("X-Client-Addr"))
            if t["new_connection"] or resp.will_close:
                conn.close()
                conn = None
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            if conn is not None:
                conn.close()
                conn = None
        lines.append(json.dumps(rec))
    if conn is not None:
        conn.close()
sys.stdout.write("".join(line + "\n" for line in lines))
"""

_UDP_SNIPPET = r"""
import json, socket, sys
spec = json.loads(sys.argv[1])
payload = bytes.fromhex(spec["payload_hex"])
sock = None
lines = []
for _ in range(spec["count"]):
    rec = {}
    try:
        if sock is None or spec["new_socket"]:
            if sock is not None:
                sock.close()
            family = socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.settimeout(spec["timeout_s"])
            # connect() filters out datagrams from anyone but the target (and surfaces
            # ICMP port unreachable as an error instead of a timeout).
            sock.connect((spec["host"], spec["port"]))
        sock.send(payload)
        rec["reply_hex"] = sock.recv(65535).hex()
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        if sock is not None:
            sock.close()
            sock = None
    lines.append(json.dumps(rec))
sys.stdout.write("".join(line + "\n" for line in lines))
"""
