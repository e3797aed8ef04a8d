"""`lbctl capture`: the frames the XDP program sees, before and after its rewrite, written as
pcapng (tcpdump -r, Wireshark and scapy read it): interface 0 holds the frames as they arrived,
interface 1 as the program sent them, and each packet's comment says which and what happened."""
from __future__ import annotations

import struct
from typing import BinaryIO

from lbctl import trace as tracemod
from xdp.tracing import SNAP_BYTES, Event, Filter

LINKTYPE_ETHERNET = 1
BEFORE, AFTER = 0, 1        # interface ids


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


class PcapngWriter:
    """Section header, the two interfaces, then one enhanced packet block a frame."""

    def __init__(self, out: BinaryIO):
        self.out = out
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _option(4, b"lbctl capture") + _option(0, b"")
        out.write(_block(0x0A0D0D0A, shb))
        for name, description in ((b"before", b"frames as they reached the XDP program"),
                                  (b"after", b"frames as the XDP program sent them (tx or redirect)")):
            idb = (struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAP_BYTES) + _option(2, name)
                   + _option(3, description) + _option(9, bytes([9])) + _option(0, b""))
            out.write(_block(1, idb))   # if_tsresol 9: timestamps in nanoseconds

    def packet(self, interface: int, ts_ns: int, data: bytes, original_len: int, comment: str) -> None:
        body = (struct.pack("<IIIII", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data),
                            max(original_len, len(data)))
                + _pad(data) + _option(1, comment.encode()) + _option(0, b""))
        self.out.write(_block(6, body))


def write_event(writer: PcapngWriter, event: Event, backends: dict[int, str], offset_ns: int) -> int:
    """The event's frames; returns how many were written."""
    what = tracemod.line(event, backends)
    ts = event.ts_ns + offset_ns
    written = 0
    if event.before:
        writer.packet(BEFORE, ts, event.before, event.frame_len, f"before: {what}")
        written += 1
    if event.after:
        # The rewrite keeps the length: NAT changes addresses, ports and checksums only.
        writer.packet(AFTER, ts, event.after, event.frame_len, f"after: {what}")
        written += 1
    return written


def capture(instance: str, path: str, flt: Filter, count: int | None,
            on_event=None) -> tracemod.TraceRun:
    """Writes `count` packets (or until Ctrl-C) to `path` as pcapng."""
    flt = Filter(flt.vip, flt.client, flt.backend, frames=True)
    offset = tracemod.wall_clock_offset_ns()
    with open(path, "wb") as out:
        writer = PcapngWriter(out)

        def emit(event: Event, backends: dict[int, str]) -> None:
            write_event(writer, event, backends, offset)
            out.flush()
            if on_event is not None:
                on_event(event, backends)

        return tracemod.run(instance, flt, count, emit)
