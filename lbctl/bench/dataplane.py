"""`lbctl bench dataplane`: nanoseconds per packet of each path through the XDP program, run by
BPF_PROG_TEST_RUN in a private namespace beside a trivial baseline program measured alike."""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lbctl.bench.errors import BenchError
from lbctl.bench.routed import Port, create_routed_netns, remove_netns
from lbctl.control import LOCK_DIR, Controller
from lbctl.model import BackendSpec, VipSpec
from lbctl.netns import inside
from xdp import frames, libbpf
from xdp.balancer import require_root
from xdp.codec import Endpoint
from xdp.limits import DEFAULT_LIMITS
from xdp.maps import LbMaps, pin_dir_for
from xdp.program import BPF_DIR, WITHOUT_TRACE, LoadedProgram, _import_bcc, compile_and_load
from xdp.tracing import Filter, RingReader, TraceSwitch

if TYPE_CHECKING:  # typing.Self is 3.11+
    from typing_extensions import Self

console = Console(highlight=False)

INSTANCE_PREFIX = "bench-"
NETNS_PREFIX = "lbbench-"
BASELINE_FILE = "bench_baseline.c"
BASELINE_FUNCTION = "xdp_bench_baseline"

DEFAULT_REPEAT = 1_000_000
ROUNDS = 5
# A test run repeats the program on one buffer without restoring it, so a forwarding path sees
# its own output next time: the bench chains VIPs so that output is again the same path (see
# docs/dataplane.md). Forwarding lowers the TTL once per repetition: 255 -> 5 in 250 runs.
FORWARD_BATCH = 250
START_TTL = 255
# The new-flow path needs a fresh 5-tuple per repetition: one per chained VIP, so a call
# repeats at most as often as there are VIPs. Two VIP ids are kept for the IPv6 cycle,
# one for the DSR VIP and FULLNAT_CHAIN for the full-NAT chain.
V6_CYCLE = 2
FULLNAT_CHAIN = 8
CHAIN_LENGTH = DEFAULT_LIMITS.max_vips - V6_CYCLE - 1 - FULLNAT_CHAIN
# New flows per path (all rounds): each round's share goes into emptied tables and stays far
# below their size, so no insert has to evict (that is another cost, not measured here).
NEW_FLOW_BUDGET = min(200_000, DEFAULT_LIMITS.flow_table_size * 3 // 4)
# The kernel divides the run's time by the repetitions in integers: on average half a
# nanosecond is lost, given back to every figure.
INTEGER_DIVISION_BIAS_NS = 0.5
MAX_NO_ROUTE_SHARE = 10_000           # 1 in this many forwarding runs may find no neighbour
TRIM_SHARE = 0.1                       # of samples dropped at each end (interrupts, migrations)
FLOW_HIT_TARGET_RATIO = 3.0
# Issue #11: tracing compiled in but switched off may cost a flow hit this much at most.
TRACE_OFF_TARGET_NS = 2.0
RING_POLL_MS = 20                      # the bench's ring consumer, like `lbctl trace`'s loop
KATRAN_REFERENCE_NS = (101, 119)       # Katran's published figures from its own tester

# The private namespace: a client arm and a "backend" arm whose neighbours are the chained VIPs.
CLIENT_ARM, CLIENT_ARM_MAC, CLIENT_ARM_CIDR = "lbc0", "02:00:0a:14:01:01", "10.20.1.1/24"
CHAIN_ARM, CHAIN_ARM_MAC, CHAIN_ARM_CIDR = "lbb0", "02:00:0a:14:00:01", "10.20.0.1/24"
HOLDER = "lbh0"                        # a veth whose ends hold the programs (see _hold_in_dispatcher)
HOLDER_NO_TRACE = "lbh1"               # one end holds the build without tracing
CLIENT, CLIENT_MAC = "10.20.1.100", "02:00:0a:14:01:64"
NON_VIP = "10.20.1.1"                  # the balancer host's own address: its SSH, say
VIP_PORT = 80
HIT_CLIENT_PORT = 60000
NEW_FLOW_FIRST_PORT = 1024
# --forwarding dsr: its backend is a chain address (a permanent neighbour on the chain arm).
# DSR changes only the MACs, so a repetition's output is the same flow's packet again: no chain.
DSR_VIP = Endpoint("10.20.9.1", VIP_PORT, "tcp")
# --forwarding fullnat: a chain of its own on the chain addresses' port 81. VIP j's backend is
# VIP j+1 (mod FULLNAT_CHAIN) and its one source port FULLNAT_PORT + j, from FULLNAT_SNAT (a
# neighbour on the chain arm, not the balancer's own address: replies to it are forwarded). A
# flow's output, SNAT:port j -> VIP j+1, is flow j+1's packet; its reply's output, VIP j ->
# SNAT:port j-1, is flow j-1's reply: both chains close on themselves.
FULLNAT_VIP_PORT = 81
FULLNAT_PORT = 20000
FULLNAT_SNAT, FULLNAT_SNAT_MAC = "10.20.0.9", "02:00:0a:14:00:09"
TCP_ACK, TCP_SYN = frames.TCP_ACK, frames.TCP_SYN


# IPv6: a cycle of two VIPs on the chain arm, each the other's backend (the same trick).
CLIENT_ARM_CIDR6, CHAIN_ARM_CIDR6 = "fd00:14:1::1/64", "fd00:14::1/64"
CLIENT6 = "fd00:14:1::100"


def chain_addr6(i: int) -> str:
    return f"fd00:14::{10 + i % V6_CYCLE:x}"


def chain_mac6(i: int) -> str:
    return f"02:00:0a:14:06:{10 + i % V6_CYCLE:02x}"


def chain_addr(i: int) -> str:
    return f"10.20.0.{10 + i % CHAIN_LENGTH}"


def chain_mac(i: int) -> str:
    return f"02:00:0a:14:00:{10 + i % CHAIN_LENGTH:02x}"


def tcp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
              flags: int, ttl: int = START_TTL) -> bytes:
    """The bench's TCP frames: no options, no payload, starting at START_TTL."""
    return frames.tcp_frame(src_mac, dst_mac, src, dst, sport, dport, flags=flags, ttl=ttl,
                            ident=4242)


