"""The multi-node lab (`lbctl lab up --nodes N`, N >= 2): the single-node lab's client and
backends, a router in the balancer's place running BIRD 2 with ECMP and an etcd holding the
desired state, and N balancer nodes on the backends' segment, each running
`lbctl agent --config etcd://...` with its own BIRD announcing the VIP."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import jinja2
import yaml  # type: ignore[import-untyped]
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from lbctl import etcdlocal, runlock
from lbctl.errors import LbctlError
from lbctl.etcd import EtcdUrl
from lbctl.etcdlocal import LocalEtcd
from lbctl.lab import (
    _LAUNCH_SNIPPET,
    _SOURCE_ROOT,
    TOPOLOGY_PATH,
    Lab,
    LabError,
    LabHost,
    LabIface,
    LabStatus,
    _alive,
)
from xdp.maps import pin_dir_for

MAX_NODES = 8
ROUTER_AS = 65000
NODE_AS = 65010
HOLD_TIME_S = 3
# Node k (1-based) sits at .20+k on the backends' segment; the backends are .11-.13.
NODE_HOST_BASE = 20
ROUTER_TEMPLATE = Path(__file__).with_name("lab_router_bird.conf.j2")
AGENT_READY_TIMEOUT_S = 60.0       # the first apply compiles the XDP program (bcc): slow
ROUTE_TIMEOUT_S = 20.0
NODES_FILE = "nodes"
# IPv6 on the segment (router and nodes only), so that IPv6 VIPs can be announced: the
# nodes' sessions must find their address when they come up (docs/scale-out.md).
SEGMENT6 = "fd77:2::"
# Where the agents read their document: etcd (the lab's own, in the router's namespace), or
# each node's file (SIGHUP to reload): the BGP tests change one node alone.
SOURCES = ("etcd", "file")
ETCD_PORT = 2379
ETCD_PREFIX = "/lbctl"
ETCD_PID_FILE = "etcd.pid"
AGENT_STOP_TIMEOUT_S = 30.0


def lab_for(prefix: str, nodes: int | None = None, forwarding: str | None = None) -> Lab:
    """The lab called `prefix`: with `nodes` None, as many nodes as the lab was built with
    (so `lab down` and `lab status` need no --nodes), 1 when none was built."""
    source = None
    if nodes is None:
        from lbctl.lab import RUN_ROOT

        try:
            fields = (RUN_ROOT / prefix / NODES_FILE).read_text().split()
            nodes = int(fields[0])
            forwarding = forwarding or (fields[1] if len(fields) > 1 else None)
            source = fields[2] if len(fields) > 2 else None
        except (OSError, ValueError, IndexError):
            nodes = 1
    if nodes == 1:
        return Lab(prefix)
    return ClusterLab(prefix, nodes, forwarding, source=source)


def forwarding_supported(mode: str) -> bool:
    """Whether this build's config accepts `forwarding: MODE` (DSR and full-NAT land apart)."""
    from lbctl.config import load_text
    from lbctl.errors import ConfigError

    try:
        load_text(f"vips: [{{vip: '10.0.0.1:80', forwarding: {mode}}}]")
    except ConfigError:
        return False
    return True


def default_forwarding() -> str:
    """Several nodes need a mode whose replies do not have to come back through the node that
    forwarded the request: DSR (backends answer the client directly), else full-NAT."""
    for mode in ("dsr", "fullnat"):
        if forwarding_supported(mode):
            return mode
    return "nat"


@dataclass
class ClusterLabStatus(LabStatus):
    """The single lab's view plus what only the cluster lab runs: etcd and one agent per node."""

    etcd: str | None = None                  # the URL the nodes dial; None: file mode
    etcd_pid: int | None = None              # its live process
    etcd_here: str | None = None             # how an operator on this host reaches it
    agents: dict[str, int | None] = field(default_factory=dict)   # node -> live agent pid

    @property
    def up(self) -> bool:
        return (super().up and all(p is not None for p in self.agents.values())
                and (self.etcd is None or self.etcd_pid is not None))

    @property
    def down(self) -> bool:
        return super().down and self.etcd_pid is None and all(p is None for p in self.agents.values())


