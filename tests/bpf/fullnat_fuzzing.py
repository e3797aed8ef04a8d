"""The full-NAT fuzz run, once for both families: the one-arm topology's VIPs and backends, a
frame source's claims and rhythm, the judge's skeleton (what must pass untouched, what a VIP
packet and a reply must become, who holds a claimed port) and the run with its counter checks.
test_fullnat_fuzz.py (IPv4) and test_fullnat_fuzz6.py (IPv6) give the frames and the reading."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from test_fuzz import mixed

from lbctl.control import Controller
from lbctl.model import BackendSpec, VipSpec
from lbctl.netns import inside
from xdp import libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.limits import DEFAULT_LIMITS, OUTCOMES
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

SEED = int(os.environ.get("LBCTL_FUZZ_SEED", "20261202"))
ACTIONS = {XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT}
NAMES = {6: "tcp", 17: "udp"}
DEFAULT_PORTS = (1024, 32767)
NARROW_PORTS = (7000, 7003)       # four ports: exhaustion comes quickly
# The outcomes every run must reach, or it proves little.
REACHED = ("tx", "drop_snat_no_port", "drop_snat_no_source", "pass_ttl", "pass_malformed")


@dataclass(frozen=True)
class FuzzNet:
    """One arm carrying clients and backends; four full-NAT VIPs: TCP, UDP, one with four
    source ports (`narrow`) and one whose backend has no route (`unrouted`: no source address)."""

    arm_addr: str
    tcp_vip: Endpoint
    udp_vip: Endpoint
    narrow_vip: Endpoint
    unrouted_vip: Endpoint
    tcp_backends: tuple[Endpoint, ...]
    udp_backends: tuple[Endpoint, ...]
    narrow_backend: Endpoint
    unrouted_backend: Endpoint

    @property
    def vips(self) -> dict[Endpoint, tuple[Endpoint, ...]]:
        return {self.tcp_vip: self.tcp_backends, self.udp_vip: self.udp_backends,
                self.narrow_vip: (self.narrow_backend,), self.unrouted_vip: (self.unrouted_backend,)}

    @property
    def all_backends(self) -> tuple[Endpoint, ...]:
        """The backends a reply can come from (the unrouted one is never reached)."""
        return (*self.tcp_backends, *self.udp_backends, self.narrow_backend)

    def ports_of(self, vip: Endpoint) -> tuple[int, int]:
        return NARROW_PORTS if vip == self.narrow_vip else DEFAULT_PORTS

    def vip_at(self, addr: str, port: int, proto: int) -> Endpoint | None:
        vip = Endpoint(addr, port, NAMES.get(proto, ""))
        return vip if vip in self.vips else None

    def configure(self, controller: Controller) -> None:
        config = {vip: VipSpec(vip, tuple(BackendSpec(b.addr, b.port) for b in backends),
                               forwarding="fullnat", snat_ports=self.ports_of(vip))
                  for vip, backends in self.vips.items()}
        controller.change(lambda _config: config)


@dataclass(frozen=True)
class Flow:
    vip: Endpoint
    client: str
    client_port: int


def show(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class Source:
    """A family's frame makers (`makers`), its mutation and noise, in one rhythm: 70% made
    frames, 25% mutated ones, 5% noise. `claimed` hears of each port the program claimed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def makers(self) -> tuple[Callable[[], bytes], ...]:
        raise NotImplementedError

    def mutate(self, frame: bytes) -> bytes:
        raise NotImplementedError

    def noise(self) -> bytes:
        raise NotImplementedError

    def claimed(self, backend: Endpoint, port: int, flow: Flow) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[bytes]:
        return mixed(self.rng, self.makers(), self.mutate, self.noise, made=0.7, mutated=0.95)