# --- the private namespace and the throw-away instance ---

@dataclass
class Sandbox:
    instance: str
    netns: str
    ifindex: dict[str, int] = field(default_factory=dict)
    program: LoadedProgram | None = None
    program_no_trace: LoadedProgram | None = None
    baseline_bpf: Any = None
    baseline_fd: int = -1

    @property
    def pin_dir(self) -> str:
        return pin_dir_for(self.instance)


def _build_netns(box: Sandbox) -> None:
    """The routed namespace: a client arm and a chain arm with fixed MACs and permanent
    neighbours, so the FIB answers the same every run and every forwarding path finds its
    next hop; plus the holder veth, left down (see _hold_in_dispatcher)."""
    from pyroute2 import IPRoute

    ports = (Port(CLIENT_ARM, CLIENT_ARM_MAC, CLIENT_ARM_CIDR, {CLIENT: CLIENT_MAC, CLIENT6: CLIENT_MAC},
                  cidr6=CLIENT_ARM_CIDR6),
             Port(CHAIN_ARM, CHAIN_ARM_MAC, CHAIN_ARM_CIDR,
                  {FULLNAT_SNAT: FULLNAT_SNAT_MAC,
                   **{chain_addr(i): chain_mac(i) for i in range(CHAIN_LENGTH)},
                   **{chain_addr6(i): chain_mac6(i) for i in range(V6_CYCLE)}},
                  cidr6=CHAIN_ARM_CIDR6))
    box.ifindex.update(create_routed_netns(box.netns, ports).ifindex)
    with IPRoute(netns=box.netns) as ipr:
        for holder in (HOLDER, HOLDER_NO_TRACE):                         # down: no traffic
            ipr.link("add", ifname=holder, kind="veth", peer=f"{holder}p")


