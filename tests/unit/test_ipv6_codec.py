"""IPv6 in the map codecs: a backend record carries a v6 address beside the v4 layout, and
endpoints print in the bracket form users type ([2001:db8::10]:80)."""
from __future__ import annotations

import ctypes

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
