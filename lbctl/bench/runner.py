"""`lbctl bench peers`: lbctl's XDP balancer against nftables DNAT, HAProxy and no balancer at
all, measured in one run on one namespace lab of its own, with a JSON record, and on request
the markdown block and plots of a benchmarks page."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lbctl
from lbctl.bench.configs import haproxy_conf, nft_ruleset, nginx_conf
from lbctl.bench.errors import BenchError
from lbctl.bench.parsers import WRK_LUA, PpsVerdict, parse_iperf3, parse_tcp_counters, parse_wrk
from lbctl.bench.report import (
    add_path_extra,
    evaluate_goals,
    print_summary,
    ratio_table,
    summarize_setup,
    write_docs,
)
from lbctl.bench.spec import (
    BULK_PORT,
    DSR_CLIENT_SIDE,
    GENERATOR_BOUND_SHARE,
    HTTP_VIP_PORT,
    MAX_ERROR_SHARE,
    NGINX_PORT,
    PPS_FLOWS,
    PPS_PAYLOAD_BYTES,
    PPS_PORT,
    SETUP_TITLES,
    SINGLE_NGINX_PORT,
    SINGLE_VIP_PORT,
    WORKLOADS,
    WRK_CONNECTIONS,
    WRK_THREADS,
)
from lbctl.bench.tools import check_tools, resolve_setups, tool_versions
from lbctl.errors import LbctlError
from lbctl.lab import Lab, LabError
from xdp import libbpf

# Where `python -m lbctl` finds this same lbctl: the helpers and lbctl commands the bench
# starts in the lab's namespaces must run this code, installed or from a checkout.
IMPORT_ROOT = Path(lbctl.__file__).resolve().parent.parent
RUN_ROOT = Path("/run/lbctl/bench")
NETNS_DIR = Path("/run/netns")


# The client's source port ranges, disjoint (PeerBench._client_ports says why): runs straight
# to the backends, runs through the VIP to three backends, and to the VIP's one-backend port.
CLIENT_PORTS: dict[str, tuple[int, int]] = {
    "direct": (1024, 22999), "vip": (23000, 43999), "vip_one": (44000, 65000)}


@dataclass(frozen=True)
class Durations:
    http_s: int
    bulk_s: int
    pps_s: int

    @classmethod
    def for_run(cls, quick: bool) -> Durations:
        return cls(http_s=3, bulk_s=3, pps_s=3) if quick else cls(http_s=6, bulk_s=5, pps_s=5)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[str]


@dataclass
class _State:
    """What the run has started, so cleanup can undo exactly that."""

    procs: list[_Proc] = field(default_factory=list)
    xdp_attached: bool = False
    haproxy: _Proc | None = None
    vip_on_lo: bool = False
    nft_table: bool = False
    stats_fd: int | None = None
    dsr_plumbing: bool = False
    client_rp_filter: str | None = None   # the client's all.rp_filter before the DSR setup


# The lbctl setups: how each forwards, over which family.
XDP_FORWARDING = {"xdp-native": "nat", "xdp-generic": "nat", "xdp-tc": "nat", "xdp-fullnat": "fullnat",
                  "xdp-dsr": "dsr", "xdp-ipv6": "nat"}


def _prog_pin(setup: str) -> str:
    """The pin of the program a setup runs: the tc build for xdp-tc, else the XDP one."""
    from xdp.balancer import PROG_PIN, TC_PROG_PIN

    return TC_PROG_PIN if setup == "xdp-tc" else PROG_PIN


DSR_CLIENT_IF = "dsr0"          # the client's interface on the backends' segment (xdp-dsr)
DSR_SWITCH_PORT = "p-dsr"       # its peer, a port of the backends' bridge


class _Progress:
    def __init__(self, total_steps: int, console: Any) -> None:
        self.total = total_steps
        self.done = 0
        self.t0 = time.monotonic()
        self.console = console

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        self.console.print(
            f"[dim]{elapsed:6.0f}s[/] [bold][{self.done}/{self.total}][/] {text}",
            highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.console.print(f"[dim]{elapsed:6.0f}s[/]        {text}", highlight=False,
                           soft_wrap=True)


class PeerBench:
    """One benchmark run on its own lab (unique prefix); `close()` removes all it started."""

    def __init__(self, setups: list[str], repeats: int, quick: bool, console: Any,
                 prefix: str | None = None) -> None:
        self.setups = setups
        self.repeats = repeats
        self.quick = quick
        self.durations = Durations.for_run(quick)
        self.console = console
        self.lab = Lab(prefix or f"bn{os.urandom(3).hex()}")
        self.run_dir = RUN_ROOT / self.lab.prefix
        self.state = _State()
        self.gen: _Proc | None = None
        self.sink: _Proc | None = None
        self.vip = self.lab.vip
        self.backends = [b.addr for b in self.lab.backends]
        self.lb_client_if, self.lb_backend_if = self.lab.lb_ifaces
        self.sw_port = f"p-{self.lab.lb.name}"  # the switch's end of the balancer's link
        self.ipv6 = "xdp-ipv6" in setups   # IPv6 on in the lab only when measured
        # (host, interface) -> the comm of its threaded-NAPI kernel thread, "napi/eth0-8195":
        # the NAPI id makes it unique across namespaces whose interfaces share names.
        self.napi_threads: dict[tuple[str, str], str] = {}
        self.client_ports: str | None = None    # the client's source port range, as last set

    # ------------------------------------------------------------ plumbing

    def _ns(self, host: str) -> str:
        return self.lab.switch_netns if host == "sw" else self.lab.host(host).netns

    def _must(self, host: str, argv: list[str], timeout_s: float = 60.0) -> str:
        proc = self.lab.run(host, argv, timeout=timeout_s)
        if proc.returncode != 0:
            raise BenchError(f"in netns {self._ns(host)}: '{' '.join(argv)}' exited "
                             f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
        return proc.stdout

    def _lbctl(self, *args: str) -> str:
        argv = [sys.executable, "-m", "lbctl", "-n", self.lab.lb.netns, *args]
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=180,
                              env=self._env())
        if proc.returncode != 0:
            raise BenchError(f"'lbctl {' '.join(args)}' failed: "
                             f"{(proc.stderr or proc.stdout).strip()[-400:]}")
        return proc.stdout

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{IMPORT_ROOT}{os.pathsep}{path}" if path else str(IMPORT_ROOT)
        return env

    def _spawn(self, name: str, host: str, argv: list[str], *, pipe: bool = False,
               keep_mounts: bool = False) -> _Proc:
        ns = self._ns(host)
        prefix = (["nsenter", f"--net={NETNS_DIR / ns}", "--"] if keep_mounts
                  else ["ip", "netns", "exec", ns])
        log = open(self.run_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        popen = subprocess.Popen(
            [*prefix, *argv], env=self._env(), text=True,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else log, stderr=log, start_new_session=True,
        )
        log.close()
        proc = _Proc(name, popen)
        self.state.procs.append(proc)
        return proc

    def _stop(self, proc: _Proc | None, timeout_s: float = 5.0) -> None:
        if proc is None:
            return
        p = proc.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=timeout_s)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.state.procs:
            self.state.procs.remove(proc)

    def _helper(self, proc: _Proc, command: str | None, timeout_s: float) -> str:
        """Send one line to a helper (None: just read) and return its answer line."""
        p = proc.popen
        assert p.stdin is not None and p.stdout is not None
        if command is not None:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise BenchError(f"{proc.name} helper did not answer {command!r} in "
                                 f"{timeout_s:.0f} s; log: {self._log_tail(proc.name)}")
        line = p.stdout.readline()
        if not line:
            raise BenchError(f"{proc.name} helper exited (code {p.poll()}); "
                             f"log: {self._log_tail(proc.name)}")
        return line.strip()

    def _log_tail(self, name: str) -> str:
        try:
            return (self.run_dir / f"{name}.log").read_text()[-400:].strip() or "(empty)"
        except FileNotFoundError:
            return "(no log)"

    def _wait_port(self, host: str, addr: str, port: int, timeout_s: float = 10.0) -> None:
        code = (
            "import socket,sys,time\n"
            "d=time.monotonic()+float(sys.argv[3])\n"
            "while True:\n"
            "  try:\n"
            "    socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close();break\n"
            "  except OSError as e:\n"
            "    if time.monotonic()>d: print(e); sys.exit(1)\n"
            "    time.sleep(0.05)\n"
        )
        proc = self.lab.run(host, [sys.executable, "-I", "-S", "-c", code, addr, str(port),
                                   str(timeout_s)], timeout=timeout_s + 10)
        if proc.returncode != 0:
            raise BenchError(f"nothing answers on {addr}:{port} from {host}: "
                             f"{proc.stdout.strip()}")

    def _link_stats(self, host: str, ifname: str) -> dict[str, int]:
        from pyroute2 import IPRoute

        with IPRoute(netns=self._ns(host), flags=0) as ipr:
            s = ipr.link("get", ifname=ifname)[0].get("IFLA_STATS64")
            return {k: int(s[k]) for k in ("rx_packets", "tx_packets", "rx_dropped",
                                           "tx_dropped")}

    def _sysfs_write(self, host: str, path: str, value: str) -> None:
        # `ip netns exec` mounts the namespace's own /sys, where its interfaces are.
        self._must(host, ["sh", "-c", f"echo {value} > {path}"])

    # ------------------------------------------------------------ lab-wide set-up

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lab.up()
        client, lb = self.lab.client.name, self.lab.lb.name
        # Short connections use a source port each: wide range, and reuse TIME_WAIT ports (the
        # client's range is narrowed per run: _client_ports).
        for host in (client, lb):
            self._must(host, ["sysctl", "-q", "-w",
                              "net.ipv4.ip_local_port_range=1024 65000",
                              "net.ipv4.tcp_tw_reuse=1"])
        self.client_ports = None
        self._thread_napi()
        if self.ipv6 and self.lab.vip6 is None:
            raise BenchError("the xdp-ipv6 setup needs the lab's IPv6 addresses (vip6 and address6 in "
                             "lbctl/lab_topology.yaml)")
        (self.run_dir / "wrk.lua").write_text(WRK_LUA)
        for b in self.lab.backends:
            conf = self.run_dir / f"nginx-{b.name}.conf"
            conf.write_text(nginx_conf(b.name, self.run_dir, ipv6=self.ipv6))
            self._spawn(f"nginx-{b.name}", b.name,
                        ["nginx", "-c", str(conf), "-p", str(self.run_dir),
                         "-e", str(self.run_dir / f"nginx-{b.name}.err")])
        first = self.lab.backends[0]
        self._spawn("iperf3", first.name, ["iperf3", "-s", "-p", str(BULK_PORT)])
        for b in self.lab.backends:
            self._wait_port(client, b.addr, NGINX_PORT)
        self._wait_port(client, first.addr, BULK_PORT)
        lb_mac = self._link_mac(lb, self.lb_client_if)
        self.gen = self._spawn("gen", client, [sys.executable, "-m", "lbctl.bench.helpers",
                                               "gen", self.lab.client.ifname, lb_mac,
                                               self.lab.client.addr],
                               pipe=True, keep_mounts=True)
        self.sink = self._spawn("sink", "sw", [sys.executable, "-m", "lbctl.bench.helpers",
                                               "sink", self.sw_port],
                                pipe=True, keep_mounts=True)
        for helper in (self.gen, self.sink):
            answer = self._helper(helper, None, 120)
            if answer != "ready":
                raise BenchError(f"{helper.name} helper said {answer!r}")

    def vip_addr(self, setup: str) -> str:
        return str(self.lab.vip6) if setup == "xdp-ipv6" else self.vip

    def vip_ports(self, setup: str) -> tuple[int, int]:
        """The VIP's ports for many backends and for one: DSR keeps the backend's port."""
        if setup == "xdp-dsr":
            return NGINX_PORT, SINGLE_NGINX_PORT
        return HTTP_VIP_PORT, SINGLE_VIP_PORT

    def _veths(self, host: str) -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute(netns=self._ns(host), flags=0) as ipr:
            return sorted(str(link.get("IFLA_IFNAME")) for link in ipr.get_links()
                          if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth")

    def _thread_napi(self) -> None:
        """GRO and threaded NAPI on every veth end: client, balancer, switch and backends.

        Each end's receive work then runs in its own kernel thread, `napi/IF-N`, instead of
        in the softirq of whoever sent to it, so the balancer's two threads hold only the
        balancer's work (its forwarding, NAT, XDP program, or HAProxy's receive path) and
        their CPU time is the balancer's cost. GRO gives a veth the NAPI context that
        threaded NAPI moves into a thread (and XDP_REDIRECT into a veth needs). Each
        thread's name is found as the one that appears when its interface turns threaded.
        """
        hosts = ["sw", self.lab.client.name, self.lab.lb.name,
                 *(b.name for b in self.lab.backends)]
        for host in hosts:
            for ifname in self._veths(host):
                self._must(host, ["ethtool", "-K", ifname, "gro", "on"])
                path = f"/sys/class/net/{ifname}/threaded"
                for _attempt in range(3):
                    before = _napi_threads(ifname)
                    self._sysfs_write(host, path, "1")
                    new = {pid: comm for pid, comm in _napi_threads(ifname).items()
                           if pid not in before}
                    if len(new) == 1:
                        self.napi_threads[(host, ifname)] = next(iter(new.values()))
                        break
                    # Another lab's interface of the same name turned threaded meanwhile.
                    self._sysfs_write(host, path, "0")
                else:
                    raise BenchError(f"cannot tell the NAPI thread of {ifname} in "
                                     f"{self._ns(host)} from other namespaces'; hint: run "
                                     "the bench again when other labs are idle")

    def balancer_cpu_s(self, setup: str) -> float | None:
        """CPU seconds the balancer has used so far: its NAPI threads, plus HAProxy's
        process (its sockets' work runs in its own system calls). None if one is gone."""
        names = {comm for (host, _if), comm in self.napi_threads.items()
                 if host == self.lab.lb.name}
        pids = {pid for pid, comm in _napi_threads("").items() if comm in names}
        if len(pids) != len(names) or not names:
            return None
        if setup == "haproxy" and self.state.haproxy is not None:
            pids.add(self.state.haproxy.popen.pid)
        total = 0.0
        for pid in pids:
            cpu = _thread_cpu_s(pid)
            if cpu is None:
                return None
            total += cpu
        return total

    def path_cpu_s(self) -> dict[str, float] | None:
        """CPU seconds used so far by everything on the lab's path, by where it ran: the
        balancer's NAPI threads and processes (HAProxy), the switch's, the endpoints' NAPI
        threads (client and backends: their TCP receive, and for native XDP the frames a
        redirect hands them), and the endpoints' processes (nginx, the lab's servers). A
        redirect on veth runs the next end's receive work in that end's thread, so no thread
        holds the whole of a balancer's cost: the sum over the path does. Tick-sampled per
        task (softirq work done in a task's context is charged to it; this kernel has no
        IRQ_TIME_ACCOUNTING). None when a NAPI thread is gone."""
        lb, client = self.lab.lb.name, self.lab.client.name
        group_of_host = {lb: "balancer", "sw": "switch", client: "endpoint_napi",
                         **{b.name: "endpoint_napi" for b in self.lab.backends}}
        out = dict.fromkeys(PATH_CPU_GROUPS, 0.0)
        host_of_comm = {comm: host for (host, _if), comm in self.napi_threads.items()}
        seen = 0
        for pid, comm in _napi_threads("").items():
            host = host_of_comm.get(comm)
            cpu = _thread_cpu_s(pid) if host is not None else None
            if host is None or cpu is None:
                continue
            out[group_of_host[host]] += cpu
            seen += 1
        if seen != len(host_of_comm):
            return None
        process_group = {_netns_inode(self._ns(lb)): "balancer",
                         _netns_inode(self._ns("sw")): "switch",
                         _netns_inode(self._ns(client)): "endpoint_processes",
                         **{_netns_inode(self._ns(b.name)): "endpoint_processes"
                            for b in self.lab.backends}}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                inode = os.stat(f"/proc/{entry}/ns/net").st_ino
            except OSError:
                continue
            group = process_group.get(inode)
            cpu = _thread_cpu_s(int(entry)) if group else None
            if group and cpu is not None:
                out[group] += cpu
        return out

    def _link_mac(self, host: str, ifname: str) -> str:
        from pyroute2 import IPRoute

        with IPRoute(netns=self._ns(host), flags=0) as ipr:
            return str(ipr.link("get", ifname=ifname)[0].get("IFLA_ADDRESS"))

    # ------------------------------------------------------------ setups

    def setup(self, name: str) -> None:
        if name in XDP_FORWARDING:
            self._setup_xdp(name)
        elif name == "nftables":
            # TIME_WAIT entries would otherwise fill the conntrack table over the short runs.
            self._must("lb", ["sysctl", "-q", "-w",
                              "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10"])
            self.state.nft_table = True
            self._must("lb", ["nft", "-f", str(self._write_nft())])
        elif name == "haproxy":
            self._must("lb", ["ip", "addr", "add", f"{self.vip}/32", "dev", "lo"])
            self.state.vip_on_lo = True
            conf = self.run_dir / "haproxy.cfg"
            conf.write_text(haproxy_conf(self.vip, self.backends))
            self.state.haproxy = self._spawn("haproxy", "lb", ["haproxy", "-db", "-f", str(conf)])
            self._wait_port("client", self.vip, HTTP_VIP_PORT)
            self._wait_port("client", self.vip, SINGLE_VIP_PORT)
            self._wait_port("client", self.vip, BULK_PORT)
        elif name != "direct":
            raise BenchError(f"unknown setup {name!r}")
        if name != "direct":
            # The balancer's first packets resolve its neighbours; do it outside the timing.
            http_port, single_port = self.vip_ports(name)
            self.lab.http_get(self.vip_addr(name), http_port, count=3)
            self.lab.http_get(self.vip_addr(name), single_port, count=1)

    def _setup_xdp(self, name: str) -> None:
        """lbctl attached in the setup's XDP mode, its VIPs in the setup's forwarding mode and
        family: many backends, one backend, bulk (one backend: iperf3's two connections must
        meet one server) and the packet-rate VIP (UDP)."""
        forwarding = XDP_FORWARDING[name]
        mode = {"xdp-generic": "generic", "xdp-tc": "tc"}.get(name, "native")
        if forwarding == "dsr":
            self._dsr_plumbing_up()
        self._lbctl("attach", self.lb_client_if, self.lb_backend_if, "--mode", mode)
        self.state.xdp_attached = True
        v6 = name == "xdp-ipv6"
        backends = [str(b.addr6) for b in self.lab.backends] if v6 else self.backends

        def endpoint(addr: str, port: int) -> str:
            return f"[{addr}]:{port}" if v6 else f"{addr}:{port}"

        vip = self.vip_addr(name)
        http_port, single_port = self.vip_ports(name)
        single_backend_port = SINGLE_NGINX_PORT if forwarding == "dsr" else NGINX_PORT
        tcp_vips = [(endpoint(vip, http_port), [endpoint(a, NGINX_PORT) for a in backends]),
                    (endpoint(vip, single_port), [endpoint(backends[0], single_backend_port)]),
                    (endpoint(vip, BULK_PORT), [endpoint(backends[0], BULK_PORT)])]
        for vip_ep, backend_eps in tcp_vips:
            self._lbctl("vip", "add", vip_ep, "--forwarding", forwarding)
            self._lbctl("backend", "add", vip_ep, *backend_eps)
        pps_vip = endpoint(vip, PPS_PORT)
        self._lbctl("vip", "add", pps_vip, "--proto", "udp", "--forwarding", forwarding)
        self._lbctl("backend", "add", pps_vip, *(endpoint(a, PPS_PORT) for a in backends),
                    "--proto", "udp")

    def _dsr_plumbing_up(self) -> None:
        """What L2 DSR needs of the lab (docs/modes.md, tests/netns/dsr_topology.yaml): the
        backends hold the VIP on lo with ARP suppressed and send their replies straight to
        the client, through a second client interface on their segment; the client still
        reaches the VIP through the balancer."""
        client = self.lab.client.name
        self.state.dsr_plumbing = True
        self.state.client_rp_filter = self._must(
            client, ["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]).strip()
        master = json.loads(self._must("sw", ["ip", "-j", "link", "show", "dev", self.sw_port]))
        bridge = master[0]["master"]
        self._must(client, ["ip", "link", "add", DSR_CLIENT_IF, "type", "veth", "peer", "name",
                            DSR_SWITCH_PORT, "netns", self._ns("sw")])
        self._must("sw", ["ip", "link", "set", DSR_SWITCH_PORT, "master", bridge, "up"])
        self._must(client, ["ip", "addr", "add", f"{DSR_CLIENT_SIDE}/24", "dev", DSR_CLIENT_IF])
        self._must(client, ["ip", "link", "set", DSR_CLIENT_IF, "up"])
        self._must(client, ["ethtool", "-K", DSR_CLIENT_IF, "tx", "off"])
        # Replies from the VIP arrive on the second interface, not the route to the VIP.
        self._must(client, ["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0",
                            f"net.ipv4.conf.{DSR_CLIENT_IF}.rp_filter=0"])
        for b in self.lab.backends:
            self._must(b.name, ["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=1",
                                "net.ipv4.conf.all.arp_announce=2"])
            self._must(b.name, ["ip", "addr", "add", f"{self.vip}/32", "dev", "lo"])
            # The second client interface is made anew each round, with a new MAC: a backend
            # that still holds the last round's (stale, not yet probed) sent its first
            # answers there, and the setup's first requests timed out (round 2, every run).
            self._must(b.name, ["ip", "neigh", "flush", "to", DSR_CLIENT_SIDE])
            self._must(b.name, ["ip", "route", "replace", "default", "via", DSR_CLIENT_SIDE])

    def _dsr_plumbing_down(self) -> None:
        client = self.lab.client.name
        for b in self.lab.backends:
            self.lab.run(b.name, ["ip", "route", "replace", "default", "via", str(b.gateway)])
            self.lab.run(b.name, ["ip", "addr", "del", f"{self.vip}/32", "dev", "lo"])
            self.lab.run(b.name, ["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=0",
                                  "net.ipv4.conf.all.arp_announce=0"])
        self.lab.run(client, ["ip", "link", "del", DSR_CLIENT_IF])
        if self.state.client_rp_filter is not None:
            self.lab.run(client, ["sysctl", "-q", "-w",
                                  f"net.ipv4.conf.all.rp_filter={self.state.client_rp_filter}"])
        self.state.dsr_plumbing = False

    def teardown(self, name: str) -> None:
        if self.state.xdp_attached:
            self._lbctl("detach", "--all", "--purge", "--force")
            self.state.xdp_attached = False
        if self.state.dsr_plumbing:
            self._dsr_plumbing_down()
        if self.state.nft_table:
            self.lab.run("lb", ["nft", "delete", "table", "ip", "lbbench"])
            self.state.nft_table = False
        if self.state.haproxy is not None:
            self._stop(self.state.haproxy)
            self.state.haproxy = None
        if self.state.vip_on_lo:
            self.lab.run("lb", ["ip", "addr", "del", f"{self.vip}/32", "dev", "lo"])
            self.state.vip_on_lo = False

    def _write_nft(self) -> Path:
        path = self.run_dir / "lbbench.nft"
        path.write_text(nft_ruleset(self.vip, self.backends))
        return path

    # ------------------------------------------------------------ workloads

    def run_wrk(self, setup: str, close: bool, single: bool = False) -> dict[str, Any]:
        """One wrk run against the setup: Connection: close or keep-alive, three backends
        or (single) the first one alone. Records the balancer's CPU time over the run."""
        env = dict(os.environ)
        env.pop("BENCH_WRK_ADDRS", None)
        vip = self.vip_addr(setup)
        vip_host = f"[{vip}]" if ":" in vip else vip
        http_port, single_port = self.vip_ports(setup)
        if single:
            url = (f"http://{self.backends[0]}:{NGINX_PORT}/" if setup == "direct"
                   else f"http://{vip_host}:{single_port}/")
        elif setup == "direct":
            url = f"http://{self.backends[0]}:{NGINX_PORT}/"
            env["BENCH_WRK_ADDRS"] = ",".join(f"{a}:{NGINX_PORT}" for a in self.backends)
        else:
            url = f"http://{vip_host}:{http_port}/"
        argv = ["ip", "netns", "exec", self.lab.client.netns, "wrk", f"-t{WRK_THREADS}",
                f"-c{WRK_CONNECTIONS}", f"-d{self.durations.http_s}s", "--latency",
                "-s", str(self.run_dir / "wrk.lua")]
        if close:
            argv += ["-H", "Connection: close"]
        self._client_ports(setup, single)
        # Short connections: the whole path's CPU, and the XDP program's own run time.
        path = close and not single
        prog = self._prog_stats(setup) if path and setup.startswith("xdp-") else None
        path0, children0 = (self.path_cpu_s(), os.times()) if path else (None, None)
        cpu0 = self.balancer_cpu_s(setup)
        tcp0 = self.client_tcp_counters()
        try:
            run0 = libbpf.prog_info(prog[1]) if prog else None
            proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True, env=env)
            try:
                out, _ = proc.communicate(timeout=self.durations.http_s + 60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            run1 = libbpf.prog_info(prog[1]) if prog else None
        finally:
            if prog:
                os.close(prog[0])
                libbpf.close(prog[1])
                self.state.stats_fd = None
        cpu1 = self.balancer_cpu_s(setup)
        tcp1 = self.client_tcp_counters()
        path1, children1 = (self.path_cpu_s(), os.times()) if path else (None, None)
        try:
            res = parse_wrk(out)
        except BenchError as exc:
            return {"ok": False, "error": str(exc)}
        ok = res.requests > 0 and res.error_share <= MAX_ERROR_SHARE
        rec = {"ok": ok, "rate": res.rate, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
               "requests": res.requests, "errors": res.errors, "seconds": res.duration_s,
               "url": url, "spread_over": env.get("BENCH_WRK_ADDRS", ""),
               **balancer_cpu(cpu0, cpu1, res.requests),
               **{name: tcp1[name] - tcp0[name] for name in tcp0}}
        if path0 is not None and path1 is not None and children0 and children1:
            # wrk has exited and been waited for: its CPU is in our children's times.
            wrk_s = (children1.children_user + children1.children_system
                     - children0.children_user - children0.children_system)
            per_1k = path_cpu_per_1k(path0, path1, wrk_s, res.requests)
            rec.update({f"path_{group}_ms_per_1k": v for group, v in (per_1k or {}).items()})
        if run0 is not None and run1 is not None and res.requests > 0:
            rec["xdp_prog_ms_per_1k"] = (run1.run_time_ns - run0.run_time_ns) / 1e3 / res.requests
            rec["xdp_runs_per_conn"] = (run1.run_cnt - run0.run_cnt) / res.requests
        if not ok:
            rec["error"] = f"{res.errors} errors for {res.requests} requests"
        return rec

    def client_tcp_counters(self) -> dict[str, int]:
        """The client namespace's SYN retransmissions and resets sent (parsers.TCP_COUNTERS)."""
        proc = self.lab.run("client", ["cat", "/proc/net/netstat", "/proc/net/snmp"], check=True)
        return parse_tcp_counters(proc.stdout)

    def _client_ports(self, setup: str, single: bool = False) -> None:
        """The client's source ports: a third for runs straight to the backends (direct), a
        third for runs through the VIP to three backends, a third for the VIP's one-backend
        port. A backend keeps each closed connection in TIME_WAIT for 60 s, and the client's
        TCP timestamps start from an offset hashed from the address it dials: a SYN reusing
        a 4-tuple a run of the other kind left there carries timestamps from another offset,
        fails the backend's PAWS check, and waits for a reset and a retransmission. Measured
        before the split: 1,221-1,760 client resets a second in every run within a minute of
        one of the other kind (up to 15,314 SYN retransmissions in a 6 s run; xdp-generic
        24.8-25.6k conn/s against 33.5-34.2k after); none in five alternating runs after it.

        The one-backend port has its own third for nftables: conntrack keeps a closed
        connection's entry for 120 s, and a new connection from the same client port to the
        other VIP port is DNATed to the same backend and port. With the two sharing ports,
        nftables read 18.5k, 19.4k and 4.6k one-backend connections a second (the client resent
        4,903 SYNs in one 6 s run); with ports of their own 35.8k, 41.5k and 37.9k (1,950 SYNs
        resent). lbctl's flow table overwrites such an entry: its builds read 37.8-47.7k with
        the ports shared, in the 00:37 run (docs/benchmarks.md, the 2026-12-03 section)."""
        low, high = CLIENT_PORTS["direct" if setup == "direct" else "vip_one" if single else "vip"]
        ports = f"{low} {high}"
        if ports != self.client_ports:
            self._must(self.lab.client.name, ["sysctl", "-q", "-w",
                                              f"net.ipv4.ip_local_port_range={ports}"])
            self.client_ports = ports

    def _prog_stats(self, setup: str) -> tuple[int, int]:
        """Run-time statistics on (their fd) and the attached program's fd. The statistics add
        two clock reads to each run of the program, outside its own run_time_ns; the XDP
        setups' path CPU carries them."""
        self.state.stats_fd = libbpf.enable_run_time_stats()
        try:
            return self.state.stats_fd, libbpf.obj_get(str(self.lab.bpf_pin_dir / _prog_pin(setup)))
        except BaseException:
            os.close(self.state.stats_fd)
            self.state.stats_fd = None
            raise

    def run_bulk(self, setup: str) -> dict[str, Any]:
        target = self.backends[0] if setup == "direct" else self.vip_addr(setup)
        proc = self.lab.run("client", ["iperf3", "-c", target, "-p", str(BULK_PORT),
                                       "-t", str(self.durations.bulk_s), "-J"],
                            timeout=self.durations.bulk_s + 60)
        try:
            res = parse_iperf3(proc.stdout)
        except BenchError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "gbps": res["bits_per_second"] / 1e9, **res}

    @contextlib.contextmanager
    def pps_path(self) -> Iterator[None]:
        """The sink attached past the balancer for the packet-rate runs. (The generator's
        XDP_TX frames need a NAPI context at the balancer's veth: GRO, on lab-wide, gives
        one, and threaded NAPI runs the balancer beside the generator, not inside its
        system call.)"""
        assert self.sink is not None
        self._helper(self.sink, "attach", 30)
        try:
            yield
        finally:
            self._helper(self.sink, "detach", 30)

    def run_pps(self, setup: str) -> dict[str, Any]:
        assert self.gen is not None
        dst = self.backends[0] if setup == "direct" else self.vip_addr(setup)
        source = f" {self.lab.client.addr6}" if ":" in dst else ""
        client_if, sw = self.lab.client.ifname, "sw"
        c0 = self._link_stats("client", client_if)
        f0 = self._link_stats(sw, self.sw_port)
        cpu0 = self.balancer_cpu_s(setup)
        answer = json.loads(self._helper(
            self.gen, f"run {dst} {PPS_PORT} {self.durations.pps_s}{source}",
            self.durations.pps_s + 60))
        cpu1 = self.balancer_cpu_s(setup)
        c1 = self._link_stats("client", client_if)
        f1 = self._link_stats(sw, self.sw_port)
        # The client's veth counts what the peer accepted as tx and what its full ring
        # refused as tx_dropped: together, everything the generator sent.
        sent = (c1["tx_packets"] - c0["tx_packets"]) + (c1["tx_dropped"] - c0["tx_dropped"])
        verdict = PpsVerdict(
            sent=sent, forwarded=f1["rx_packets"] - f0["rx_packets"],
            seconds=float(answer["seconds"]),
            balancer_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        )
        ok = verdict.sent > 0 and verdict.forwarded > 0
        rec = {"ok": ok, **verdict.as_dict()}
        if not ok:
            rec["error"] = f"nothing forwarded (sent {verdict.sent}; errno {answer['errno']})"
        return rec

    def xdp_cost(self, setup: str) -> dict[str, Any]:
        """Run-time statistics of the attached program under one packet-rate load, and its
        BPF_PROG_TEST_RUN figure."""
        from xdp import libbpf

        pin = self.lab.bpf_pin_dir / _prog_pin(setup)
        out: dict[str, Any] = {}
        fd = libbpf.obj_get(str(pin))
        try:
            self.state.stats_fd = libbpf.enable_run_time_stats()
            try:
                i0 = libbpf.prog_info(fd)
                rec = self.run_pps(setup)
                i1 = libbpf.prog_info(fd)
            finally:
                os.close(self.state.stats_fd)
                self.state.stats_fd = None
            runs = i1.run_cnt - i0.run_cnt
            out["live_runs"] = runs
            out["live_ns_per_packet"] = (i1.run_time_ns - i0.run_time_ns) / runs if runs else None
            out["live_forwarded_pps_with_stats"] = rec.get("forwarded_pps")
        finally:
            libbpf.close(fd)
        proc = self.lab.run("lb", [sys.executable, "-m", "lbctl.bench.helpers",
                                   "testrun", str(pin), self.lb_client_if,
                                   str(self.lab.client.addr6) if setup == "xdp-ipv6" else self.lab.client.addr,
                                   self.vip_addr(setup), str(PPS_PORT)],
                            keep_mounts=True, timeout=120, env=self._env())
        if proc.returncode == 0:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            out["test_run_ns_per_packet"] = data["ns_per_packet"]
            out["test_run_retval"] = data["retval"]
            out["test_run_verdicts"] = data["verdicts"]
            # XDP_TX, XDP_REDIRECT, TC_ACT_REDIRECT: the forwarding path
            if data["retval"] not in (libbpf.XDP_TX, libbpf.XDP_REDIRECT, libbpf.TC_ACT_REDIRECT):
                out["test_run_error"] = f"verdict {data['retval']}, not a forward"
                out["test_run_ns_per_packet"] = None
        else:
            out["test_run_error"] = (proc.stderr or proc.stdout).strip()[-300:]
        return out

    # ------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Undo everything, in any state, ignoring only what is already gone."""
        errors = []
        if self.state.stats_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.state.stats_fd)
            self.state.stats_fd = None
        for helper in (self.gen, self.sink):
            if helper is not None and helper.popen.poll() is None:
                with contextlib.suppress(OSError, subprocess.SubprocessError, AssertionError):
                    assert helper.popen.stdin is not None
                    helper.popen.stdin.write("quit\n")
                    helper.popen.stdin.flush()
                    helper.popen.wait(timeout=5)
        for proc in list(self.state.procs):
            try:
                self._stop(proc)
            except (OSError, subprocess.SubprocessError) as exc:  # keep cleaning; report later
                errors.append(f"{proc.name}: {exc}")
        if self.state.xdp_attached and (NETNS_DIR / self.lab.lb.netns).exists():
            try:
                self._lbctl("detach", "--all", "--purge", "--force")
            except (LbctlError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"detach: {exc}")
        try:
            self.lab.down()  # namespaces (and with them nft tables, addresses), pins
        except (LabError, OSError) as exc:
            errors.append(f"lab down: {exc}")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise BenchError("cleanup incomplete: " + "; ".join(errors))


def balancer_cpu(cpu0: float | None, cpu1: float | None, connections: int) -> dict[str, Any]:
    """The balancer's CPU seconds over a run, and per 1,000 connections (or requests) in
    milliseconds; None where the threads could not be read."""
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    per_1k = cpu * 1e6 / connections if cpu is not None and connections > 0 else None
    return {"balancer_cpu_s": cpu, "cpu_ms_per_1k": per_1k}


# Where the path's CPU ran (PeerBench.path_cpu_s), plus wrk, the client's load generator.
PATH_CPU_GROUPS = ("balancer", "switch", "endpoint_napi", "endpoint_processes")


def path_cpu_per_1k(before: dict[str, float], after: dict[str, float], wrk_s: float,
                    connections: int) -> dict[str, float] | None:
    """CPU milliseconds per 1,000 connections by group, with wrk and the total."""
    if connections <= 0:
        return None
    out = {g: (after[g] - before[g]) * 1e6 / connections for g in PATH_CPU_GROUPS}
    out["wrk"] = wrk_s * 1e6 / connections
    out["total"] = sum(out.values())
    return out


def _netns_inode(netns: str) -> int:
    return os.stat(NETNS_DIR / netns).st_ino


def _napi_threads(ifname: str) -> dict[int, str]:
    """Pid -> comm of the kernel's threaded-NAPI threads of interfaces named ifname, in any
    namespace ("": of every interface)."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(f"napi/{ifname}-" if ifname else "napi/"):
            pids[int(entry)] = comm
    return pids


def _thread_cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of the whole line (11, 12 after the state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup in `finally` runs."""
    main_pid = os.getpid()

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            # A forked child (pyroute2 forks one per namespace) must die as it would have,
            # not unwind our stack into a second cleanup that deletes the lab under us.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def host_record() -> dict[str, Any]:
    """What a record says of the machine it measured on (loadavg_after is added at the end)."""
    return {"kernel": os.uname().release, "cpus": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()), "tools": tool_versions()}