def _load_baseline(box: Sandbox) -> None:
    BPF = _import_bcc()
    try:
        box.baseline_bpf = BPF(src_file=str(BPF_DIR / BASELINE_FILE).encode())
        box.baseline_fd = box.baseline_bpf.load_func(BASELINE_FUNCTION.encode(), BPF.XDP).fd
    except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
        raise BenchError(f"cannot compile or load {BASELINE_FILE}: {exc}") from exc


def _hold_in_dispatcher(box: Sandbox) -> None:
    """Attaches both programs (generic mode) to the two ends of a veth that stays down, so no
    packet ever reaches them. An attached program sits in the kernel's XDP dispatcher: a test
    run with repeat > 1 then calls it the way a driver does without first rebuilding the
    dispatcher, which costs two RCU grace periods (25-45 ms here) per call."""
    with inside(box.netns):
        for name, fd in ((HOLDER, box.program.fd), (f"{HOLDER}p", box.baseline_fd),  # type: ignore[union-attr]
                         (HOLDER_NO_TRACE, box.program_no_trace.fd)):  # type: ignore[union-attr]
            libbpf.xdp_attach(socket.if_nametoindex(name), fd, libbpf.XDP_FLAGS_SKB_MODE)


def _chain_config() -> dict[Endpoint, VipSpec]:
    """VIP i's one backend is VIP i+1's address and port: the packet a forwarding repetition
    writes is the next VIP's packet, so every repetition takes the path being measured."""
    config = {}
    for i in range(CHAIN_LENGTH):
        vip = Endpoint(chain_addr(i), VIP_PORT, "tcp")
        config[vip] = VipSpec(vip, (BackendSpec(chain_addr(i + 1), VIP_PORT),))
    for i in range(V6_CYCLE):
        vip = Endpoint(chain_addr6(i), VIP_PORT, "tcp")
        config[vip] = VipSpec(vip, (BackendSpec(chain_addr6(i + 1), VIP_PORT),))
    config[DSR_VIP] = VipSpec(DSR_VIP, (BackendSpec(chain_addr(0), VIP_PORT),), forwarding="dsr")
    for j in range(FULLNAT_CHAIN):
        vip = Endpoint(chain_addr(j), FULLNAT_VIP_PORT, "tcp")
        config[vip] = VipSpec(vip, (BackendSpec(chain_addr((j + 1) % FULLNAT_CHAIN), FULLNAT_VIP_PORT),),
                              forwarding="fullnat", snat=(FULLNAT_SNAT,),
                              snat_ports=(FULLNAT_PORT + j, FULLNAT_PORT + j))
    return config


@contextmanager
def sandbox() -> Iterator[Sandbox]:
    """The balancer loaded into its own instance (pins under /sys/fs/bpf/lbctl/bench-<hex>/),
    the baseline program, and a namespace lbbench-<hex>; all removed on the way out, on
    Ctrl-C and SIGTERM too."""
    require_root()
    token = secrets.token_hex(4)
    box = Sandbox(f"{INSTANCE_PREFIX}{token}", f"{NETNS_PREFIX}{token}")
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    owner = os.getpid()

    def interrupted(signum: int, frame: object) -> None:
        # pyroute2 forks helpers that inherit this handler: only the bench itself unwinds.
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, interrupted)
    except ValueError:  # not the main thread: Ctrl-C and SIGTERM are someone else's to handle
        in_main_thread = False
    try:
        with console.status("setting up: namespace, balancer instance, baseline program, "
                            f"{CHAIN_LENGTH} chained VIPs..."):
            _build_netns(box)
            box.program = compile_and_load(box.pin_dir, DEFAULT_LIMITS)
            # The same source without the trace hooks, on the same pinned maps.
            box.program_no_trace = compile_and_load(box.pin_dir, DEFAULT_LIMITS,
                                                    defines=(WITHOUT_TRACE,))
            _load_baseline(box)
            _hold_in_dispatcher(box)
            Controller(box.instance, DEFAULT_LIMITS).change(lambda _config: _chain_config())
        yield box
    finally:
        with console.status("cleaning up..."):
            _teardown(box)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _teardown(box: Sandbox) -> None:
    if box.baseline_bpf is not None:
        box.baseline_bpf.cleanup()
    for program in (box.program, box.program_no_trace):
        if program is not None:
            program.bpf.cleanup()  # type: ignore[attr-defined]
    shutil.rmtree(box.pin_dir, ignore_errors=True)
    try:
        os.unlink(os.path.join(LOCK_DIR, f"{box.instance}.lock"))
    except FileNotFoundError:
        pass
    remove_netns(box.netns)


