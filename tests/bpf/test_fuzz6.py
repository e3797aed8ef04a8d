"""Hostile IPv6 input: seeded random and mutated IPv6 frames (VIP traffic, tracked replies,
neighbour discovery, extension headers, fragments, ICMPv6 errors, lies in every length) through
BPF_PROG_TEST_RUN, each judged against a Python reading of the IPv6 policy (docs/modes.md): no
XDP_ABORTED, nothing but VIP traffic, tracked replies and ICMPv6 errors about them rewritten,
every rewrite whole with its checksum as right as it came in, every frame counted once."""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from test_fuzz import mixed

from lbctl.bench.routed import Port
from lbctl.control import Controller
from lbctl.model import BackendSpec, VipSpec
from lbctl.netns import inside
from xdp import frames, libbpf
from xdp.codec import Endpoint
from xdp.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX
from xdp.maps import LbMaps
from xdp.program import LoadedProgram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")
NETNS_PREFIX = "v6"      # this stream's namespaces

FUZZ_SEED = int(os.environ.get("LBCTL_FUZZ_SEED", "20261202"))
FUZZ_FRAMES = int(os.environ.get("LBCTL_FUZZ6_FRAMES", "30000"))

CLIENT_ARM, CLIENT_ARM_MAC = "f6c", "02:00:06:1e:01:01"
BACKEND_ARM, BACKEND_ARM_MAC = "f6b", "02:00:06:1e:02:01"
CLIENTS = ("fd00:61:1::100", "fd00:61:1::101", "fd00:61:1::102")
UNRESOLVED_CLIENT = "fd00:61:1::199"
TCP_VIP = Endpoint("fd00:61:9::1", 80, "tcp")
UDP_VIP = Endpoint("fd00:61:9::1", 53, "udp")
EMPTY_VIP = Endpoint("fd00:61:9::2", 443, "tcp")
TCP_BACKENDS = (Endpoint("fd00:61:2::11", 8080, "tcp"), Endpoint("fd00:61:2::12", 8080, "tcp"))
UDP_BACKENDS = (Endpoint("fd00:61:2::21", 5353, "udp"),)
VIPS = {TCP_VIP: TCP_BACKENDS, UDP_VIP: UDP_BACKENDS, EMPTY_VIP: ()}
NON_VIP_DESTINATIONS = ("fd00:61:1::1", "fd00:61:2::1", "fd00:61:9::99", "ff02::1",
                        "2001:db8::1", TCP_BACKENDS[0].addr)
TCP, UDP, ICMPV6 = 6, 17, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
ETH_LEN, IP6_LEN = 14, 40


def mac_of6(addr: str) -> str:
    return "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.IPv6Address(addr).packed[-4:])


PORTS = (
    Port(CLIENT_ARM, CLIENT_ARM_MAC, "10.61.1.1/24", {c: mac_of6(c) for c in CLIENTS},
         cidr6="fd00:61:1::1/64"),
    Port(BACKEND_ARM, BACKEND_ARM_MAC, "10.61.2.1/24",
         {b.addr: mac_of6(b.addr) for b in (*TCP_BACKENDS, *UDP_BACKENDS)},
         cidr6="fd00:61:2::1/64"),
)
ARM_MACS = {bytes.fromhex(p.mac.replace(":", "")) for p in PORTS}


@pytest.fixture
def fresh(controller: Controller, clean_dataplane: Callable[[], None]) -> None:
    config = {vip: VipSpec(vip, tuple(BackendSpec(b.addr, b.port) for b in backends))
              for vip, backends in VIPS.items()}
    controller.change(lambda _config: config)
    clean_dataplane()


# --- frames, packed by hand (scapy would take minutes) ---

