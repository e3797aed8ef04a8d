"""IPv6 in the map codecs: a backend record carries a v6 address beside the v4 layout, and
endpoints print in the bracket form users type ([2001:db8::10]:80)."""
from __future__ import annotations

import ctypes

import pytest

from lbctl.errors import ConfigError
from lbctl.model import BackendSpec, VipSpec, parse_endpoint, parse_host_port
from lbctl.planner import check_families
from xdp import codec
from xdp.codec import Endpoint


def test_ipv4_backend_record_keeps_its_address_where_the_ipv4_path_reads_it() -> None:
    raw = codec.encode_backend("10.0.1.11", 8080, "active", 3, 2)
    entry = codec.BackendEntry.from_buffer_copy(raw)
    assert bytes(entry)[0:4] == bytes([10, 0, 1, 11])       # network order, offset 0
    assert not entry.flags & codec.BACKEND_F_IPV6
    assert bytes(entry.addr6) == bytes(16)
    assert codec.decode_backend(7, raw) == codec.BackendRecord(7, "10.0.1.11", 8080, "active", 3, 2)


def test_ipv6_backend_record_round_trips_with_its_family_flag() -> None:
    raw = codec.encode_backend("2001:db8:0:2::11", 80, "drain", 1, 5)
    assert len(raw) == ctypes.sizeof(codec.BackendEntry)
    entry = codec.BackendEntry.from_buffer_copy(raw)
    assert entry.flags & codec.BACKEND_F_IPV6 and entry.flags & codec.BACKEND_F_IN_USE
    assert entry.addr == 0
    assert bytes(entry.addr6) == bytes.fromhex("20010db8000000020000000000000011")
    rec = codec.decode_backend(9, raw)
    assert rec == codec.BackendRecord(9, "2001:db8:0:2::11", 80, "drain", 1, 5)


def test_endpoints_print_ipv6_in_brackets_and_ipv4_as_before() -> None:
    assert str(Endpoint("2001:db8::10", 80)) == "[2001:db8::10]:80"
    assert str(Endpoint("10.0.0.10", 80)) == "10.0.0.10:80"
    assert codec.format_endpoint("::1", 53) == "[::1]:53"


# --- parsing: the bracket form, canonical text, one family per VIP ---


@pytest.mark.parametrize("text, addr, port", [
    ("[2001:db8::10]:80", "2001:db8::10", 80),
    ("[2001:DB8:0:0:0:0:0:10]:443", "2001:db8::10", 443),      # canonical (RFC 5952) text
    ("[fd00:77::10]:65535", "fd00:77::10", 65535),
    ("10.0.0.10:80", "10.0.0.10", 80),
])
def test_endpoints_parse_to_canonical_addresses(text: str, addr: str, port: int) -> None:
    hp = parse_host_port(text)
    assert (hp.addr, hp.port) == (addr, port)
    assert str(hp) == (f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")


@pytest.mark.parametrize("text, needle", [
    ("2001:db8::10:80", "needs brackets; hint: [2001:db8::10]:80"),
    ("[2001:db8::10]80", "expected [IPV6]:PORT"),
    ("[10.0.0.10]:80", "not an IPv6 address"),
    ("[2001:db8::10]:0", "not in 1-65535"),
    ("[::]:80", "not a global or unique-local unicast address"),
    ("[fe80::1%eth0]:80", "zone"),
    ("[::ffff:10.0.0.1]:80", "not a global or unique-local unicast address"),
])
def test_bad_ipv6_endpoints_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="hint") as exc:
        parse_host_port(text, "VIP")
    assert needle in str(exc.value)


def test_a_vip_and_its_backends_must_share_a_family() -> None:
    v6 = parse_endpoint("[2001:db8::10]:80")
    v4 = parse_endpoint("10.0.0.10:80")
    check_families({v6: VipSpec(v6, (BackendSpec("2001:db8:2::11", 80),)),
                    v4: VipSpec(v4, (BackendSpec("10.0.1.11", 80),))})
    with pytest.raises(ConfigError, match=r"backend 10\.0\.1\.11:80 is IPv4 but VIP "
                                          r"\[2001:db8::10\]:80 is IPv6; hint: .*one address family"):
        check_families({v6: VipSpec(v6, (BackendSpec("10.0.1.11", 80),))})
    with pytest.raises(ConfigError, match=r"backend \[2001:db8:2::11\]:80 is IPv6 but VIP"):
        check_families({v4: VipSpec(v4, (BackendSpec("2001:db8:2::11", 80),))})


def test_an_ipv6_vip_runs_in_every_mode_and_its_snat_addresses_share_its_family() -> None:
    v6 = parse_endpoint("[2001:db8::10]:80")
    for mode in ("nat", "dsr", "fullnat"):
        check_families({v6: VipSpec(v6, (BackendSpec("2001:db8:2::11", 80),), forwarding=mode)})
    check_families({v6: VipSpec(v6, forwarding="fullnat", snat=("2001:db8:1::2",))})
    with pytest.raises(ConfigError, match=r"SNAT address 10\.0\.1\.2 is IPv4 but VIP \[2001:db8::10\]:80 "
                                          r"is IPv6; hint: .*share its address family"):
        check_families({v6: VipSpec(v6, forwarding="fullnat", snat=("10.0.1.2",))})