@contextlib.contextmanager
def rounds_then_cleanup(bench: Any, progress: _Progress, console: Any, cleaned: str) -> Iterator[None]:
    """The measuring part of a run: SIGTERM and SIGHUP unwind like Ctrl-C, and whatever
    happens the bench is closed (a second Ctrl-C cannot cut that short), then `cleaned`
    is reported as the last step of a run that was not interrupted."""
    interrupted = False
    with _signals_raise_interrupt():
        try:
            yield
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted: cleaning up[/]")
            raise
        finally:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                bench.close()
            finally:
                signal.signal(signal.SIGINT, previous)
                if not interrupted:
                    progress.step(cleaned)


def write_record(results: dict[str, Any], results_dir: Path, name: str, console: Any) -> Path:
    """The run's JSON record (its path is kept in it as "file")."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / name
    results["file"] = str(path)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    console.print(f"results: {path}")
    return path


def check_outputs(results_dir: Path, doc_path: Path | None) -> None:
    """Refuse, before anything is built, outputs the run could not write at its end."""
    if results_dir.exists() and not results_dir.is_dir():
        raise BenchError(f"--results-dir {results_dir} is not a directory; hint: name a "
                         "directory (created if missing), e.g. bench/results")
    if doc_path is not None:
        if doc_path.exists() and not doc_path.is_file():
            raise BenchError(f"--doc {doc_path} is not a file; hint: name the markdown page, "
                             "e.g. docs/benchmarks.md")
        if not doc_path.parent.is_dir():
            raise BenchError(f"--doc {doc_path}: no directory {doc_path.parent}; hint: the "
                             "plots go beside the page, so its directory must exist")


def run_peers(results_dir: Path, doc_path: Path | None = None, repeats: int = 3,
              quick: bool = False, only: Sequence[str] | None = None, *,
              console: Any = None) -> dict[str, Any]:
    """Measure every setup on every workload, `repeats` rounds (1 when quick), and record it.

    Writes results_dir/<timestamp>.json; with doc_path, a complete run (no failed run) also
    replaces that page's generated block and draws its plots beside it. Refuses to start
    when a tool is missing or an output cannot be written; cleans up whatever happens,
    Ctrl-C and SIGTERM included.
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (namespaces, XDP, nftables); hint: sudo")
    setups = resolve_setups(only)
    check_tools(setups)
    check_outputs(results_dir, doc_path)
    repeats = 1 if quick else max(1, repeats)
    xdp_setups = [s for s in setups if s.startswith("xdp-")]
    per_round = sum(5 if s != "haproxy" else 4 for s in setups)
    progress = _Progress(repeats * per_round + len(xdp_setups) + 2, console)

    started = dt.datetime.now(dt.timezone.utc)
    results: dict[str, Any] = {
        "schema": 2,
        "started": started.isoformat(timespec="seconds"),
        "quick": quick,
        "repeats": repeats,
        "host": host_record(),
        "config": {"wrk_threads": WRK_THREADS, "wrk_connections": WRK_CONNECTIONS,
                   "pps_flows": PPS_FLOWS, "pps_frame_bytes": 42 + PPS_PAYLOAD_BYTES,
                   "generator_bound_share": GENERATOR_BOUND_SHARE,
                   "single_backend": "the first backend's nginx, behind VIP port "
                                     f"{SINGLE_VIP_PORT} or direct",
                   "napi": "GRO and threaded NAPI on every veth end; balancer CPU is its "
                           "napi/IF-N threads (plus HAProxy's process)",
                   **asdict(Durations.for_run(quick))},
        "setups": {s: {"title": SETUP_TITLES[s], "runs": {w: [] for w in WORKLOADS}}
                   for s in setups},
        "l7": {"status": "separate bench",
               "note": "measured by `lbctl bench l7` (the agent's L7 proxy against HAProxy "
                       "`mode http`): see its section below."},
    }
    bench = PeerBench(setups, repeats, quick, console)
    with rounds_then_cleanup(bench, progress, console,
                             "cleaned up: lab, processes, XDP, nft tables removed"):
        console.print(f"[bold]lbctl bench peers[/]: {', '.join(setups)}; {repeats} round(s); "
                      f"lab prefix {bench.lab.prefix}")
        bench.prepare()
        progress.step(f"lab {bench.lab.prefix} up: nginx on 3 backends, iperf3 on "
                      f"{bench.lab.backends[0].name}, generator and sink loaded")
        for rnd in range(1, repeats + 1):
            for setup in setups:
                _measure_setup(bench, setup, rnd, results, progress)
        for setup in xdp_setups:
            bench.setup(setup)
            try:
                with bench.pps_path():
                    cost = bench.xdp_cost(setup)
            finally:
                bench.teardown(setup)
            results["setups"][setup]["xdp_cost"] = cost
            live, test = cost.get("live_ns_per_packet"), cost.get("test_run_ns_per_packet")
            progress.step(
                f"{SETUP_TITLES[setup]}: program cost "
                f"{'-' if live is None else f'{live:.0f}'} ns/packet under load "
                f"(run-time stats), {'-' if test is None else test} ns in BPF_PROG_TEST_RUN")

    for setup in setups:
        results["setups"][setup]["summary"] = summarize_setup(results["setups"][setup]["runs"])
    summary = {s: results["setups"][s]["summary"] for s in setups}
    add_path_extra(summary)
    results["ratios"] = ratio_table(summary, setups)
    results["goals"] = evaluate_goals(summary)
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["host"]["loadavg_after"] = list(os.getloadavg())
    failed = [(s, w) for s in setups for w in WORKLOADS
              for r in results["setups"][s]["runs"][w] if not r.get("ok")]
    results["complete"] = not failed
    results["failed_runs"] = [f"{s}/{w}" for s, w in failed]

    write_record(results, results_dir,
                 started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "") + ".json", console)
    if doc_path is not None and failed:
        console.print(f"[yellow]{doc_path} left as it was: the run is incomplete[/]")
    elif doc_path is not None:
        plots = write_docs(results, doc_path)
        console.print(f"updated {doc_path} and {len(plots)} plot(s)")
    print_summary(results, console)
    if failed:
        console.print(f"[red]incomplete: {len(failed)} run(s) failed: "
                      f"{', '.join(results['failed_runs'])}[/]")
    return results


