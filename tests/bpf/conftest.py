"""Fixtures for data-plane tests: the loaded balancer on a throw-away instance, its controller
and maps, a routed network namespace, and BPF_PROG_TEST_RUN with a chosen ingress interface."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence

import pytest

from lbctl.bench import routed
from lbctl.bench.routed import Port, RoutedNetns
from lbctl.control import LOCK_DIR, Controller
from lbctl.model import Config
from lbctl.netns import inside
from xdp import libbpf
from xdp.limits import DEFAULT_LIMITS, OUTCOMES
from xdp.maps import LbMaps, pin_dir_for
from xdp.program import LoadedProgram, compile_and_load

INSTANCE_PREFIX = "tbpf-"
NETNS_PREFIX = "tbpf-"


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


@pytest.fixture
def fresh_dataplane(controller: Controller, baseline: Config,
                    clean_dataplane: Callable[[], None]) -> None:
    """Each test sees its module's `baseline` configuration, no tracked flows and zeroed
    counters (a module asks with pytest.mark.usefixtures("fresh_dataplane"))."""
    controller.change(lambda _config: dict(baseline))
    clean_dataplane()


# --- a routed network namespace ---

@pytest.fixture(scope="module")
def netns_ports(request: pytest.FixtureRequest) -> Sequence[Port]:
    """The test module's PORTS."""
    return request.module.PORTS


@pytest.fixture(scope="module")
def routed_netns(request: pytest.FixtureRequest, netns_ports: Sequence[Port]) -> Iterator[RoutedNetns]:
    """The bench's routed namespace (lbctl/bench/routed.py) with the test module's ports:
    forwarding on, fixed MACs, permanent neighbours, named with the module's NETNS_PREFIX if
    it has one. Deleted at teardown, veths with it."""
    prefix = getattr(request.module, "NETNS_PREFIX", NETNS_PREFIX)
    with routed.routed_netns(f"{prefix}{secrets.token_hex(4)}", netns_ports) as built:
        yield built


@pytest.fixture(scope="session")
def lb_tc_program(lb_program: LoadedProgram) -> Iterator[LoadedProgram]:
    """The tc build of the same source (`lbctl attach --mode tc`), sharing lb_program's maps."""
    loaded = compile_and_load(lb_program.pin_dir, DEFAULT_LIMITS, tc=True)
    try:
        yield loaded
    finally:
        loaded.bpf.cleanup()  # type: ignore[attr-defined]


# The tc build's verdict where the XDP build gives each of these: a frame sent back out of the
# interface it came in on is a redirect there too (the outcome counters still tell them apart).
TC_VERDICTS = {libbpf.XDP_PASS: libbpf.TC_ACT_OK, libbpf.XDP_DROP: libbpf.TC_ACT_SHOT,
               libbpf.XDP_TX: libbpf.TC_ACT_REDIRECT, libbpf.XDP_REDIRECT: libbpf.TC_ACT_REDIRECT}


@pytest.fixture
def build_run(request: pytest.FixtureRequest, lb_program: LoadedProgram,
              routed_netns: RoutedNetns) -> tuple[Callable[..., tuple[int, bytes]], Callable[[int], int]]:
    """(run, verdict) for the build a test is parametrized with (indirectly, "xdp" or "tc"):
    run(frame, ingress) as `run` below, with the XDP build or the tc one (on a socket buffer
    the test run builds), and verdict(xdp_action), the code that build returns for it. Case
    tables written in XDP's verdicts hold both builds to the same decisions and bytes."""
    if request.param == "xdp":
        return request.getfixturevalue("run"), lambda action: action
    tc = request.getfixturevalue("lb_tc_program")

    def run_frame(frame: bytes, ingress: str | None = None) -> tuple[int, bytes]:
        with inside(routed_netns.name):
            ifindex = routed_netns.ifindex[ingress] if ingress is not None else socket.if_nametoindex("lo")
            result = libbpf.prog_test_run_skb(tc.fd, frame, ingress_ifindex=ifindex)
        return result.retval, result.data_out
    return run_frame, TC_VERDICTS.__getitem__


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