def a6(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    pseudo = src + dst + struct.pack("!IxxxB", len(segment), proto)
    return frames.internet_checksum(pseudo + segment)


def build6(src_mac: str, dst_mac: str, src: str, dst: str, proto: int, body: bytes, *,
           hlim: int = 64, ext: bytes = b"", first_nh: int | None = None) -> bytes:
    """Ethernet + IPv6 (+ extension headers, chained by the caller) + an L4 body whose
    checksum the caller has set."""
    payload = ext + body
    nh = proto if first_nh is None else first_nh
    ip = struct.pack("!IHBB", 6 << 28, len(payload), nh, hlim) + a6(src) + a6(dst)
    return frames.mac_bytes(dst_mac) + frames.mac_bytes(src_mac) + b"\x86\xdd" + ip + payload


def tcp6(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b"",
         options: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 0x1000, 0x2000, doff << 4, flags, 64240, 0, 0)
    seg = hdr + options + payload
    check = l4_checksum(a6(src), a6(dst), TCP, seg)
    return seg[:16] + struct.pack("!H", check) + seg[18:]


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    check = l4_checksum(a6(src), a6(dst), UDP, seg)
    return seg[:6] + struct.pack("!H", check) + seg[8:]


def icmp6(src: str, dst: str, type_: int, code: int, rest: bytes) -> bytes:
    msg = struct.pack("!BBHI", type_, code, 0, 1280 if type_ == 2 else 0) + rest
    check = l4_checksum(a6(src), a6(dst), ICMPV6, msg)
    return msg[:2] + struct.pack("!H", check) + msg[4:]


def ext_chain(kinds: Sequence[int], last: int) -> tuple[int, bytes]:
    """(first next-header, bytes) of a chain of 8-byte extension headers ending at `last`."""
    out = b""
    nexts = list(kinds[1:]) + [last]
    for kind, nxt in zip(kinds, nexts):
        if kind == ROUTING:
            out += struct.pack("!BBBB", nxt, 0, 0, 0) + bytes(4)
        elif kind == FRAGMENT:
            out += struct.pack("!BBHI", nxt, 0, 1, 7)
        else:
            out += struct.pack("!BB", nxt, 0) + b"\x01\x04" + bytes(4)   # PadN
    return (kinds[0] if kinds else last), out


# --- the reference reading of a frame (lb_parse6's policy, same order of checks) ---

@dataclass(frozen=True)
class Parsed6:
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    hlim: int
    l4: int            # offset of the L4 header in the frame
    l4_len: int        # bytes the L4 checksum covers (of a first fragment: the bytes here)
    check_at: int
    first_fragment: tuple[int, bool] | None = None   # (identification, more fragments follow)


@dataclass(frozen=True)
class Later6:
    """A later fragment of a TCP/UDP datagram: no ports, its first fragment decides."""
    key: tuple[str, str, int, int]      # src, dst, identification, protocol
    hlim: int


@dataclass(frozen=True)
class Icmp6:
    type_: int
    l4: int
    l4_len: int
    hlim: int


def read6(frame: bytes) -> str | Parsed6 | Icmp6 | Later6:
    if len(frame) < ETH_LEN + IP6_LEN:
        return "pass_malformed"
    if frame[14] >> 4 != 6:
        return "pass_malformed"
    (payload_len,) = struct.unpack_from("!H", frame, 18)
    end = ETH_LEN + IP6_LEN + payload_len
    if end > len(frame):
        return "pass_malformed"
    nh, off = frame[20], ETH_LEN + IP6_LEN
    for _ in range(4):
        if nh not in (HOPOPTS, DSTOPTS, ROUTING):
            break
        if off + 4 > len(frame) or off + 4 > end:
            return "pass_malformed"
        if nh == ROUTING and frame[off + 3]:
            return "pass_ext_header"
        nh, off = frame[off], off + (frame[off + 1] + 1) * 8
    if off > end:
        return "pass_malformed"
    first_fragment = None
    if nh == FRAGMENT:
        if off + 8 > len(frame) or off + 8 > end:
            return "pass_malformed"
        nh, _, frag_off, frag_id = struct.unpack_from("!BBHI", frame, off)
        if nh not in (TCP, UDP):
            return "pass_fragment"
        if frag_off & 0xfff8:
            return Later6((str(ipaddress.IPv6Address(frame[22:38])),
                           str(ipaddress.IPv6Address(frame[38:54])), frag_id, nh), frame[21])
        first_fragment, off = (frag_id, bool(frag_off & 1)), off + 8
    more = first_fragment is not None and first_fragment[1]
    if nh in (HOPOPTS, DSTOPTS, ROUTING, AH):
        return "pass_ext_header"
    if nh == ICMPV6:
        return Icmp6(frame[off] if off < len(frame) else -1, off, end - off, frame[21])
    if nh not in (TCP, UDP):
        return "pass_not_vip"
    l4_len = end - off
    if nh == TCP:
        if off + 20 > len(frame):
            return "pass_malformed"
        doff = (frame[off + 12] >> 4) * 4
        if doff < 20 or doff > l4_len:
            return "pass_malformed"
        check_at, covered = off + 16, l4_len
    else:
        if off + 8 > len(frame) or l4_len < 8:
            return "pass_malformed"
        (udp_len,) = struct.unpack_from("!H", frame, off + 4)
        if udp_len < 8 or (udp_len > l4_len and not more):
            return "pass_malformed"
        check_at, covered = off + 6, l4_len if more else udp_len
    sport, dport = struct.unpack_from("!HH", frame, off)
    return Parsed6(nh, str(ipaddress.IPv6Address(frame[22:38])), str(ipaddress.IPv6Address(frame[38:54])),
                   sport, dport, frame[21], off, covered, check_at,
                   first_fragment if more else None)


def residual(frame: bytes, proto: int, l4: int, covered: int) -> int:
    pseudo = frame[22:54] + struct.pack("!IxxxB", covered, proto)
    return frames.ones_sum(pseudo + frame[l4:l4 + covered])


# --- the source of frames ---

@dataclass
class Sample:
    frame: bytes
    ingress: str


class Source:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.replies: list[tuple[Endpoint, str, int]] = []   # backend, client, client port
        self.vip_tuples: list[tuple[Endpoint, str, int]] = []  # vip, client, client port
        self.later: list[Sample] = []   # later fragments of datagrams whose first was sent

    def _client(self) -> str:
        return self.rng.choice(CLIENTS) if self.rng.random() < 0.95 else UNRESOLVED_CLIENT

    def _ext(self) -> list[int]:
        r = self.rng
        roll = r.random()
        if roll < 0.8:
            return []
        return [r.choice((HOPOPTS, DSTOPTS, ROUTING, DSTOPTS, FRAGMENT, AH))
                for _ in range(r.randint(1, 5))]

    def _l4(self, src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
        r = self.rng
        if proto == TCP:
            return tcp6(src, dst, sport, dport, r.choice((0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12)),
                        r.randbytes(r.choice((0, 0, 7, 64))),
                        r.choice((b"", b"\x02\x04\x05\xa0")))
        return udp6(src, dst, sport, dport, r.randbytes(r.choice((0, 5, 100))))

    def _frame(self, src_mac: str, dst_mac: str, src: str, dst: str, proto: int, body: bytes) -> bytes:
        kinds = self._ext()
        first, chain = ext_chain(kinds, proto)
        return build6(src_mac, dst_mac, src, dst, proto, body, ext=chain, first_nh=first,
                      hlim=self.rng.choice((64, 64, 64, 255, 2, 1, 0)))

    def to_vip(self) -> Sample:
        r = self.rng
        vip = r.choice((TCP_VIP, TCP_VIP, UDP_VIP, EMPTY_VIP))
        client = self._client()
        proto = TCP if vip.proto == "tcp" else UDP
        sport = r.randrange(40000, 40048)
        frame = self._frame(mac_of6(client), CLIENT_ARM_MAC, client, vip.addr, proto,
                            self._l4(client, vip.addr, proto, sport, vip.port))
        return Sample(frame, CLIENT_ARM if r.random() < 0.9 else BACKEND_ARM)

    def reply(self) -> Sample:
        r = self.rng
        if not self.replies:
            return self.to_vip()
        backend, client, port = r.choice(self.replies)
        proto = TCP if backend.proto == "tcp" else UDP
        frame = self._frame(mac_of6(backend.addr), BACKEND_ARM_MAC, backend.addr, client, proto,
                            self._l4(backend.addr, client, proto, backend.port, port))
        return Sample(frame, BACKEND_ARM)

    def icmp_error(self) -> Sample:
        """An ICMPv6 error quoting a tracked flow's packet (either way), or a random one."""
        r = self.rng
        if self.replies and r.random() < 0.8:
            backend, client, port = r.choice(self.replies)
            proto = TCP if backend.proto == "tcp" else UDP
            vip = TCP_VIP if proto == TCP else UDP_VIP
            if r.random() < 0.5:   # from the backend, quoting client -> backend
                quote = build6("00:00:00:00:00:00", "00:00:00:00:00:00", client, backend.addr,
                               proto, self._l4(client, backend.addr, proto, port, backend.port))[14:]
                src, dst, ingress = backend.addr, client, BACKEND_ARM
            else:                  # from a router near the client, quoting VIP -> client
                quote = build6("00:00:00:00:00:00", "00:00:00:00:00:00", vip.addr, client,
                               proto, self._l4(vip.addr, client, proto, vip.port, port))[14:]
                src, dst, ingress = "fd00:61:1::fe", vip.addr, CLIENT_ARM
        else:
            quote = r.randbytes(r.choice((8, 48, 60)))
            src, dst, ingress = self._client(), r.choice((TCP_VIP.addr, CLIENTS[0])), CLIENT_ARM
        quote = quote[:r.choice((len(quote), len(quote), 44, 48, 50))]
        body = icmp6(src, dst, r.choice((1, 2, 3, 4)), 0, quote)
        return Sample(build6(mac_of6(src), CLIENT_ARM_MAC if ingress == CLIENT_ARM else BACKEND_ARM_MAC,
                             src, dst, ICMPV6, body, hlim=r.choice((64, 64, 1))), ingress)

    def fragmented(self) -> Sample:
        """The first fragment of a UDP datagram (to the UDP VIP, a tracked reply, or no VIP);
        its later fragments wait in self.later, to come after it, reordered, or never."""
        r = self.rng
        roll = r.random()
        if roll < 0.5 or not self.replies:
            client = self._client()
            dst, sport, dport = (UDP_VIP.addr if roll < 0.4 else r.choice(NON_VIP_DESTINATIONS),
                                 r.randrange(40000, 40048), UDP_VIP.port)
            src, src_mac, dst_mac, ingress = client, mac_of6(client), CLIENT_ARM_MAC, CLIENT_ARM
        else:
            backend, client, port = r.choice(self.replies)
            if backend.proto != "udp":
                return self.to_vip()
            src, dst, sport, dport = backend.addr, client, backend.port, port
            src_mac, dst_mac, ingress = mac_of6(backend.addr), BACKEND_ARM_MAC, BACKEND_ARM
        datagram = udp6(src, dst, sport, dport, r.randbytes(r.choice((600, 1500, 3000))))
        frag_id = r.choice((r.randrange(1 << 32), 7, 0))
        size = r.choice((8, 256, 1232))
        pieces = [datagram[i:i + size] for i in range(0, len(datagram), size)]
        hlim = r.choice((64, 64, 64, 2, 1))
        frames_out = []
        for n, piece in enumerate(pieces):
            more = int(n + 1 < len(pieces))
            header = struct.pack("!BBHI", UDP, 0, (n * size) | more, frag_id)
            frames_out.append(Sample(build6(src_mac, dst_mac, src, dst, UDP, piece, ext=header,
                                            first_nh=FRAGMENT, hlim=hlim), ingress))
        later = frames_out[1:]
        r.shuffle(later)
        self.later.extend(later[:r.randint(0, len(later))])
        if len(self.later) > 512:
            del self.later[:256]
        return frames_out[0]

    def later_fragment(self) -> Sample:
        if not self.later:
            return self.fragmented()
        return self.later.pop(self.rng.randrange(len(self.later)))

    def other(self) -> Sample:
        r = self.rng
        client = self._client()
        kind = r.randrange(3)
        if kind == 0:   # TCP/UDP to no VIP
            dst = r.choice(NON_VIP_DESTINATIONS)
            proto = r.choice((TCP, UDP))
            body = self._l4(client, dst, proto, r.randrange(1024, 65536), r.choice((22, 53, 80, 443)))
            return Sample(self._frame(mac_of6(client), CLIENT_ARM_MAC, client, dst, proto, body),
                          CLIENT_ARM)
        if kind == 1:   # neighbour discovery, router advertisement, echo, MLD
            type_ = r.choice((133, 134, 135, 136, 128, 129, 143))
            dst = r.choice(("ff02::1", "ff02::1:ff00:1", TCP_VIP.addr))
            body = icmp6(client, dst, type_, 0, r.randbytes(r.choice((16, 24))))
            return Sample(build6(mac_of6(client), CLIENT_ARM_MAC, client, dst, ICMPV6, body,
                                 hlim=255), CLIENT_ARM)
        return self.icmp_error()

    def mutate(self, s: Sample) -> Sample:
        r = self.rng
        f = bytearray(s.frame)
        for _ in range(r.randint(1, 3)):
            what = r.randrange(7)
            if what == 0 and len(f) >= 20:   # payload length
                struct.pack_into("!H", f, 18, r.choice((0, 7, 8, 19, 20, max(0, len(f) - 54 - 1),
                                                        max(0, len(f) - 54 + 1), r.randrange(65536))))
            elif what == 1 and len(f) > 20:   # next header
                f[20] = r.choice((TCP, UDP, ICMPV6, HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, AH, 59, 255))
            elif what == 2 and len(f) > 14:   # version
                f[14] = (r.randrange(16) << 4) | (f[14] & 0x0F)
            elif what == 3:          # truncate, never below Ethernet
                del f[r.randint(14, len(f)):]
            elif what == 4:          # Ethernet padding
                f += r.randbytes(r.randint(1, 32))
            elif what == 5 and len(f) > 54:   # a byte past the fixed header (ext/L4 fields)
                f[r.randrange(54, min(len(f), 90))] = r.randrange(256)
            elif len(f) > 14:
                i = r.randrange(14, len(f))
                f[i] ^= 1 << r.randrange(8)
        return Sample(bytes(f), s.ingress)

    def noise(self) -> Sample:
        r = self.rng
        f = bytearray(r.randbytes(r.randint(14, 120)))
        f[12:14] = b"\x86\xdd"
        if len(f) > 14 and r.random() < 0.7:
            f[14] = 0x60
        return Sample(bytes(f), r.choice((CLIENT_ARM, BACKEND_ARM)))

    def __iter__(self) -> Iterator[Sample]:
        makers = (self.to_vip, self.to_vip, self.reply, self.reply, self.other, self.fragmented,
                  self.later_fragment, self.later_fragment)
        return mixed(self.rng, makers, self.mutate, self.noise, made=0.55, mutated=0.92)


# --- judging ---

VIP_BY_KEY = {(v.addr, v.port, v.proto): v for v in VIPS}
ACTIONS = {XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT}
FORWARD = {XDP_TX: "tx", XDP_REDIRECT: "redirect", XDP_PASS: "pass_no_route"}


class Judge:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.tracked: dict[tuple[str, str, int, int, int], Endpoint] = {}   # reply key -> VIP
        self.maybe_forgotten: set[tuple[str, str, int, int, int]] = set()
        # A forwarded first fragment's key -> (rewrites the destination, the new address).
        self.frags: dict[tuple[str, str, int, int], tuple[bool, str]] = {}
        self.later_forwarded = 0
        self.expected: Counter[frozenset[str]] = Counter()
        self.rewritten = 0
        self.icmp_translated = 0

    def count(self, *outcomes: str) -> None:
        self.expected[frozenset(outcomes)] += 1

    def judge(self, frame: bytes, retval: int, out: bytes) -> None:
        assert retval in ACTIONS, f"XDP action {retval} (XDP_ABORTED is 0)"
        reading = read6(frame)
        if isinstance(reading, str):
            assert retval == XDP_PASS and out == frame, f"{reading} frame not passed untouched"
            self.count(reading)
            return
        if isinstance(reading, Icmp6):
            self._judge_icmp(frame, retval, out, reading)
            return
        if isinstance(reading, Later6):
            self._judge_later(frame, retval, out, reading)
            return
        p = reading
        vip = VIP_BY_KEY.get((p.dst, p.dport, "tcp" if p.proto == TCP else "udp"))
        reply_key = (p.src, p.dst, p.sport, p.dport, p.proto)
        reply_to = self.tracked.get(reply_key)
        if vip is None and reply_to is None:
            assert retval == XDP_PASS and out == frame, "non-VIP IPv6 traffic was not passed untouched"
            self.count("pass_not_vip")
            return
        if p.hlim <= 1:
            assert retval == XDP_PASS and out == frame, "hop limit <= 1 was not passed untouched"
            if reply_key in self.maybe_forgotten:
                self.count("pass_ttl", "pass_not_vip")
            else:
                self.count("pass_ttl")
            return
        if retval == XDP_DROP:
            assert vip is not None and not VIPS[vip], f"dropped, but {vip} has backends"
            self.count("drop_no_backend")
            return
        if vip is not None:
            backend = self._check_rewrite(frame, out, p, retval, dst=True)
            assert backend in VIPS[vip], f"{vip} forwarded to {backend}"
            if p.first_fragment:
                self.frags[(p.src, p.dst, p.first_fragment[0], p.proto)] = (True, backend.addr)
            key = (backend.addr, p.src, backend.port, p.sport, p.proto)
            if key not in self.tracked:
                self.tracked[key] = vip
                if len(self.source.replies) < 2048:
                    self.source.replies.append((backend, p.src, p.sport))
        elif out == frame:
            assert retval == XDP_PASS, "a tracked reply was neither NATed nor passed"
            self.maybe_forgotten.add(reply_key)
            self.count("pass_stale_reply", "pass_not_vip")
            return
        else:
            source = self._check_rewrite(frame, out, p, retval, dst=False)
            assert source == reply_to, f"reply NATed to {source}, not {reply_to}"
            if p.first_fragment:
                self.frags[(p.src, p.dst, p.first_fragment[0], p.proto)] = (False, source.addr)
        self.rewritten += 1
        self.count(FORWARD[retval])

    def _judge_later(self, frame: bytes, retval: int, out: bytes, m: Later6) -> None:
        rewrite = self.frags.get(m.key)
        if rewrite is None or m.hlim <= 1:
            assert retval == XDP_PASS and out == frame, "a later fragment was not passed untouched"
            self.count("pass_fragment" if rewrite is None else "pass_ttl")
            return
        dst, addr = rewrite
        assert retval in (XDP_TX, XDP_REDIRECT, XDP_PASS) and len(out) == len(frame)
        addr_at = 38 if dst else 22
        allowed = {*range(12), 21, *range(addr_at, addr_at + 16)}
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} changed outside the rewrite"
        assert out[addr_at:addr_at + 16] == a6(addr), "a later fragment went elsewhere than its first"
        assert out[21] == frame[21] - (1 if retval != XDP_PASS else 0)
        self.later_forwarded += 1
        self.count(FORWARD[retval])

    def _judge_icmp(self, frame: bytes, retval: int, out: bytes, m: Icmp6) -> None:
        if out == frame and retval == XDP_PASS:
            # Not an error, not about a tracked flow, or the hop limit: the kernel gets it.
            self.count("pass_not_vip", "pass_ttl", "pass_no_route")
            return
        assert m.type_ in (1, 2, 3), f"ICMPv6 type {m.type_} was rewritten"
        assert retval in (XDP_TX, XDP_REDIRECT, XDP_PASS) and len(out) == len(frame)
        assert m.hlim > 1, "an ICMPv6 error with hop limit <= 1 was rewritten"
        assert out[21] == frame[21] - (1 if retval != XDP_PASS else 0)
        # The ICMPv6 checksum covers the outer addresses and the whole quote.
        assert residual(out, ICMPV6, m.l4, m.l4_len) == residual(frame, ICMPV6, m.l4, m.l4_len), \
            "ICMPv6 checksum went wrong"
        self.icmp_translated += 1
        self.count(FORWARD[retval])

    def _check_rewrite(self, frame: bytes, out: bytes, p: Parsed6, retval: int, dst: bool) -> Endpoint:
        assert len(out) == len(frame), "a rewrite changed the frame's length"
        addr_at, port_at = (38, p.l4 + 2) if dst else (22, p.l4)
        allowed = {*range(12), 21, *range(addr_at, addr_at + 16), port_at, port_at + 1,
                   p.check_at, p.check_at + 1}
        changed = {i for i in range(len(frame)) if frame[i] != out[i]}
        assert changed <= allowed, f"bytes {sorted(changed - allowed)} changed outside the rewrite"
        forwarded = retval in (XDP_TX, XDP_REDIRECT)
        assert out[21] == frame[21] - (1 if forwarded else 0), "hop limit not lowered by exactly 1"
        if forwarded:
            assert out[6:12] in ARM_MACS, "forwarded with a source MAC not of an arm"
        else:
            assert out[:12] == frame[:12], "passed to the kernel with MACs rewritten"
        (check_in,) = struct.unpack_from("!H", frame, p.check_at)
        (check_out,) = struct.unpack_from("!H", out, p.check_at)
        if p.proto == UDP and check_in == 0:
            assert check_out == 0
        else:
            assert residual(out, p.proto, p.l4, p.l4_len) == residual(frame, p.proto, p.l4, p.l4_len), \
                "L4 checksum (IPv6 pseudo-header) went wrong"
            assert p.proto == TCP or check_out != 0, "UDP checksum 0 sent for a computed 0"
        new = read6(out)
        assert isinstance(new, Parsed6)
        name = "tcp" if p.proto == TCP else "udp"
        return Endpoint(new.dst, new.dport, name) if dst else Endpoint(new.src, new.sport, name)

    def check_counts(self, counted: Counter[str]) -> None:
        assert sum(counted.values()) == sum(self.expected.values())
        for outcome in set(counted) | {o for group in self.expected for o in group}:
            least = sum(n for g, n in self.expected.items() if g == {outcome})
            most = sum(n for g, n in self.expected.items() if outcome in g)
            assert least <= counted[outcome] <= most, \
                f"{outcome}: counted {counted[outcome]}, expected {least}-{most}"

    def must(self, outcome: str) -> int:
        return self.expected[frozenset((outcome,))]


def test_random_and_mutated_ipv6_frames_never_abort_and_never_half_rewrite(
        fresh: None, lb_program: LoadedProgram, routed_netns: Any, lb_maps: LbMaps) -> None:
    source = Source(random.Random(FUZZ_SEED))
    judge = Judge(source)
    ifindex = routed_netns.ifindex
    with inside(routed_netns.name):
        for n, sample in zip(range(FUZZ_FRAMES), source):
            result = libbpf.prog_test_run(lb_program.fd, sample.frame,
                                          ingress_ifindex=ifindex[sample.ingress])
            try:
                judge.judge(sample.frame, result.retval, result.data_out)
            except AssertionError as exc:
                pytest.fail(f"frame {n} of seed {FUZZ_SEED}: {exc}\n  ingress {sample.ingress}, "
                            f"XDP action {result.retval}\n  in  {sample.frame.hex()}\n"
                            f"  out {result.data_out.hex()}\n  replay: LBCTL_FUZZ_SEED={FUZZ_SEED} "
                            f"LBCTL_FUZZ6_FRAMES={n + 1}", pytrace=False)
    counters = lb_maps.global_counters()
    counted = Counter({name: c["packets"] for name, c in counters.items() if c["packets"]})
    print(f"seed {FUZZ_SEED}: {FUZZ_FRAMES} IPv6 frames, {judge.rewritten} rewritten, "
          f"{judge.icmp_translated} ICMPv6 errors translated, {judge.later_forwarded} later "
          f"fragments followed their first; counted {dict(sorted(counted.items()))}")
    judge.check_counts(counted)
    for outcome in ("pass_malformed", "pass_fragment", "pass_ext_header", "pass_not_vip",
                    "pass_ttl", "redirect", "tx", "pass_no_route", "drop_no_backend"):
        assert judge.must(outcome) > FUZZ_FRAMES // 1000, f"too few {outcome}: {dict(counted)}"
    assert judge.rewritten > FUZZ_FRAMES // 10
    assert judge.icmp_translated > FUZZ_FRAMES // 1000, "too few ICMPv6 errors translated"
    assert judge.later_forwarded > FUZZ_FRAMES // 100, "too few later fragments forwarded"
