"""`lbctl trace` / `capture` / `doctor` without root: bad filters are refused before anything
runs, event lines read as documented, and the pcapng writer's output opens in scapy with each
frame on its side (before / after) and its comment."""
from __future__ import annotations

import io

from click.testing import CliRunner
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgReader

from lbctl import capture, trace
from lbctl.cli import main
from xdp.tracing import Event, Tuple


def _event(kind: str, outcome: str, action: str, before: bytes, after: bytes) -> Event:
    return Event(ts_ns=1_000_000_000, ifindex=10**6, action=action, outcome=outcome, kind=kind,
                 backend_id=3, frame_len=len(before),
                 tuple_in=Tuple("10.0.2.5", 40000, "10.0.0.10", 80, "tcp"),
                 tuple_out=Tuple("10.0.2.5", 40000, "10.0.1.11", 8080, "tcp"),
                 before=before, after=after)


def test_bad_filters_are_refused_with_a_hint() -> None:
    runner = CliRunner()
    for args, word in ((["trace", "--client", "10.0.2"], "client '10.0.2'"),
                       (["trace", "--backend", "10.0.1.11:99999"], "backend '10.0.1.11:99999'"),
                       (["trace", "--vip", "nohost"], "nohost"),
                       (["trace", "--count", "0"], "0"),
                       (["doctor", "10.0.0.10"], "10.0.0.10")):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert word in result.output
    result = runner.invoke(main, ["capture", "--count", "3"])
    assert result.exit_code == 2 and "-w" in result.output


def test_event_lines_name_the_outcome_and_backend() -> None:
    hit = _event("flow_hit", "redirect", "redirect", b"", b"")
    assert trace.describe(hit) == "flow hit"
    assert trace.describe(_event("pass", "pass_not_vip", "pass", b"", b"")) == "pass (not_vip)"
    assert trace.describe(_event("drop", "drop_no_backend", "drop", b"", b"")) == "drop (no_backend)"
    text = trace.line(hit, {3: "10.0.1.11:8080"})
    assert "10.0.2.5:40000 -> 10.0.0.10:80 tcp" in text
    assert text.endswith("10.0.2.5:40000 -> 10.0.1.11:8080 tcp  backend 10.0.1.11:8080")


def test_pcapng_holds_both_sides_marked() -> None:
    before = bytes(Ether() / IP(src="10.0.2.5", dst="10.0.0.10") / TCP(sport=40000, dport=80, flags="S"))
    after = bytes(Ether() / IP(src="10.0.2.5", dst="10.0.1.11") / TCP(sport=40000, dport=8080, flags="S"))
    out = io.BytesIO()
    writer = capture.PcapngWriter(out)
    ev = _event("new_flow", "redirect", "redirect", before, after)
    assert capture.write_event(writer, ev, {3: "10.0.1.11:8080"}, offset_ns=0) == 2
    assert capture.write_event(writer, _event("pass", "pass_not_vip", "pass", before, b""), {}, 0) == 1
    out.seek(0)
    packets = list(PcapNgReader(out))
    assert [p.sniffed_on for p in packets] == ["before", "after", "before"]
    assert [bytes(p) for p in packets] == [before, after, before]
    assert packets[0].comment.startswith(b"before: ") and b"new flow" in packets[0].comment
    assert packets[1][IP].dst == "10.0.1.11" and packets[1].comment.startswith(b"after: ")
    assert float(packets[0].time) == 1.0
