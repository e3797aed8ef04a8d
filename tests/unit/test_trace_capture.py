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


def test_ipv6_filters_are_taken_in_bracket_form_and_canonical() -> None:
    from lbctl.cli import VIP, AddrType, trace_filter

    backend, client = AddrType("backend", port=True), AddrType("client", port=False)
    assert backend.convert("[2001:DB8:1::11]:8080", None, None) == ("2001:db8:1::11", 8080)
    assert backend.convert("[2001:db8:1::11]", None, None) == ("2001:db8:1::11", 0)
    assert backend.convert("2001:db8:1::11", None, None) == ("2001:db8:1::11", 0)
    assert backend.convert("10.0.1.11:8080", None, None) == ("10.0.1.11", 8080)
    assert client.convert("2001:db8:0::5", None, None) == ("2001:db8::5", 0)
    flt = trace_filter(VIP.convert("[2001:db8::10]:80", None, None), "udp",
                       ("2001:db8::5", 0), ("2001:db8:1::11", 53))
    ctl = flt.ctl(owner_pid=1)
    assert (ctl.vip_family, ctl.client_family, ctl.backend_family) == (6, 6, 6)
    assert bytes(ctl.vip_addr) == bytes.fromhex("20010db8000000000000000000000010")
    assert ctl.vip_proto == 17
    v4 = trace_filter(None, "tcp", ("10.0.2.5", 0), None).ctl(owner_pid=1)
    assert (v4.vip_family, v4.client_family, v4.backend_family) == (0, 4, 0)
    assert bytes(v4.client_addr) == bytes([10, 0, 2, 5]) + bytes(12)


def test_bad_ipv6_filters_are_one_line_exit_2() -> None:
    runner = CliRunner()
    for args, word in ((["trace", "--backend", "[10.0.1.11]:80"], "[10.0.1.11]:80"),
                       (["trace", "--backend", "[2001:db8::11"], "[2001:db8::11"),
                       (["trace", "--backend", "[2001:db8::11]:0"], "[2001:db8::11]:0"),
                       (["trace", "--backend", "[2001:db8::11]8080"], "[2001:db8::11]8080"),
                       (["trace", "--client", "2001:db8::zz"], "2001:db8::zz"),
                       (["trace", "--client", "[2001:db8::5]:80"], "[2001:db8::5]:80"),
                       (["trace", "--client", "fe80::1%eth0"], "fe80::1%eth0"),
                       (["trace", "--vip", "[2001:db8::10"], "[2001:db8::10"),
                       (["capture", "-w", "x.pcapng", "--vip", "2001:db8::10:80"], "2001:db8::10:80")):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert word in result.output and "hint" in result.output, (args, result.output)


def test_ipv6_tuples_read_in_bracket_form() -> None:
    t = Tuple("2001:db8::5", 40000, "2001:db8::10", 80, "tcp")
    assert str(t) == "[2001:db8::5]:40000 -> [2001:db8::10]:80 tcp"
    assert str(Tuple("2001:db8::5", 0, "2001:db8::10", 0, "icmpv6")) == "2001:db8::5 -> 2001:db8::10 icmpv6"
    assert str(Tuple("", 0, "", 0, "-")) == "(not IP)"


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