class Judge:
    """The oracle. A family gives `read` (a Parsed-like reading for a TCP/UDP frame the
    program must act on, anything else for the rest), `unparsed` (the judgement of the rest),
    `rewrite` (checks a rewritten frame and reads it) and `HOP_AT` (its TTL/hop limit byte)."""

    HOP_AT = 0

    def __init__(self, net: FuzzNet, source: Source, parsed: type) -> None:
        self.net = net
        self.source = source
        self.parsed = parsed
        # (backend addr, backend port, snat port, proto) -> the client flow that holds it
        self.owner: dict[tuple[str, int, int, int], Flow] = {}
        self.started = time.monotonic()
        self.must: Counter[str] = Counter()
        self.forwarded = self.replied = 0

    def read(self, frame: bytes) -> Any:
        raise NotImplementedError

    def unparsed(self, frame: bytes, retval: int, out: bytes, reading: Any) -> None:
        raise NotImplementedError

    def rewrite(self, frame: bytes, out: bytes, p: Any, retval: int, toward_backend: bool) -> Any:
        raise NotImplementedError

    def changed_only(self, frame: bytes, out: bytes, allowed: set[int], retval: int) -> None:
        assert len(out) == len(frame), "a rewrite changed the frame's length"
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} changed outside the rewrite"
        # XDP_PASS of a rewritten packet (no neighbour): the kernel routes it, MACs and TTL its own.
        forwarded = retval in (XDP_TX, XDP_REDIRECT)
        assert out[self.HOP_AT] == frame[self.HOP_AT] - forwarded, (
            "TTL/hop limit not lowered by exactly 1 when forwarded")
        if not forwarded:
            assert out[:12] == frame[:12], "passed to the kernel with MACs rewritten"

    def judge(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in ACTIONS, f"XDP action {retval} (XDP_ABORTED is 0)"
        reading = self.read(frame)
        if not isinstance(reading, self.parsed):
            self.unparsed(frame, retval, out, reading)
            return
        p = reading
        vip = self.net.vip_at(p.dst, p.dport, p.proto)
        owner = self.owner.get((p.src, p.sport, p.dport, p.proto)) if p.dst == self.net.arm_addr else None
        if vip is None and owner is None:
            assert retval == XDP_PASS and out == frame, "non-VIP traffic was not passed untouched"
            self.must["pass_not_vip"] += 1
            return
        if frame[self.HOP_AT] <= 1:
            assert retval == XDP_PASS and out == frame, "TTL/hop limit <= 1 was not passed untouched"
            self.must["pass_ttl"] += 1
            return
        if vip is not None:
            self._to_vip(frame, retval, out, p, vip)
        else:
            assert owner is not None
            self._reply(frame, retval, out, p, owner)

    def _to_vip(self, frame: bytes, retval: int, out: bytes, p: Any, vip: Endpoint) -> None:
        net = self.net
        if retval == XDP_DROP:
            assert vip in (net.narrow_vip, net.unrouted_vip), f"{vip} dropped a packet"
            self.must["drop_snat_no_source" if vip == net.unrouted_vip else "drop_snat_no_port"] += 1
            return
        assert retval == XDP_TX, f"one-arm: action {retval}, not XDP_TX"
        new = self.rewrite(frame, out, p, retval, toward_backend=True)
        backend = Endpoint(new.dst, new.dport, NAMES[p.proto])
        assert backend in net.vips[vip], f"{vip} sent to {backend}"
        low, high = net.ports_of(vip)
        assert new.src == net.arm_addr and low <= new.sport <= high, f"source {show(new.src, new.sport)}"
        claim = (backend.addr, backend.port, new.sport, p.proto)
        mine = Flow(vip, p.src, p.sport)
        held = self.owner.get(claim)
        # No flow ends by timeout within a run this short (the shortest, closing, is 15 s).
        if held is not None and held != mine:
            assert time.monotonic() - self.started > DEFAULT_LIMITS.tcp_closing_timeout_s, (
                f"{claim} claimed by {mine} while {held} holds it")
        self.owner[claim] = mine
        self.source.claimed(backend, new.sport, mine)
        self.must["tx"] += 1
        self.forwarded += 1

    def _reply(self, frame: bytes, retval: int, out: bytes, p: Any, owner: Flow) -> None:
        if out == frame:
            assert retval == XDP_PASS, "a reply was neither rewritten nor passed"
            return            # a SYN-ACK on a closed flow's entry: pass_stale_reply
        assert retval in (XDP_TX, XDP_PASS)   # PASS: a client with no neighbour (pass_no_route)
        new = self.rewrite(frame, out, p, retval, toward_backend=False)
        assert (new.src, new.sport, new.dst, new.dport) == (
            owner.vip.addr, owner.vip.port, owner.client, owner.client_port), (
            f"reply sent as {show(new.src, new.sport)} -> {show(new.dst, new.dport)}, its flow is {owner}")
        self.must["tx" if retval == XDP_TX else "pass_no_route"] += 1
        self.replied += 1


def run_fuzz(judge: Judge, frames: int, frames_env: str, controller: Controller,
             clean_dataplane: Callable[[], None], lb_program: LoadedProgram, routed_netns: Any,
             ingress: str, lb_maps: LbMaps, reached: tuple[str, ...] = ()) -> Counter[str]:
    """Configures the VIPs, runs `frames` of the judge's source (made with SEED) through the program, each
    judged; then every frame counted once, at least the outcomes the judge demands, and each
    of REACHED + `reached` more than once per thousand frames. Returns the counted outcomes."""
    judge.net.configure(controller)
    clean_dataplane()
    ifindex = routed_netns.ifindex[ingress]
    sent_bytes = 0
    with inside(routed_netns.name):
        for n, frame in zip(range(frames), judge.source):
            result = libbpf.prog_test_run(lb_program.fd, frame, ingress_ifindex=ifindex)
            sent_bytes += len(frame)
            try:
                judge.judge(frame, result.retval, result.data_out)
            except AssertionError as exc:
                pytest.fail(f"frame {n} of seed {SEED}: {exc}\n  in  {frame.hex()}\n"
                            f"  out {result.data_out.hex()}\n  replay: LBCTL_FUZZ_SEED={SEED} "
                            f"{frames_env}={n + 1}", pytrace=False)
    counters = lb_maps.global_counters()
    counted = Counter({name: c["packets"] for name, c in counters.items() if c["packets"]})
    print(f"seed {SEED}: {frames} frames, {judge.forwarded} to backends, {judge.replied} replies "
          f"back, {len(judge.owner)} claims; counted {dict(sorted(counted.items()))}")
    assert sum(counted.values()) == frames
    assert sum(c["bytes"] for c in counters.values()) == sent_bytes
    for outcome, least in judge.must.items():
        assert counted[outcome] >= least, f"{outcome}: counted {counted[outcome]}, at least {least}"
    for outcome in (*REACHED, *reached):
        assert counted[outcome] > frames // 1000, f"too few {outcome}: {dict(counted)}"
    assert set(OUTCOMES) >= set(counted)
    assert judge.replied > frames // 20 and judge.forwarded > frames // 20
    assert len({port for (_, _, port, _) in judge.owner}) > 100, "too few distinct ports claimed"
    return counted
