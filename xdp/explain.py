"""Asks the live program, through BPF_PROG_TEST_RUN with explain metadata, which backend it
would choose for a flow and why, without creating a flow or moving a counter."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from xdp import codec, frames, libbpf
from xdp.limits import EXPLAIN_MAGIC, EXPLAIN_VERDICTS, FLOW_STATES, FORWARDING_MODES


@dataclass(frozen=True)
class Explanation:
    verdict: str                # not_vip | flow_hit | ring | no_backend
    vip_id: int
    ring_generation: int
    slot: int
    backend_id: int | None
    backend: str | None         # "addr:port"
    flow_state: str | None
    flow_age_ms: int | None
    forwarding: str | None = None   # nat | fullnat | dsr: the flow's mode (a hit) or the VIP's


def probe_frame(client: codec.Endpoint, vip: codec.Endpoint, new_connection: bool = False) -> bytes:
    """client -> vip as the program would meet it: TCP's SYN opening a new connection, or a
    bare ACK of an established one (a closing flow keeps an ACK but not a SYN); UDP has only
    datagrams. The MACs are zero: with explain metadata the program answers before it reads
    them or forwards."""
    if vip.proto == "tcp":
        if new_connection:
            return frames.tcp_frame(frames.ZERO_MAC, frames.ZERO_MAC, client.addr, vip.addr,
                                    client.port, vip.port, flags=frames.TCP_SYN, seq=1,
                                    frag=frames.IP_DF)
        return frames.tcp_frame(frames.ZERO_MAC, frames.ZERO_MAC, client.addr, vip.addr,
                                client.port, vip.port, flags=frames.TCP_ACK, seq=1, ack=1,
                                window=65535, frag=frames.IP_DF)
    return frames.udp_frame(frames.ZERO_MAC, frames.ZERO_MAC, client.addr, vip.addr,
                            client.port, vip.port, frag=frames.IP_DF)


def explain(prog_fd: int, client: codec.Endpoint, vip: codec.Endpoint,
            new_connection: bool = False) -> Explanation:
    """The program's answer for one probe packet (see probe_frame)."""
    frame = probe_frame(client, vip, new_connection)
    ask = codec.ExplainMeta(magic=EXPLAIN_MAGIC)
    result = libbpf.prog_test_run(prog_fd, frame, meta=bytes(ask))
    answer = codec.ExplainMeta.from_buffer_copy(result.data_out[: ctypes.sizeof(codec.ExplainMeta)])
    verdict = EXPLAIN_VERDICTS[answer.verdict] if answer.verdict < len(EXPLAIN_VERDICTS) else "none"
    has_backend = verdict in ("flow_hit", "ring")
    hit = verdict == "flow_hit"
    return Explanation(
        verdict=verdict, vip_id=answer.vip_id, ring_generation=answer.ring_generation,
        slot=answer.slot, backend_id=answer.backend_id if has_backend else None,
        backend=(codec.format_endpoint(
            codec._addr6(bytes(answer.backend_addr6)) if vip.ipv6 else codec._addr(answer.backend_addr),
            codec._port(answer.backend_port)) if has_backend else None),
        flow_state=FLOW_STATES[answer.flow_state] if hit and answer.flow_state < len(FLOW_STATES) else None,
        flow_age_ms=answer.flow_age_ms if hit else None,
        forwarding=(FORWARDING_MODES[answer.forwarding] if verdict != "not_vip"
                    and answer.forwarding < len(FORWARDING_MODES) else None),
    )
