"""xdp/frames.py, the one frame builder of explain, the benches and the tests: every length and
checksum it writes is what scapy (an independent implementation) computes for the same packet."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from xdp import frames

SRC_MAC, DST_MAC = "02:00:0a:00:00:01", "02:00:0a:00:00:02"


def rebuilt_by_scapy(frame: bytes) -> bytes:
    """The same packet with every length and checksum left to scapy to compute."""
    pkt = Ether(frame)
    for layer in (IP, TCP, UDP):
        if layer in pkt:
            del pkt[layer].chksum
            if layer in (IP, UDP):
                del pkt[layer].len
    return bytes(pkt)


def test_rfc1071_example_sums_to_the_published_value():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement).
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert frames.internet_checksum(data) == 0xFFFF - 0xDDF2
    assert frames.ones_sum(data + (0xFFFF - 0xDDF2).to_bytes(2, "big")) == 0


@pytest.mark.parametrize("kwargs", [
    {},
    {"flags": frames.TCP_SYN, "payload": b"GET / HTTP/1.1\r\n\r\n"},
    {"tcp_options": b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07\x00\x00", "ttl": 1},
    {"ip_options": b"\x94\x04\x00\x00", "payload": b"odd", "frag": frames.IP_DF},
])
def test_tcp_frame_lengths_and_checksums_match_scapy(kwargs):
    frame = frames.tcp_frame(SRC_MAC, DST_MAC, "10.0.1.2", "10.0.0.10", 40000, 80, **kwargs)
    assert frame == rebuilt_by_scapy(frame)
    pkt = Ether(frame)
    assert (pkt.src, pkt.dst) == (SRC_MAC, DST_MAC)
    assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].sport, pkt[TCP].dport) == (
        "10.0.1.2", "10.0.0.10", 40000, 80)


def test_udp_frame_lengths_and_checksums_match_scapy():
    frame = frames.udp_frame(SRC_MAC, DST_MAC, "10.0.1.2", "10.0.0.53", 33000, 53, b"query")
    assert frame == rebuilt_by_scapy(frame)
    assert Ether(frame)[UDP].len == 8 + 5


def test_udp_without_checksum_sends_zero():
    frame = frames.udp_frame(SRC_MAC, DST_MAC, "10.0.1.2", "10.0.0.53", 33000, 53, b"q",
                             checksum=False)
    assert Ether(frame)[UDP].chksum == 0
    assert frames.ones_sum(frame[14:34]) == 0  # the IP header still checksums right


def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff():
    # Find a payload word that brings the sum to zero: UDP must then send 0xffff (0 = none).
    base = frames.udp_frame(SRC_MAC, DST_MAC, "10.0.1.2", "10.0.0.53", 33000, 53, b"\0\0")
    word = int.from_bytes(base[40:42], "big")
    frame = frames.udp_frame(SRC_MAC, DST_MAC, "10.0.1.2", "10.0.0.53", 33000, 53,
                             word.to_bytes(2, "big"))
    assert frame[40:42] == b"\xff\xff"
    assert frames.ones_sum(frames.pseudo_header("10.0.1.2", "10.0.0.53", 17, 10)
                           + frame[34:]) == 0


def test_first_fragment_udp_length_covers_the_whole_datagram():
    frame = frames.udp_frame(SRC_MAC, DST_MAC, "10.0.1.2", "10.0.0.53", 33000, 53, bytes(8),
                             length=1480, frag=frames.IP_MF, ident=7)
    pkt = Ether(frame)
    assert pkt[UDP].len == 1480 and pkt[IP].flags == "MF" and pkt[IP].id == 7
    assert pkt[IP].len == 20 + 16


@pytest.mark.parametrize("call, match", [
    (lambda: frames.mac_bytes("02:00:00"), "not a MAC"),
    (lambda: frames.ipv4_bytes("10.0.0.256"), "not an IPv4"),
    (lambda: frames.tcp_segment("10.0.0.1", "10.0.0.2", 1, 2, options=b"\x01"), "32-bit"),
    (lambda: frames.ipv4_packet("10.0.0.1", "10.0.0.2", 6, b"", options=bytes(44)), "40 bytes"),
])
def test_malformed_requests_are_refused_not_packed(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ipv6_tcp_and_udp_frames_match_scapy_byte_for_byte() -> None:
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    from xdp import frames

    mine = frames.tcp_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "2001:db8::1", "2001:db8::2",
                            40000, 80, flags=frames.TCP_SYN, seq=7, payload=b"hi", ttl=33)
    theirs = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                   IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=33) /
                   TCP(sport=40000, dport=80, flags="S", seq=7, ack=0, window=frames.TCP_WINDOW) / b"hi")
    assert mine == theirs
    mine = frames.udp_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "fd00::1", "fd00::2",
                            5353, 53, b"query")
    theirs = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                   IPv6(src="fd00::1", dst="fd00::2", hlim=frames.DEFAULT_TTL) /
                   UDP(sport=5353, dport=53) / b"query")
    assert mine == theirs
