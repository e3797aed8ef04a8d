"""Fixtures for data-plane tests: the loaded balancer on a throw-away instance, its controller
and maps, a routed network namespace, and BPF_PROG_TEST_RUN with a chosen ingress interface."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from lbctl.control import LOCK_DIR, Controller
from lbctl.netns import inside
from xdp import libbpf
from xdp.limits import DEFAULT_LIMITS, OUTCOMES
from xdp.maps import LbMaps, pin_dir_for
from xdp.program import LoadedProgram, compile_and_load

INSTANCE_PREFIX = "tbpf-"
NETNS_PREFIX = "tbpf-"
NUD_PERMANENT = 0x80
UP_TIMEOUT_S = 5.0


# --- the balancer instance ---

@pytest.fixture(scope="session")
def lb_instance() -> str:
    return f"{INSTANCE_PREFIX}{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def lb_program(lb_instance: str) -> Iterator[LoadedProgram]:
    """The balancer compiled and loaded with the shipped limits, its maps pinned under
    /sys/fs/bpf/lbctl/<instance>/; pins and lock file are removed whatever happened."""
    pin_dir = pin_dir_for(lb_instance)
    loaded: LoadedProgram | None = None
    try:
        loaded = compile_and_load(pin_dir, DEFAULT_LIMITS)
        yield loaded
    finally:
        if loaded is not None:
            loaded.bpf.cleanup()  # type: ignore[attr-defined]
        shutil.rmtree(pin_dir, ignore_errors=True)
        try:
            os.unlink(os.path.join(LOCK_DIR, f"{lb_instance}.lock"))
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session")
def controller(lb_instance: str, lb_program: LoadedProgram) -> Controller:
    """The control-plane library acting on the test instance's pinned maps."""
    return Controller(lb_instance, DEFAULT_LIMITS)


@pytest.fixture(scope="session")
def lb_maps(lb_program: LoadedProgram) -> Iterator[LbMaps]:
    with LbMaps(lb_program.pin_dir, DEFAULT_LIMITS) as maps:
        yield maps


def reset_counters(maps: LbMaps) -> None:
    """Zero every per-CPU counter: outcomes, VIPs and backends."""
    for index in range(len(OUTCOMES)):
        maps.reset_counters("stats_global", index)
    for index in range(maps.limits.max_vips):
        maps.reset_counters("stats_vip", index)
    for index in range(maps.limits.max_backends):
        maps.reset_counters("stats_backend", index)


@pytest.fixture
def clean_dataplane(lb_maps: LbMaps) -> Callable[[], None]:
    """Call to forget every tracked flow and zero every counter (the configuration stays)."""
    def clean() -> None:
        lb_maps.flush_flows()
        reset_counters(lb_maps)
    return clean


# --- a routed network namespace ---

class RoutedPort(Protocol):
    """What routed_netns needs of each entry of the test module's `netns_ports` fixture."""

    name: str          # the interface; its veth peer is `name + "p"`, up and without address
    mac: str           # the interface's MAC: bpf_fib_lookup's smac for packets leaving here
    cidr: str          # its address, e.g. "10.10.1.1/24": the connected route
    neighbours: dict[str, str]  # address -> MAC, installed PERMANENT: bpf_fib_lookup's dmac
    # Optional `mtu: int | None` (read with getattr): set on both ends of the veth, e.g. 9000
    # for a jumbo link, where bpf_fib_lookup's MTU check then lets big packets through.


@dataclass
class RoutedNetns:
    name: str
    ifindex: dict[str, int] = field(default_factory=dict)


def _wait_until(what: str, ready: Callable[[], bool], timeout_s: float = UP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def _remove_netns(name: str) -> None:
    from pyroute2 import netns  # type: ignore[import-untyped]

    try:
        netns.remove(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


@pytest.fixture(scope="module")
def routed_netns(netns_ports: Sequence[RoutedPort]) -> Iterator[RoutedNetns]:
    """A namespace that forwards IPv4 (bpf_fib_lookup answers FWD_DISABLED otherwise), with one
    veth per port, its address, and permanent neighbours with fixed MACs, so the FIB answers
    the same MACs every run. Deleted at teardown, which takes its veths with it."""
    from pyroute2 import IPRoute, netns

    name = f"{NETNS_PREFIX}{secrets.token_hex(4)}"
    netns.create(name)
    try:
        routed = RoutedNetns(name)
        with IPRoute(netns=name) as ipr:
            for port in netns_ports:
                ipr.link("add", ifname=port.name, kind="veth", peer=f"{port.name}p")
                index = ipr.link_lookup(ifname=port.name)[0]
                peer = ipr.link_lookup(ifname=f"{port.name}p")[0]
                ipr.link("set", index=index, address=port.mac)
                mtu = getattr(port, "mtu", None)
                if mtu is not None:
                    ipr.link("set", index=index, mtu=mtu)
                    ipr.link("set", index=peer, mtu=mtu)
                ipr.link("set", index=peer, state="up")
                ipr.link("set", index=index, state="up")
                addr, prefixlen = port.cidr.split("/")
                ipr.addr("add", index=index, address=addr, prefixlen=int(prefixlen))
                for neighbour, mac in port.neighbours.items():
                    ipr.neigh("add", dst=neighbour, lladdr=mac, ifindex=index,
                              state=NUD_PERMANENT)
                routed.ifindex[port.name] = index

            def all_up() -> bool:
                return all(ipr.get_links(i)[0].get_attr("IFLA_OPERSTATE") == "UP"
                           for i in routed.ifindex.values())

            _wait_until(f"the veths of {name} to come up", all_up)
        with inside(name):
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1\n")
            with open("/proc/sys/net/ipv4/ip_forward") as f:
                assert f.read().strip() == "1", f"cannot enable forwarding in {name}"
        yield routed
    finally:
        _remove_netns(name)




@pytest.fixture
def run(lb_program: LoadedProgram, routed_netns: RoutedNetns) -> Callable[..., tuple[int, bytes]]:
    """run(frame, ingress=None) -> (retval, out): one BPF_PROG_TEST_RUN inside routed_netns.
    ingress names one of its ports; None is a plain run, whose ingress is the namespace's
    loopback (which has no route to anything outside the namespace's own subnets)."""
    def run_frame(frame: bytes, ingress: str | None = None) -> tuple[int, bytes]:
        with inside(routed_netns.name):
            if ingress is None:
                result = libbpf.prog_test_run(lb_program.fd, frame)
            else:
                result = libbpf.prog_test_run(lb_program.fd, frame, ingress_ifindex=routed_netns.ifindex[ingress])
        return result.retval, result.data_out
    return run_frame

