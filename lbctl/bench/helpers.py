"""The peer bench's helpers that run inside the lab's namespaces as their own processes (`python
-m lbctl.bench.helpers gen|sink|testrun ...`, started by the runner): the packet generator, the
sink, and the BPF_PROG_TEST_RUN figure of the pinned balancer. Internal: no user calls them."""
from __future__ import annotations

import ctypes
import json
import signal
import socket
import statistics
import sys
import time
from collections.abc import Sequence

from lbctl.bench.spec import PPS_FLOW_BASE, PPS_FLOWS, PPS_PAYLOAD_BYTES, PPS_PORT, TEST_RUN_CALLS
from xdp import frames
from xdp.program import BPF_DIR

GEN_FILE = "bench_gen.c"      # in bpf_programs/
SINK_FILE = "bench_sink.c"
CLIENT_MAC = "02:00:00:00:00:01"  # the test run's made-up sender: the program never checks it


def pps_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int,
              dport: int) -> bytes:
    """The packet-rate workload's 60-byte frame (80 bytes over IPv6): no UDP checksum (0), so
    the generator can change the source port alone."""
    return frames.udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport,
                            bytes(PPS_PAYLOAD_BYTES), checksum=False)


_LIVE_REPEAT_MAX = 2**31 - 1  # the generator stops on a timer signal long before this


def _iface_mac(ifname: str) -> str:
    """The MAC of ifname in this process's network namespace (/sys may be another's)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        return str(ipr.link("get", ifname=ifname)[0].get("IFLA_ADDRESS"))


def gen(ifname: str, dst_mac: str, src_ip: str) -> None:
    """Long-lived generator in the client's namespace: 'run DST_IP DPORT SECONDS [SRC_IP]'
    lines (SRC_IP: the client's address of DST_IP's family when it is not src_ip's)."""
    from bcc import BPF  # type: ignore[import-not-found]

    from xdp import libbpf

    bpf = BPF(src_file=str(BPF_DIR / GEN_FILE).encode(),
              cflags=[f"-DGEN_FLOWS={PPS_FLOWS}", f"-DGEN_FLOW_BASE={PPS_FLOW_BASE}"])
    fn = bpf.load_func(b"gen_udp", BPF.XDP)
    ifindex = socket.if_nametoindex(ifname)
    src_mac = _iface_mac(ifname)
    signal.signal(signal.SIGALRM, lambda *_: None)  # only to interrupt the test run
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        _, dst_ip, dport, seconds, *source = cmd
        frame = pps_frame(src_mac, dst_mac, source[0] if source else src_ip, dst_ip,
                          PPS_FLOW_BASE, int(dport))
        table = bpf[b"gen_template_map"]
        leaf = table.Leaf()
        # The template holds an IPv6 header; an IPv4 frame fills its start.
        template = frame.ljust(ctypes.sizeof(leaf), b"\0")[:ctypes.sizeof(leaf)]
        ctypes.memmove(ctypes.addressof(leaf), template, ctypes.sizeof(leaf))
        table[ctypes.c_int(0)] = leaf
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, float(seconds))
        err = libbpf.prog_test_run_live(fn.fd, frame, ifindex, _LIVE_REPEAT_MAX)
        elapsed = time.monotonic() - t0
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"seconds": elapsed, "errno": err}), flush=True)


def sink(ifname: str) -> None:
    """Long-lived sink in the switch's namespace: 'attach' / 'detach' lines."""
    from bcc import BPF  # type: ignore[import-not-found]

    from xdp import libbpf

    bpf = BPF(src_file=str(BPF_DIR / SINK_FILE).encode(), cflags=[f"-DSINK_PORT={PPS_PORT}"])
    fn = bpf.load_func(b"sink_udp", BPF.XDP)
    ifindex = socket.if_nametoindex(ifname)
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "attach":
                libbpf.xdp_attach(ifindex, fn.fd, libbpf.XDP_FLAGS_DRV_MODE)
            elif cmd == "detach":
                libbpf.xdp_detach(ifindex, libbpf.XDP_FLAGS_DRV_MODE)
            else:
                break
            print("ok", flush=True)
    finally:
        libbpf.xdp_detach(ifindex, libbpf.XDP_FLAGS_DRV_MODE)


def testrun(prog_pin: str, ifname: str, src_ip: str, dst_ip: str, dport: int) -> None:
    """The BPF_PROG_TEST_RUN figure of the pinned balancer program on a tracked UDP flow.

    One run per call: with repeat > 1 the kernel hands every repetition the buffer the last
    one rewrote, so after the first DNAT the program would only see a backend-bound packet
    and time its "not a VIP" pass. Each call's duration includes the kernel's two clock
    reads around the run.
    """
    from xdp import libbpf

    fd = libbpf.obj_get(prog_pin)
    try:
        ifindex = socket.if_nametoindex(ifname)
        frame = pps_frame(CLIENT_MAC, _iface_mac(ifname), src_ip, dst_ip, 40000, dport)
        # The tc build (a sched_cls program) runs on a socket buffer the kernel builds.
        run = (libbpf.prog_test_run_skb if libbpf.prog_info(fd).type == libbpf.BPF_PROG_TYPE_SCHED_CLS
               else libbpf.prog_test_run)
        run(fd, frame, ingress_ifindex=ifindex)  # creates the flow
        durations: list[int] = []
        verdicts: dict[int, int] = {}
        for _ in range(TEST_RUN_CALLS):
            res = run(fd, frame, ingress_ifindex=ifindex)
            durations.append(res.duration_ns)
            verdicts[res.retval] = verdicts.get(res.retval, 0) + 1
        print(json.dumps({"ns_per_packet": statistics.median(durations),
                          "retval": max(verdicts, key=verdicts.__getitem__),
                          "verdicts": verdicts, "calls": TEST_RUN_CALLS}))
    finally:
        libbpf.close(fd)


def main(argv: Sequence[str]) -> int:
    kind, rest = (argv[0], argv[1:]) if argv else ("", [])
    if kind == "gen" and len(rest) == 3:
        gen(rest[0], rest[1], rest[2])
    elif kind == "sink" and len(rest) == 1:
        sink(rest[0])
    elif kind == "testrun" and len(rest) == 5:
        testrun(rest[0], rest[1], rest[2], rest[3], int(rest[4]))
    else:
        print(f"lbctl.bench.helpers: unknown helper call {list(argv)!r}; hint: it is started by "
              "`lbctl bench peers`, not by hand", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