# --- the paths ---

@dataclass(frozen=True)
class Path:
    key: str
    label: str
    uses_baseline: bool
    ingress: str
    batch: int
    frame: Callable[[int], bytes]      # call number -> the frame that call starts from
    expect: str                        # the outcome every repetition must count
    new_flows: bool                    # whether every repetition must create a flow
    without_trace: bool = False        # run the build without the trace hooks
    trace: Filter | None = None        # tracing on with this filter, a consumer reading the ring
    dp_flags: int | None = None        # dp_config's flags during this path (None: as configured)


def _paths() -> list[Path]:
    non_vip = tcp_frame(CLIENT_MAC, CLIENT_ARM_MAC, CLIENT, NON_VIP, HIT_CLIENT_PORT, 22, TCP_ACK)
    hit = tcp_frame(CLIENT_MAC, CLIENT_ARM_MAC, CLIENT, chain_addr(0), HIT_CLIENT_PORT, VIP_PORT,
                    TCP_ACK)
    # The reply of the flow to VIP 0, whose backend is VIP 1's address; reverse NAT makes it
    # the reply of the flow to VIP 63, and so on down the chain.
    reply = tcp_frame(chain_mac(1), CHAIN_ARM_MAC, chain_addr(1), CLIENT, VIP_PORT,
                      HIT_CLIENT_PORT, TCP_ACK)
    hit6 = tcp_frame(CLIENT_MAC, CLIENT_ARM_MAC, CLIENT6, chain_addr6(0), HIT_CLIENT_PORT,
                     VIP_PORT, TCP_ACK)
    reply6 = tcp_frame(chain_mac6(1), CHAIN_ARM_MAC, chain_addr6(1), CLIENT6, VIP_PORT,
                       HIT_CLIENT_PORT, TCP_ACK)
    dsr = tcp_frame(CLIENT_MAC, CLIENT_ARM_MAC, CLIENT, DSR_VIP.addr, HIT_CLIENT_PORT, VIP_PORT, TCP_ACK)
    # Flow 0 of the full-NAT chain: its client is where the last flow's output comes from.
    fullnat_hit = tcp_frame(CLIENT_MAC, CLIENT_ARM_MAC, FULLNAT_SNAT, chain_addr(0),
                            FULLNAT_PORT + FULLNAT_CHAIN - 1, FULLNAT_VIP_PORT, TCP_ACK)
    fullnat_reply = tcp_frame(chain_mac(1), CHAIN_ARM_MAC, chain_addr(1), FULLNAT_SNAT,
                              FULLNAT_VIP_PORT, FULLNAT_PORT, TCP_ACK)
    return [
        Path("baseline", "baseline (MAC swap)", True, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: non_vip, "", False),
        Path("pass_not_vip", "non-VIP pass", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: non_vip, "pass_not_vip", False),
        # The same frame with dp_config's full-NAT flags off, as on a balancer with no
        # full-NAT VIP: the difference is the snat_rnat lookups the flags save every such packet.
        Path("pass_not_vip_no_fullnat", "non-VIP pass, no full-NAT VIP", False, CLIENT_ARM,
             FORWARD_BATCH, lambda _n: non_vip, "pass_not_vip", False, dp_flags=0),
        Path("flow_hit_no_trace", "VIP flow hit, built without trace", False, CLIENT_ARM,
             FORWARD_BATCH, lambda _n: hit, "redirect", False, without_trace=True),
        Path("flow_hit", "VIP flow hit", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: hit, "redirect", False),
        # Every hit matches the filter (the client is the bench's one client): each pays for
        # an event, the worst case of a trace that is on.
        Path("flow_hit_traced", "VIP flow hit, trace on", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: hit, "redirect", False, trace=Filter(client=CLIENT)),
        Path("flow_hit_captured", "VIP flow hit, capture on", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: hit, "redirect", False, trace=Filter(client=CLIENT, frames=True)),
        Path("reply", "reply reverse-NAT", False, CHAIN_ARM, FORWARD_BATCH,
             lambda _n: reply, "redirect", False),
        Path("dsr_hit", "DSR flow hit (MACs only)", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: dsr, "redirect", False),
        Path("fullnat_hit", "full-NAT flow hit", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: fullnat_hit, "redirect", False),
        Path("fullnat_reply", "full-NAT reply", False, CHAIN_ARM, FORWARD_BATCH,
             lambda _n: fullnat_reply, "tx", False),
        Path("new_flow", "VIP new flow", False, CLIENT_ARM, CHAIN_LENGTH,
             lambda n: tcp_frame(CLIENT_MAC, CLIENT_ARM_MAC, CLIENT, chain_addr(0),
                                 NEW_FLOW_FIRST_PORT + n, VIP_PORT, TCP_SYN), "redirect", True),
        Path("flow_hit6", "IPv6 VIP flow hit", False, CLIENT_ARM, FORWARD_BATCH,
             lambda _n: hit6, "redirect", False),
        Path("reply6", "IPv6 reply reverse-NAT", False, CHAIN_ARM, FORWARD_BATCH,
             lambda _n: reply6, "redirect", False),
    ]