def _measure_setup(bench: PeerBench, setup: str, rnd: int, results: dict[str, Any],
                   progress: _Progress) -> None:
    runs = results["setups"][setup]["runs"]
    title = f"round {rnd}/{bench.repeats} {SETUP_TITLES[setup]}"
    bench.setup(setup)
    try:
        rec = bench.run_wrk(setup, close=True)
        runs["short"].append(rec)
        progress.step(f"{title}: short connections " + _describe_http(rec, "conn/s"))
        rec = bench.run_wrk(setup, close=True, single=True)
        runs["short1"].append(rec)
        progress.step(f"{title}: short connections, one backend "
                      + _describe_http(rec, "conn/s"))
        rec = bench.run_wrk(setup, close=False)
        runs["keepalive"].append(rec)
        progress.step(f"{title}: keep-alive " + _describe_http(rec, "req/s"))
        rec = bench.run_bulk(setup)
        runs["bulk"].append(rec)
        progress.step(f"{title}: bulk " + (f"{rec['gbps']:.2f} Gbit/s" if rec["ok"]
                                           else f"[red]failed[/]: {rec['error']}"))
        if setup != "haproxy":  # HAProxy balances no UDP
            with bench.pps_path():
                rec = bench.run_pps(setup)
            runs["pps"].append(rec)
            if rec["ok"]:
                text = (f"{rec['forwarded_pps'] / 1e3:.0f} kpps forwarded of "
                        f"{rec['sent_pps'] / 1e3:.0f} kpps sent ({rec['drop_share']:.0%} dropped)")
                if rec["generator_bound"]:
                    text += " [yellow]generator-bound[/]"
                if rec["cpu_s_per_mpkt"] is not None:
                    text += f", {rec['cpu_s_per_mpkt']:.2f} CPU-s/Mpkt"
            else:
                text = f"[red]failed[/]: {rec['error']}"
            progress.step(f"{title}: packet rate {text}")
    finally:
        bench.teardown(setup)


def _describe_http(rec: dict[str, Any], unit: str) -> str:
    if not rec.get("ok") and "rate" not in rec:
        return f"[red]failed[/]: {rec.get('error')}"
    text = f"{rec['rate']:,.0f} {unit}, p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms"
    if rec.get("cpu_ms_per_1k") is not None and unit == "conn/s":
        text += f", balancer {rec['cpu_ms_per_1k']:.1f} CPU-ms per 1k"
    if not rec["ok"]:
        text += f" [red]({rec['error']})[/]"
    return text