class ClusterLab(Lab):
    """Namespaces: <prefix>-client, <prefix>-router, <prefix>-lb1..N, <prefix>-sw and the
    backends. The client's gateway is the router; every node and backend is on the switch;
    the backends' gateway is the router, so DSR replies go to the client without a node.
    With source "etcd" (the default) the router's namespace also runs an etcd on the segment
    holding the one document every node's agent follows."""

    def __init__(self, prefix: str, nodes: int, forwarding: str | None = None,
                 topology_path: Path | str = TOPOLOGY_PATH, source: str | None = None) -> None:
        if not 2 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes {nodes} is out of range; hint: 1 (the single balancer) or "
                           f"2-{MAX_NODES}")
        self.source = source or "etcd"
        if self.source not in SOURCES:
            raise LabError(f"unknown agent source '{self.source}'; hint: one of {', '.join(SOURCES)}")
        # IPv6 here is the segment's own (_segment_ipv6), for the nodes' BGP next hops.
        super().__init__(prefix, topology_path, ipv6=False)
        self.forwarding = forwarding or default_forwarding()
        if not forwarding_supported(self.forwarding):
            raise LabError(f"forwarding '{self.forwarding}' is not supported by this build; hint: "
                           "leave --forwarding out to take the best one it has")
        old = self.lb
        backend_side = next(i for i in old.ifaces if i.name == self.lb_ifaces[1])
        self.router = replace(old, name="router", role="router", netns=f"{prefix}-router")
        net = ipaddress.IPv4Network(f"{backend_side.addr}/{backend_side.prefixlen}", strict=False)
        self.nodes: list[LabHost] = []
        for k in range(1, nodes + 1):
            addr = str(net.network_address + NODE_HOST_BASE + k)
            iface = LabIface(name="eth0", addr=addr, prefixlen=backend_side.prefixlen,
                             network=backend_side.network)
            self.nodes.append(LabHost(name=f"lb{k}", role="balancer", netns=f"{prefix}-lb{k}",
                                      ifname="eth0", addr=addr, gateway=backend_side.addr,
                                      ifaces=(iface,)))
        hosts = {name: h for name, h in self.hosts.items() if h is not old}
        hosts = {"router": self.router, **hosts}
        for n in self.nodes:
            hosts[n.name] = n
        self.hosts = hosts
        self.lb = self.nodes[0]
        self.lb_ifaces = ["eth0"]
        self.bpf_pin_dir = Path(pin_dir_for(self.lb.netns))
        self.router_addr = backend_side.addr

    @property
    def namespaces(self) -> list[str]:
        names = [self.client.netns, self.router.netns, *(n.netns for n in self.nodes)]
        if self._topo.bridges:
            names.append(self.switch_netns)
        return names + [b.netns for b in self.backends]

    # ---------------------------------------------------------------- building
    def _build(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # First, so that `lab down` without --nodes finds every namespace of a half-built lab.
        (self.run_dir / NODES_FILE).write_text(f"{len(self.nodes)} {self.forwarding} {self.source}\n")
        from pyroute2 import netns

        for ns in self.namespaces:
            netns.create(ns)
        self._sysctls_before_links()
        lb_peers = self._wire()
        self._no_flooding_to_nodes()
        self._configure_addresses()
        self._segment_ipv6()
        self._tune_offloads(lb_peers)
        if self.forwarding == "dsr":
            self._dsr_backends()
        self._start_servers()
        self._wait_servers_ready()
        self._wait_links_up()
        self._check_paths()
        self._start_router()
        if self.source == "etcd":
            self._start_etcd()
            self.push(self.node_config(self.nodes[0]))
        self._start_agents()
        self.wait_route(len(self.nodes))
        (self.run_dir / "ready").write_text(
            json.dumps({"prefix": self.prefix, "namespaces": self.namespaces, "nodes": len(self.nodes),
                        "forwarding": self.forwarding, "source": self.source,
                        "etcd": str(self.etcd_url) if self.source == "etcd" else None}) + "\n")

    def _sysctls_before_links(self) -> None:
        for ns in self.namespaces:
            self._must(ns, ["sysctl", "-q", "-e", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"])
        # The router hashes the 5-tuple over the next hops: the default (addresses only) sends
        # every connection of one client to the same node.
        self._must(self.router, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                                 "net.ipv4.fib_multipath_hash_policy=1",
                                 "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
        for n in self.nodes:
            self._must(n, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                           "net.ipv4.conf.default.rp_filter=0"])

    @property
    def router_addr6(self) -> str:
        return f"{SEGMENT6}1"

    def node_addr6(self, node: LabHost) -> str:
        """Node k's IPv6 address on the segment: fd77:2::(20+k), like its IPv4 one."""
        return f"{SEGMENT6}{NODE_HOST_BASE + self.nodes.index(node) + 1}"

    def _segment_ipv6(self) -> None:
        router_if = next(i.name for i in self.router.ifaces if i.addr == self.router_addr)
        for host, ifname, addr in [(self.router, router_if, self.router_addr6),
                                   *((n, "eth0", self.node_addr6(n)) for n in self.nodes)]:
            # keep_addr_on_down: Linux drops IPv6 addresses when a link goes down; a node whose
            # link comes back must find its address (the /128s' next hop) again.
            self._must(host, ["sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.disable_ipv6=0",
                              f"net.ipv6.conf.{ifname}.keep_addr_on_down=1"])
            self._must(host, ["ip", "-6", "addr", "add", f"{addr}/64", "dev", ifname, "nodad"])
        # As for IPv4: the router hashes the 5-tuple over the nodes announcing a /128.
        self._must(self.router, ["sysctl", "-q", "-w", "net.ipv6.fib_multipath_hash_policy=1"])

    def _tune_offloads(self, lb_peers: dict[str, tuple[str, str]]) -> None:
        for n in self.nodes:
            self._must(n, ["sysctl", "-q", "-w", "net.ipv4.conf.eth0.rp_filter=0"])
        for peer_ns, peer_if in lb_peers.values():
            # XDP_TX/REDIRECT into a veth delivers only if the peer has XDP or GRO on.
            self._must(peer_ns, ["ethtool", "-K", peer_if, "gro", "on"])
        for h in [self.client, self.router, *self.backends]:
            for i in h.ifaces:
                # Partial checksums of local sockets over veth are dropped after an XDP rewrite.
                self._must(h, ["ethtool", "-K", i.name, "tx", "off"])

    def _no_flooding_to_nodes(self) -> None:
        """A node's switch port gets unknown unicast no more. When a node's link goes down the
        bridge forgets its MAC and floods the frames the router still sends there; another
        node's XDP program (generic mode sees frames for any MAC on a veth) would serve them,
        and a failover would look seamless that a real NIC, which drops frames for other MACs,
        would not make so."""
        for n in self.nodes:
            self._must("sw", ["bridge", "link", "set", "dev", f"p-{n.name}", "flood", "off"])

    def _dsr_backends(self) -> None:
        """DSR delivers the client's packet unchanged but for its MAC: each backend holds the
        VIP on lo (answering from it) and never answers ARP for it, or the segment's ARP for
        the VIP would find a backend instead of going through the router."""
        for b in self.backends:
            self._must(b, ["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=1",
                           "net.ipv4.conf.all.arp_announce=2"])
            self._must(b, ["ip", "addr", "add", f"{self.vip}/32", "dev", "lo"])

    def _render_router(self) -> str:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False,
                                 keep_trailing_newline=True)
        return env.from_string(ROUTER_TEMPLATE.read_text()).render(
            netns=self.router.netns, router_id=self.router_addr, local_as=ROUTER_AS,
            nodes=[{"name": f"node_{n.name}", "addr": n.addr, "asn": NODE_AS} for n in self.nodes])

    @property
    def router_socket(self) -> Path:
        return self.run_dir / "router-bird.ctl"

    def node_config(self, node: LabHost) -> dict[str, Any]:
        """The agent file of one node: the lab's HTTP VIP over every backend, checked, and the
        router as BGP peer."""
        return {
            "interfaces": ["eth0"],
            "vips": [{
                "vip": f"{self.vip}:{self.http_port}", "proto": "tcp", "forwarding": self.forwarding,
                "health": {"check": "http", "path": "/", "interval": "500ms", "timeout": "300ms",
                           "rise": 2, "fall": 2},
                "backends": [{"addr": f"{b.addr}:{self.http_port}"} for b in self.backends],
            }],
            "bgp": {"local_as": NODE_AS, "hold_time": HOLD_TIME_S,
                    "peers": [{"addr": self.router_addr, "as": ROUTER_AS}]},
        }

    def node_config_path(self, node: LabHost) -> Path:
        return self.run_dir / f"{node.name}.yaml"

    def _launch(self, commands: list[dict[str, Any]]) -> list[int]:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCH_SNIPPET, json.dumps(commands)],
                              check=False, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise LabError(f"cannot start lab processes: {proc.stderr.strip()[-500:]}")
        return list(json.loads(proc.stdout))

    def _start_router(self) -> None:
        conf = self.run_dir / "router-bird.conf"
        conf.write_text(self._render_router())
        argv = ["ip", "netns", "exec", self.router.netns, "bird", "-f", "-c", str(conf),
                "-s", str(self.router_socket), "-P", str(self.run_dir / "router-bird.pid")]
        (pid,) = self._launch([{"argv": argv, "log": str(self.run_dir / "router-bird.log")}])
        (self.run_dir / "router.pid").write_text(f"{pid}\n")

    def start_agent(self, node: LabHost) -> int:
        """Starts (or starts again) one node's agent, detached: on the lab's etcd as node
        `lbK`, or on the lab's own file for it; returns its pid."""
        if self.source == "etcd":
            source = ["--config", str(self.etcd_url), "--node-name", node.name]
        else:
            path = self.node_config_path(node)
            path.write_text(yaml.safe_dump(self.node_config(node), sort_keys=False))
            source = ["-f", str(path)]
        argv = ["env", f"PYTHONPATH={_SOURCE_ROOT}", sys.executable, "-m", "lbctl", "-n", node.netns,
                "agent", *source, "--metrics-addr", "127.0.0.1:9810"]
        (pid,) = self._launch([{"argv": argv, "log": str(self.run_dir / f"{node.name}-agent.log")}])
        (self.run_dir / f"{node.name}-agent.pid").write_text(f"{pid}\n")
        return pid

    def _start_agents(self) -> None:
        for n in self.nodes:
            self.start_agent(n)
        for n in self.nodes:
            self.wait_agent(n)

    def agent_pid(self, node: LabHost) -> int | None:
        try:
            pid = int((self.run_dir / f"{node.name}-agent.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def stop_agent(self, node: LabHost, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Signals the node's agent and waits until it is gone (SIGKILL: at once)."""
        pid = self.agent_pid(node)
        if pid is None:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while _alive(pid):
            if time.monotonic() > deadline:
                raise LabError(f"the agent of {node.name} (pid {pid}) did not exit after signal {sig}")
            time.sleep(0.05)

    def reload_agent(self, node: LabHost, config: dict[str, Any]) -> None:
        """Writes a new file for the node's agent and sends it SIGHUP (file mode: with etcd
        every node follows one document; push() changes it)."""
        if self.source != "file":
            raise LabError("reload_agent is for a lab built with source='file'; hint: push() a new document")
        self.node_config_path(node).write_text(yaml.safe_dump(config, sort_keys=False))
        pid = self.agent_pid(node)
        if pid is None:
            raise LabError(f"the agent of {node.name} is not running")
        os.kill(pid, signal.SIGHUP)

    def wait_agent(self, node: LabHost, timeout_s: float = AGENT_READY_TIMEOUT_S) -> None:
        """Until the node's agent has applied its file and its BGP session is established."""
        from lbctl import bgp
        from lbctl.agent import read_published

        deadline = time.monotonic() + timeout_s
        while True:
            data = read_published(node.netns)
            view = (data or {}).get("bgp")
            if view:
                try:
                    if any(s.established for s in bgp.sessions(view["socket"])):
                        return
                except bgp.BgpError:
                    pass
            pid = self.agent_pid(node)
            if pid is None or time.monotonic() > deadline:
                why = "exited" if pid is None else f"not ready after {timeout_s:.0f} s"
                raise LabError(f"the agent of {node.name} {why}; log: {self._agent_log_tail(node)}")
            time.sleep(0.2)

    def _agent_log_tail(self, node: LabHost) -> str:
        try:
            lines = (self.run_dir / f"{node.name}-agent.log").read_text().strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])[-600:]

    # ---------------------------------------------------------------- etcd
    @property
    def etcd_url(self) -> EtcdUrl:
        """Where the nodes dial the lab's etcd: the router's address on their segment."""
        return EtcdUrl(self.router_addr, ETCD_PORT, ETCD_PREFIX)

    @property
    def etcd_url_here(self) -> EtcdUrl:
        """The same etcd from inside the router's namespace (`lbctl -n <router> cluster ...`):
        the host itself has no route into the lab."""
        return EtcdUrl("127.0.0.1", ETCD_PORT, ETCD_PREFIX)

    def _start_etcd(self) -> None:
        # Not tied to this process: it outlives `lab up`; `lab down` stops it by its pid.
        etcd = LocalEtcd(netns=self.router.netns, addr="0.0.0.0", client_port=ETCD_PORT,
                         prefix=ETCD_PREFIX, base_dir=self.run_dir / "etcd", tie_to_parent=False)
        try:
            etcd.start()
        except LbctlError as exc:
            raise LabError(f"the lab's etcd did not start: {exc}") from None
        assert etcd.pid is not None
        (self.run_dir / ETCD_PID_FILE).write_text(f"{etcd.pid}\n")

    def etcd_pid(self) -> int | None:
        try:
            pid = int((self.run_dir / ETCD_PID_FILE).read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        # A recycled pid is someone else's: the lab's etcd runs on the lab's data directory.
        if not any(str(self.run_dir / "etcd").encode() in arg for arg in cmdline):
            return None
        return pid if _alive(pid) else None

    def cluster_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`lbctl -n <router> ARGS`: an operator's shell beside the lab's etcd."""
        return subprocess.run(["env", f"PYTHONPATH={_SOURCE_ROOT}", sys.executable, "-m", "lbctl", "-n",
                               self.router.netns, *args], capture_output=True, text=True, check=False,
                              timeout=120)

    def push_text(self, text: str) -> subprocess.CompletedProcess[str]:
        """`lbctl cluster push` of `text` to the lab's etcd, the operator's command itself."""
        path = self.run_dir / "cluster.yaml"
        path.write_text(text)
        return self.cluster_cli("cluster", "push", "-f", str(path), "--etcd", str(self.etcd_url_here))

    def push(self, config: dict[str, Any]) -> int:
        """Pushes a document every node follows; returns the revision that holds it."""
        proc = self.push_text(yaml.safe_dump(config, sort_keys=False))
        if proc.returncode != 0:
            raise LabError(f"cannot push the lab's document: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return self.cluster_status()["latest_revision"]

    def cluster_status(self) -> dict[str, Any]:
        """`lbctl cluster status --json` against the lab's etcd."""
        proc = self.cluster_cli("cluster", "status", "--etcd", str(self.etcd_url_here), "--json")
        if proc.returncode != 0:
            raise LabError(f"lbctl cluster status: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return dict(json.loads(proc.stdout))

    def wait_revision(self, revision: int, timeout_s: float = AGENT_READY_TIMEOUT_S) -> dict[str, Any]:
        """Until `cluster status` shows every node on `revision`; returns that status."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.cluster_status()
            applied = {n["name"]: n.get("applied_revision") for n in st["nodes"]}
            if sorted(applied) == sorted(n.name for n in self.nodes) and set(applied.values()) == {revision}:
                return st
            if time.monotonic() > deadline:
                raise LabError(f"the nodes did not apply revision {revision} in {timeout_s:.0f} s: "
                               f"applied {applied}")
            time.sleep(0.3)

    def status(self) -> ClusterLabStatus:
        base = super().status()
        etcd = self.source == "etcd"
        return ClusterLabStatus(**{f.name: getattr(base, f.name) for f in fields(LabStatus)},
                                etcd=str(self.etcd_url) if etcd else None,
                                etcd_pid=self.etcd_pid() if etcd else None,
                                etcd_here=(f"lbctl -n {self.router.netns} cluster status --etcd "
                                           f"{self.etcd_url_here}") if etcd else None,
                                agents={n.name: self.agent_pid(n) for n in self.nodes})

    # ---------------------------------------------------------------- the router's view
    def vip_next_hops(self) -> list[str]:
        """The router's kernel route to the VIP: its next hops (node addresses), sorted."""
        with IPRoute(netns=self.router.netns, flags=0) as ipr:
            routes = ipr.get_routes(family=2, table=254)
        hops: list[str] = []
        for r in routes:
            if r.get("dst_len") != 32 or r.get_attr("RTA_DST") != self.vip:
                continue
            gw = r.get_attr("RTA_GATEWAY")
            if gw:
                hops.append(gw)
            for nh in r.get_attr("RTA_MULTIPATH") or []:
                g = nh.get_attr("RTA_GATEWAY")
                if g:
                    hops.append(g)
        return sorted(set(hops), key=ipaddress.IPv4Address)

    def wait_route(self, count: int, timeout_s: float = ROUTE_TIMEOUT_S) -> float:
        """Waits until the router's VIP route has `count` next hops; returns the seconds it
        took. Raises LabError with what the router holds when it does not."""
        start = time.monotonic()
        while True:
            hops = self.vip_next_hops()
            if len(hops) == count:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise LabError(f"the router's route to {self.vip} has next hops {hops or 'none'} after "
                               f"{timeout_s:.0f} s, not {count}; log: {self.run_dir}/*-agent.log")
            time.sleep(0.05)

    def explain_ports(self, node: LabHost, ports: list[int]) -> dict[int, dict[str, Any]]:
        """`lbctl explain CLIENT:PORT VIP:PORT` on one node for many of the client's ports at
        once (one process, the same Controller.explain the command calls): port -> answer."""
        spec = {"instance": node.netns, "client": self.client.addr, "vip": self.vip,
                "port": self.http_port, "ports": ports}
        out = self._must_keep_mounts(node, [sys.executable, "-c", _EXPLAIN_SNIPPET, json.dumps(spec)])
        return {int(k): v for k, v in json.loads(out).items()}

    def _must_keep_mounts(self, node: LabHost, argv: list[str]) -> str:
        proc = self.run(node, ["env", f"PYTHONPATH={_SOURCE_ROOT}", *argv], keep_mounts=True, timeout=120)
        if proc.returncode != 0:
            raise LabError(f"in {node.netns}: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def flow_ports(self, node: LabHost) -> set[int]:
        """Client ports of the open flows (not closing: a reset connection's entry lives on
        for its closing timeout, and its port may be used again) the node tracks for the
        lab's client."""
        spec = {"instance": node.netns, "client": self.client.addr}
        return set(json.loads(self._must_keep_mounts(node, [sys.executable, "-c", _FLOWS_SNIPPET,
                                                            json.dumps(spec)])))

    def settled(self) -> bool:
        """Every node's agent sees every backend up and the nodes' rings agree (the same
        fingerprint): the state in which any node picks the same backend for a flow."""
        from lbctl.agent import read_published

        prints = set()
        for n in self.nodes:
            data = read_published(n.netns)
            if data is None or any(b["health"] != "up" for b in data.get("backends", [])):
                return False
            prints.add(json.dumps(self.ring_fingerprints(n), sort_keys=True))
        return len(prints) == 1

    def ring_fingerprints(self, node: LabHost) -> dict[str, str]:
        """The ring fingerprint per VIP read from the node's maps now (what `lbctl status` shows)."""
        return dict(json.loads(self._must_keep_mounts(node, [sys.executable, "-c", _RINGS_SNIPPET, node.netns])))

    def flush_flows(self) -> None:
        """Forgets every node's tracked flows (between measurements: a client port used again
        must not meet an entry of an earlier connection)."""
        for n in self.nodes:
            self._must_keep_mounts(n, [sys.executable, "-m", "lbctl", "-n", n.netns, "flows", "flush"])

    def node_of(self, addr: str) -> LabHost:
        return next(n for n in self.nodes if n.addr == addr)

    # ---------------------------------------------------------------- teardown
    def _stop_processes(self) -> None:
        """Agents first (each withdraws its routes, stops its BIRD and revokes its lease in
        etcd, which must still answer), then etcd; the base then ends whatever else lives in
        the lab's namespaces."""
        failures = []
        for n in self.nodes:
            try:
                self.stop_agent(n, timeout_s=AGENT_STOP_TIMEOUT_S)
            except LabError:
                try:
                    self.stop_agent(n, signal.SIGKILL, timeout_s=5.0)
                except LabError as exc:
                    failures.append(str(exc))
        pid = self.etcd_pid()
        if pid is not None:
            etcdlocal.stop_pid(pid)
        super()._stop_processes()
        if failures:
            raise LabError("; ".join(failures))

    def _down_locked(self) -> None:
        super()._down_locked()
        # The base removes the first node's pins; the others' and every agent's /run state too.
        for n in self.nodes:
            remove_node_state(n.netns)


def remove_node_state(netns: str) -> None:
    """Removes a lab node's pins and its agent's /run state under the node's controller lock,
    then the lock file by runlock.release: a lab command still changing the node finishes
    first, and one waiting for the lock moves to a new file. Unlinked without holding it, the
    file could vanish under its holder, and a waiter and a newcomer both hold `<netns>.lock`."""
    from lbctl.control import LOCK_DIR, lock_path

    with runlock.held(lock_path(netns)):
        for directory in (Path(pin_dir_for(netns)), Path(LOCK_DIR) / netns):
            shutil.rmtree(directory, ignore_errors=True)


class LongConnections:
    """`count` keep-alive HTTP connections from the lab's client to the VIP, each sending a
    request every `interval_s` for `duration_s` (one thread each, so a stalled connection
    delays only itself). `ports()` is known once all are open; `result()` waits for the end:
    per connection its client port, the backends that answered in order, requests answered,
    errors, the first error and the longest wait for an answer."""

    def __init__(self, lab: Lab, count: int, interval_s: float, duration_s: float,
                 timeout_s: float = 20.0, first_port: int | None = None) -> None:
        # first_port: client ports first_port.. instead of ephemeral ones, so that runs one
        # after the other never reuse a tuple a node may still track from a reset connection.
        spec = {"host": lab.vip, "port": lab.http_port, "count": count, "interval_s": interval_s,
                "duration_s": duration_s, "timeout_s": timeout_s, "first_port": first_port}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.client.netns, sys.executable, "-I", "-S", "-c", _LONG_CONNS_SNIPPET,
             json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._ports: list[int | None] | None = None
        self.duration_s = duration_s
        self.timeout_s = timeout_s

    def ports(self) -> list[int | None]:
        if self._ports is None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line:
                raise LabError(f"the connection holder died: {self.proc.stderr.read()[-500:] if self.proc.stderr else ''}")
            self._ports = json.loads(line)["ports"]
        return self._ports

    def result(self) -> list[dict[str, Any]]:
        self.ports()
        try:
            out, err = self.proc.communicate(timeout=self.duration_s + self.timeout_s + 30)
        except subprocess.TimeoutExpired:
            self.close()
            raise LabError("the connection holder did not finish") from None
        if self.proc.returncode != 0:
            raise LabError(f"the connection holder exited {self.proc.returncode}: {err.strip()[-500:]}")
        return list(json.loads(out)["conns"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# One thread per connection; stdlib only (runs with -I -S in the client's namespace).
_LONG_CONNS_SNIPPET = r"""
import json, re, socket, sys, threading, time
spec = json.loads(sys.argv[1])
LEN = re.compile(rb"content-length: *(\d+)", re.I)

def read_answer(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            raise OSError("connection closed by the peer")
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(LEN.search(head).group(1))
    while len(body) < length:
        d = s.recv(4096)
        if not d:
            raise OSError("connection closed by the peer")
        body += d
    return body[:length].decode().strip()

conns = []
for i in range(spec["count"]):
    rec = {"port": None, "backends": [], "ok": 0, "errors": 0, "first_error": None,
           "error_at_s": None, "max_wait_s": 0.0}
    try:
        src = ("", spec["first_port"] + i) if spec["first_port"] else None
        s = socket.create_connection((spec["host"], spec["port"]), timeout=spec["timeout_s"],
                                     source_address=src)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rec["port"] = s.getsockname()[1]
    except OSError as exc:
        s = None
        rec["errors"], rec["first_error"] = 1, f"connect: {exc}"
    conns.append((s, rec))
print(json.dumps({"ports": [r["port"] for _, r in conns]}), flush=True)
start = time.monotonic()

def hold(s, rec):
    tick = 0
    while time.monotonic() - start < spec["duration_s"]:
        sent = time.monotonic()
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
            name = read_answer(s)
        except (OSError, ValueError, AttributeError) as exc:
            rec["errors"] += 1
            rec["first_error"] = f"{type(exc).__name__}: {exc}"
            rec["error_at_s"] = round(time.monotonic() - start, 2)
            return
        rec["max_wait_s"] = max(rec["max_wait_s"], round(time.monotonic() - sent, 3))
        if not rec["backends"] or rec["backends"][-1] != name:
            rec["backends"].append(name)
        rec["ok"] += 1
        tick += 1
        time.sleep(max(0.0, start + tick * spec["interval_s"] - time.monotonic()))

threads = [threading.Thread(target=hold, args=c) for c in conns if c[0] is not None]
for t in threads:
    t.start()
for t in threads:
    t.join()
for s, _ in conns:
    if s is not None:
        s.close()
print(json.dumps({"conns": [r for _, r in conns]}))
"""

# Run inside a node's network namespace with the host's bpffs (nsenter --net).
_EXPLAIN_SNIPPET = r"""
import json, sys
from lbctl.control import Controller
from xdp.codec import Endpoint
spec = json.loads(sys.argv[1])
ctl = Controller(spec["instance"])
vip = Endpoint(spec["vip"], spec["port"], "tcp")
print(json.dumps({p: ctl.explain(Endpoint(spec["client"], p, "tcp"), vip) for p in spec["ports"]}))
"""

_RINGS_SNIPPET = r"""
import json, sys
from lbctl.control import Controller
print(json.dumps(Controller(sys.argv[1]).ring_fingerprints(), sort_keys=True))
"""

_FLOWS_SNIPPET = r"""
import json, sys
from lbctl.control import Controller
spec = json.loads(sys.argv[1])
rows = Controller(spec["instance"]).flows(None, False, None, None, spec["client"], None)
print(json.dumps(sorted({r["client_port"] for r in rows if r["state"] != "closing"})))
"""