def _trimmed_mean(samples: list[int]) -> float:
    ordered = sorted(samples)
    cut = int(len(ordered) * TRIM_SHARE)
    kept = ordered[cut:len(ordered) - cut] or ordered
    return statistics.fmean(kept) + INTEGER_DIVISION_BIAS_NS


def _counters(maps: LbMaps) -> tuple[dict[str, int], int]:
    outcomes = {name: c["packets"] for name, c in maps.global_counters().items()}
    new_flows = sum(maps.vip_counters(i)["new_flows"] for i in range(DEFAULT_LIMITS.max_vips))
    return outcomes, new_flows


@dataclass
class PathRun:
    path: Path
    round_ns: list[float] = field(default_factory=list)
    packets: int = 0
    calls: int = 0
    no_route: int = 0
    events: int = 0                    # trace events the consumer read (traced paths)

    @property
    def ns(self) -> float:
        return statistics.median(self.round_ns)


class _RingConsumer:
    """Tracing switched on with a filter, and a thread reading the ring buffer as `lbctl trace`
    does (libbpf's ring_buffer__poll), counting events; off again and drained on exit."""

    def __init__(self, box: Sandbox, maps: LbMaps, flt: Filter):
        self.switch = TraceSwitch(maps["trace_ctl"])
        self.path = os.path.join(box.pin_dir, "trace_events")
        self.flt = flt
        self.events = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _count(self, _raw: bytes) -> None:
        self.events += 1

    def _run(self, reader: RingReader) -> None:
        while not self._stop.is_set():
            reader.poll(RING_POLL_MS)

    def __enter__(self) -> Self:
        self.reader = RingReader(self.path, self._count)
        self.reader.poll(0)
        self.events = 0
        self.switch.on(self.flt)
        self._thread = threading.Thread(target=self._run, args=(self.reader,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.switch.off()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.reader.poll(0)
        self.reader.close()


def _measure(box: Sandbox, maps: LbMaps, path: Path, packets: int, first_call: int,
             advance: Callable[[], None]) -> tuple[float, int, int, int]:
    """Runs `packets` repetitions (whole calls) of one path; returns (ns per packet, calls,
    repetitions the FIB left to the kernel, trace events read) after checking each
    repetition's outcome."""
    calls = max(1, math.ceil(packets / path.batch))
    program = box.program_no_trace if path.without_trace else box.program
    fd = box.baseline_fd if path.uses_baseline else program.fd  # type: ignore[union-attr]
    ingress = box.ifindex[path.ingress]
    before = None if path.uses_baseline else _counters(maps)
    samples = []
    consumer = _RingConsumer(box, maps, path.trace) if path.trace else None
    with inside(box.netns), consumer or _no_context(), _dp_flags(maps, path.dp_flags):
        for n in range(first_call, first_call + calls):
            result = libbpf.prog_test_run(fd, path.frame(n), repeat=path.batch,
                                          ingress_ifindex=ingress)
            if path.uses_baseline and result.retval != libbpf.XDP_TX:
                raise BenchError(f"baseline program returned {result.retval}, expected XDP_TX")
            samples.append(result.duration_ns)
            advance()
    no_route = 0 if before is None else _check(path, calls * path.batch, before, _counters(maps))
    events = consumer.events if consumer else 0
    if consumer and events == 0:
        raise BenchError(f"path '{path.label}': tracing was on and no event reached the ring; "
                         "hint: the trace filter or the trace hooks changed under the bench")
    return _trimmed_mean(samples), calls, no_route, events


@contextmanager
def _no_context() -> Iterator[None]:
    yield


@contextmanager
def _dp_flags(maps: LbMaps, flags: int | None) -> Iterator[None]:
    """dp_config's flags set to `flags` for one path, then put back as the planner left them."""
    if flags is None:
        yield
        return
    kept = maps.dp_flags()
    maps.put_dp_flags(flags)
    try:
        yield
    finally:
        maps.put_dp_flags(kept)


def _check(path: Path, runs: int, before: tuple[dict[str, int], int],
           after: tuple[dict[str, int], int]) -> int:
    """The bench is only worth its figures if each path took its branch every time. Returns how
    many forwarding repetitions the FIB sent to the kernel instead (a rare NO_NEIGH, likely
    while other namespaces on the machine change the neighbour table): at most 1 in 10,000."""
    moved = {name: after[0][name] - before[0][name] for name in after[0]
             if after[0][name] != before[0][name]}
    new_flows = after[1] - before[1]
    want_new = runs if path.new_flows else 0
    no_route = moved.get("pass_no_route", 0) if path.expect in ("redirect", "tx") else 0
    want = {path.expect: runs - no_route, **({"pass_no_route": no_route} if no_route else {})}
    if moved != want or new_flows != want_new or no_route > runs // MAX_NO_ROUTE_SHARE:
        raise BenchError(
            f"path '{path.label}' did not take its branch on every repetition: {runs} runs "
            f"counted {moved} with {new_flows} new flows, expected {{'{path.expect}': {runs}}} "
            f"with {want_new}; hint: the program or limits changed under the bench: see "
            "docs/dataplane.md, 'Per-packet cost'")
    return no_route


def _warm(box: Sandbox) -> None:
    """Creates the chained flows the hit and reply paths find, the DSR flow and the full-NAT
    chain (established: the frames are ACKs; each full-NAT repetition a new flow claiming its
    VIP's one port, until the chain closes)."""
    paths = {p.key: p for p in _paths()}
    with inside(box.netns):
        for key, length in (("flow_hit", CHAIN_LENGTH), ("flow_hit6", V6_CYCLE), ("dsr_hit", 1),
                            ("fullnat_hit", FULLNAT_CHAIN)):
            libbpf.prog_test_run(box.program.fd, paths[key].frame(0), repeat=length,  # type: ignore[union-attr]
                                 ingress_ifindex=box.ifindex[CLIENT_ARM])


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"kernel": os.uname().release, "cpus": os.cpu_count(), "cpu_model": model}


METHOD = (
    "Each figure is the kernel's own timing of BPF_PROG_TEST_RUN (duration per repetition), "
    f"a trimmed mean over calls, median of {ROUNDS} rounds; every round measures the baseline "
    "too, and the ratio is taken round by round. A test run repeats the program on one buffer "
    "without restoring it, so forwarding paths run on a chain of VIPs (VIP i's backend is VIP "
    f"i+1's address): each repetition's output is the next VIP's packet. Flow hit and reply: "
    f"{FORWARD_BATCH} repetitions per call on established flows; new flow: {CHAIN_LENGTH} "
    "repetitions per call from a fresh client port, each a flow-table miss, a Maglev pick and two "
    "LRU inserts. IPv6 flow hit and reply: the same on a cycle of two IPv6 VIPs. DSR flow hit: an "
    "established flow of a --forwarding dsr VIP, whose output (new MACs only) is the same flow's "
    "packet again. Full-NAT flow hit and reply: a chain of "
    f"{FULLNAT_CHAIN} --forwarding fullnat VIPs, each with one source port, whose outputs are "
    "again the chain's flows and replies. Counters are checked after every path: each "
    "repetition took its branch. "
    "Trace cost: the flow hit of a build without the trace hooks (-DLB_WITHOUT_TRACE, same maps) "
    "against the usual build with tracing off, then on (a filter every packet matches; with and "
    "without the frames capture copies) while a thread reads the ring buffer as `lbctl trace` "
    "does; differences taken round by round."
)


def run_bench(repeat: int = DEFAULT_REPEAT, json_out: str | None = None) -> dict:
    """Measures every path; prints a table with progress; returns (and optionally writes as
    JSON) the figures. `repeat`: packets per path (new flows: at most NEW_FLOW_BUDGET)."""
    if repeat < ROUNDS:
        raise BenchError(f"--repeat {repeat} is too small; hint: use at least {ROUNDS}, "
                         f"e.g. the default {DEFAULT_REPEAT}")
    paths = _paths()
    per_round = {p.key: (min(repeat, NEW_FLOW_BUDGET) if p.new_flows else repeat) // ROUNDS
                 for p in paths}
    runs = {p.key: PathRun(p) for p in paths}
    ratios: dict[str, list[float]] = {p.key: [] for p in paths}
    total_calls = ROUNDS * sum(max(1, math.ceil(per_round[p.key] / p.batch)) for p in paths)
    started = time.monotonic()

    with sandbox() as box, LbMaps(box.pin_dir, DEFAULT_LIMITS) as maps:
        _warm(box)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("test runs", total=total_calls)
            for round_no in range(ROUNDS):
                baseline_ns = 0.0
                for p in paths:
                    progress.update(task, description=f"round {round_no + 1}/{ROUNDS}: {p.label}")
                    run = runs[p.key]
                    ns, calls, no_route, events = _measure(box, maps, p, per_round[p.key],
                                                           run.calls, lambda: progress.advance(task))
                    run.events += events
                    run.round_ns.append(ns)
                    run.calls += calls
                    run.no_route += no_route
                    run.packets += calls * p.batch
                    baseline_ns = ns if p.uses_baseline else baseline_ns
                    ratios[p.key].append(ns / baseline_ns)
                # Every round inserts its new flows into empty tables (hash chains and the LRU
                # free list as at the start), then re-creates the flows the hit paths find.
                progress.update(task, description=f"round {round_no + 1}/{ROUNDS}: flushing flows")
                maps.flush_flows()
                _warm(box)

    result = _report(runs, ratios, time.monotonic() - started)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def _report(runs: dict[str, PathRun], ratios: dict[str, list[float]], elapsed_s: float) -> dict:
    table = Table(title=None)
    for name, justify in (("path", "left"), ("ns/packet", "right"), ("Mpps", "right"),
                          ("x baseline", "right"), ("packets", "right"),
                          ("rounds min-max ns", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    paths_out: dict[str, dict[str, Any]] = {}
    for key, run in runs.items():
        ratio = statistics.median(ratios[key])
        paths_out[key] = {"label": run.path.label, "ns_per_packet": round(run.ns, 2),
                          "mpps": round(1000 / run.ns, 2), "ratio_to_baseline": round(ratio, 2),
                          "packets": run.packets, "round_ns": [round(x, 2) for x in run.round_ns],
                          "fib_no_neighbour": run.no_route}
        if run.path.trace:
            paths_out[key]["trace_events_read"] = run.events
        table.add_row(run.path.label, f"{run.ns:.1f}", f"{1000 / run.ns:.1f}", f"{ratio:.2f}",
                      f"{run.packets:,}", f"{min(run.round_ns):.1f}-{max(run.round_ns):.1f}")
    machine = _machine()
    hit_ratio = statistics.median(ratios["flow_hit"])
    met = hit_ratio <= FLOW_HIT_TARGET_RATIO
    console.print(f"[bold]XDP data plane, ns per packet through BPF_PROG_TEST_RUN[/] "
                  f"(kernel {machine['kernel']}, {machine['cpus']} CPUs, {machine['cpu_model']})")
    console.print(table)
    verdict = "[green]met[/]" if met else "[red]not met[/]"
    console.print(f"flow hit = {hit_ratio:.2f} x baseline (target at most "
                  f"{FLOW_HIT_TARGET_RATIO:g} x): {verdict}")
    console.print(f"Katran's published figures from its own tester: {KATRAN_REFERENCE_NS[0]}-"
                  f"{KATRAN_REFERENCE_NS[1]} ns per packet (other hardware; compare ratios, not ns)")
    trace_cost = _trace_cost(runs)
    off = trace_cost["off_minus_without_ns"]
    verdict = "[green]met[/]" if trace_cost["off_met"] else "[red]not met[/]"
    console.print(f"tracing compiled in, off: {off:+.1f} ns per flow hit against the build without "
                  f"it (ratio {trace_cost['off_ratio']:.3f}; target at most "
                  f"{TRACE_OFF_TARGET_NS:g} ns): {verdict}")
    for key, what in (("traced", "trace on"), ("captured", "capture on")):
        c = trace_cost[key]
        console.print(f"{what}: {c['minus_off_ns']:+.1f} ns per flow hit against off "
                      f"(ratio {c['ratio_to_off']:.2f}); the consumer read {c['events_read']:,} "
                      f"of {c['packets']:,} events ({c['read_share']:.1%}; the rest found the "
                      "ring full)")
    no_route = sum(r.no_route for r in runs.values())
    if no_route:
        console.print(f"{no_route} forwarding repetitions found no neighbour and went to the kernel "
                      "(pass_no_route): likely the neighbour table changing under other namespaces")
    console.print(f"[dim]{METHOD}[/]")
    return {
        "machine": machine,
        "method": METHOD,
        "rounds": ROUNDS,
        "paths": paths_out,
        "flow_hit_target": {"max_ratio": FLOW_HIT_TARGET_RATIO, "ratio": hit_ratio, "met": met},
        "trace_cost": trace_cost,
        "katran_reference_ns": list(KATRAN_REFERENCE_NS),
        "elapsed_s": round(elapsed_s, 1),
    }


def _round_deltas(a: PathRun, b: PathRun) -> tuple[float, float]:
    """Median over rounds of a - b and of a / b: both paths ran in the same round, back to back."""
    return (statistics.median(x - y for x, y in zip(a.round_ns, b.round_ns, strict=True)),
            statistics.median(x / y for x, y in zip(a.round_ns, b.round_ns, strict=True)))


def _trace_cost(runs: dict[str, PathRun]) -> dict[str, Any]:
    """What `lbctl trace` costs a flow hit: compiled in but off against the build without the
    hooks (issue #11's target), and on (every packet matching the filter) against off."""
    off = runs["flow_hit"]
    off_delta, off_ratio = _round_deltas(off, runs["flow_hit_no_trace"])
    out: dict[str, Any] = {"off_minus_without_ns": round(off_delta, 2),
                           "off_ratio": round(off_ratio, 4),
                           "off_target_ns": TRACE_OFF_TARGET_NS,
                           "off_met": off_delta <= TRACE_OFF_TARGET_NS}
    for key in ("traced", "captured"):
        run = runs[f"flow_hit_{key}"]
        delta, ratio = _round_deltas(run, off)
        out[key] = {"minus_off_ns": round(delta, 2), "ratio_to_off": round(ratio, 3),
                    "events_read": run.events, "packets": run.packets,
                    "read_share": round(run.events / run.packets, 4) if run.packets else 0.0}
    return out


__all__ = ["BenchError", "run_bench"]
