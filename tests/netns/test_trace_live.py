"""`lbctl trace` and `lbctl capture` against real traffic in a lab: a known connection's packets
in order with their outcomes, tracing switched off after a kill -9 of the tracer (noticed by the
next trace and by doctor), and a capture of 10 connections that scapy and tcpdump read with both
sides of every rewrite."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from labcli import (
    assert_nat_connection_traced,
    lab_up,
    lbctl,
    start_tracer,
    traced_connection,
    tracer_pid,
)
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from lbctl.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds namespaces and attaches XDP")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up("dr", http_vip=True) as the_lab:
        yield the_lab


def test_trace_shows_a_connection_in_order_with_its_outcomes(lab: Lab) -> None:
    assert_nat_connection_traced(lab, traced_connection(lab))
    assert tracer_pid(lab) == 0, "tracing must be off once --count is reached"


def test_a_killed_tracer_is_noticed_and_cleared(lab: Lab) -> None:
    proc = start_tracer(lab, "trace")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert tracer_pid(lab) == proc.pid, "kill -9 leaves the flag on: the case under test"
    report = lbctl(lab, "doctor", "--json", check=False)
    stale = [c for c in json.loads(report.stdout)["checks"] if c["name"] == "trace_off"]
    assert report.returncode == 1 and not stale[0]["ok"] and f"pid {proc.pid}" in stale[0]["evidence"]
    assert tracer_pid(lab) == 0
    # The next trace notices it too.
    proc = start_tracer(lab, "trace")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    nxt = start_tracer(lab, "trace", "--client", lab.client.addr, "--count", "1")
    try:
        lab.http_requests(lab.vip, count=1)
        _, err = nxt.communicate(timeout=60)
    finally:
        nxt.kill()
    assert f"left on by pid {proc.pid}" in err


@pytest.fixture(scope="module")
def ten_connections(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file `lbctl capture` wrote while 10 HTTP connections went through the VIP."""
    path = tmp_path_factory.mktemp("capture") / "lb.pcapng"
    proc = start_tracer(lab, "capture", "-w", str(path), "--vip", f"{lab.vip}:{lab.http_port}")
    try:
        results = lab.http_requests(lab.vip, count=10)
        assert all(r.ok for r in results)
        time.sleep(0.5)   # the last FIN-ACKs reach the ring; nothing is asserted about time
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert tracer_pid(lab) == 0
    return path


def test_capture_of_ten_connections_holds_both_sides_of_each_rewrite(lab: Lab,
                                                                     ten_connections: Path) -> None:
    packets = rdpcap(str(ten_connections))
    before = [p for p in packets if p.comment.startswith(b"before:")]
    after = [p for p in packets if p.comment.startswith(b"after:")]
    assert {p.sniffed_on for p in before} == {"before"} and {p.sniffed_on for p in after} == {"after"}
    backends = {b.addr for b in lab.backends}
    syns_in = {p[TCP].sport for p in before
               if p[TCP].flags == "S" and p[IP].dst == lab.vip and p[TCP].dport == lab.http_port}
    syns_out = {p[TCP].sport for p in after if p[TCP].flags == "S" and p[IP].dst in backends}
    assert len(syns_in) == 10 and syns_out == syns_in
    # Replies: a backend's SYN-ACK before, the VIP's after.
    synacks_in = {p[TCP].dport for p in before if p[TCP].flags == "SA" and p[IP].src in backends}
    synacks_out = {p[TCP].dport for p in after if p[TCP].flags == "SA" and p[IP].src == lab.vip}
    assert synacks_in == synacks_out == syns_in


# A packet from `tcpdump -r -nn -vv`: IP header fields (its checksum checked), then "src.port >
# dst.port: Flags [..], cksum 0x.... (correct|incorrect ...), seq N" (no cksum for a segment cut
# short by the capture's 128-byte snapshot).
_TCPDUMP_PACKET = re.compile(r"^(?=\d\d:\d\d:\d\d\.\d+ )", re.MULTILINE)
_TCPDUMP_SEGMENT = re.compile(
    r"(?P<src>\d+\.\d+\.\d+\.\d+)\.(?P<sport>\d+) > (?P<dst>\d+\.\d+\.\d+\.\d+)\.(?P<dport>\d+): "
    r"Flags \[(?P<flags>[^\]]*)\](?:, cksum 0x[0-9a-f]+ \((?P<cksum>[^)]*)\))?, seq (?P<seq>\d+)")


def test_tcpdump_reads_the_capture_with_both_sides_of_each_rewrite(lab: Lab,
                                                                  ten_connections: Path) -> None:
    """Debian's tcpdump, as a user would run it on an XDP host, reads the file `lbctl capture`
    wrote: every packet, each SYN to the VIP next to the same SYN (same client port and sequence
    number) to a backend, each backend's SYN-ACK next to the VIP's, and the checksums the
    program rewrote verified correct by tcpdump itself."""
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is missing: bash lbctl/setup.sh test installs it"
    proc = subprocess.run([tcpdump, "-r", str(ten_connections), "-nn", "-vv"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "link-type EN10MB" in proc.stderr
    # A packet: its timestamp line and the indented lines after it (decoded payload too).
    lines = [" ".join(p.split()) for p in _TCPDUMP_PACKET.split(proc.stdout) if p.strip()]
    assert len(lines) == len(rdpcap(str(ten_connections)))
    assert not [line for line in lines if "bad cksum" in line]   # IP header checksums
    segments = [m.groupdict() for m in map(_TCPDUMP_SEGMENT.search, lines) if m]
    assert len(segments) == len(lines)
    backends = {b.addr for b in lab.backends}
    vip, port = lab.vip, str(lab.http_port)

    def keyed(flags: str, want: Callable[[dict[str, str]], bool], by: str) -> dict[str, str]:
        return {s[by]: s["seq"] for s in segments if s["flags"] == flags and want(s)}

    syns_to_vip = keyed("S", lambda s: s["dst"] == vip and s["dport"] == port, "sport")
    syns_to_backend = keyed("S", lambda s: s["dst"] in backends and s["dport"] == port, "sport")
    assert len(syns_to_vip) == 10 and syns_to_backend == syns_to_vip
    synacks_from_backend = keyed("S.", lambda s: s["src"] in backends, "dport")
    synacks_from_vip = keyed("S.", lambda s: s["src"] == vip and s["sport"] == port, "dport")
    assert synacks_from_vip == synacks_from_backend and set(synacks_from_vip) == set(syns_to_vip)
    # Whole segments (no payload cut by the 128-byte snapshot) carry a TCP checksum tcpdump
    # can verify: every SYN and SYN-ACK, before the rewrite and after it.
    handshakes = [s for s in segments if s["flags"] in ("S", "S.")]
    assert len(handshakes) == 40 and all(s["cksum"] == "correct" for s in handshakes), handshakes
