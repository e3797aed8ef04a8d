"""The one source of the data plane's limits, timeouts and outcome codes; rendered into C by jinja2."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Outcome of one packet, one counter each in stats_global. Order is ABI: the C enum
# is rendered from this list, and readers index the per-CPU array with it.
OUTCOMES: tuple[str, ...] = (
    "pass_not_ipv4",     # ARP, VLAN, anything neither IPv4 nor IPv6 over Ethernet
    "pass_not_vip",      # IPv4/IPv6 that is neither for a VIP nor a tracked backend reply
                         # (with neighbour discovery, router advertisements, echo, MLD)
    "pass_malformed",    # truncated frame or a header that lies (IHL < 5, bad lengths)
    "pass_fragment",     # a later fragment whose first fragment was not forwarded (or too long ago);
                         # an IPv6 fragment of anything but TCP/UDP (docs/modes.md: the policy)
    "pass_ttl",          # TTL would expire here: the kernel sends the ICMP error
    "pass_no_route",     # bpf_fib_lookup gave no route or no neighbour: kernel forwards
    "pass_stale_reply",  # a reply matched a tracking entry that had ended
    "tx",                # rewritten and sent back out of the ingress interface
    "redirect",          # rewritten and redirected to another interface
    "drop_no_backend",   # VIP with no usable backend
    "pass_ext_header",   # IPv6 with an extension header the program does not walk (AH, a
                         # routing header with segments left, a chain longer than 4)
    "drop_dsr_unreachable",  # DSR: the backend is not on an attached link (FIB: via a gateway,
                             # no route), its MAC is unresolved, or the frame exceeds the link MTU
    "drop_snat_no_port",    # full-NAT: every source port tried for the new flow was taken
    "drop_snat_no_source",  # full-NAT: no SNAT address (none set, and no route to the backend)
)

# Values in the flow tables' `state` byte.
FLOW_STATES: tuple[str, ...] = ("syn", "established", "closing", "udp")

BACKEND_STATES: tuple[str, ...] = ("active", "drain", "down")

# How a VIP forwards (`--forwarding`, `forwarding:`); the first is the default. A tracked
# flow keeps the mode it started with in nat_entry.forwarding (the index here, ABI: the C
# enum lb_forwarding is rendered from this list), so changing a VIP's mode moves new flows only.
FORWARDING_MODES: tuple[str, ...] = ("nat", "fullnat", "dsr")

# vip_meta.flags bits, rendered as LB_VIP_F_<NAME>; xdp/codec.py encodes them.
VIP_FLAGS: dict[str, int] = {
    "client_affinity": 0x1,  # --affinity client: the source address alone picks the backend
    "dsr": 0x2,              # --forwarding dsr: only the destination MAC is rewritten
    "fullnat": 0x4,          # --forwarding fullnat: the source is rewritten too (one-arm)
}

# dp_config flags (one entry for the whole program), rendered as LB_DP_F_<NAME>: switches
# the planner sets from the whole configuration so the data plane skips what no VIP needs.
DP_FLAGS: dict[str, int] = {
    "fullnat": 0x1,     # an IPv4 full-NAT VIP exists, or snat_rnat still holds entries:
                        # a non-VIP packet is looked up in snat_rnat (a backend's reply)
    "fullnat6": 0x2,    # the same for IPv6 (snat_rnat6)
}

# `lbctl explain` answers, written by the program into the test-run frame's metadata.
EXPLAIN_VERDICTS: tuple[str, ...] = ("none", "not_vip", "flow_hit", "ring", "no_backend")
EXPLAIN_MAGIC = 0x4C424558  # "LBEX"

PIN_ROOT = "/sys/fs/bpf/lbctl"
# Run-time files of the control plane (locks, notes that outlive one command), per instance.
RUN_DIR = "/run/lbctl"

# Each VIP owns this many rings side by side in the `rings` array: the live one and the one
# being written. A change writes the idle ring, then flips vip_meta.ring_generation, whose
# value modulo RINGS_PER_VIP picks the live ring: one atomic step for the data plane.
RINGS_PER_VIP = 2


@dataclass(frozen=True)
class Limits:
    """Sizes and timeouts compiled into the program; maps are sized from these."""

    max_vips: int = 64
    max_backends: int = 4096
    # Prime, as Maglev requires; 65537 is Katran's default too: large enough that a backend's
    # share is accurate to well under 1% for up to a few hundred backends (the paper wants M >> N).
    ring_size: int = 65537
    flow_table_size: int = 262144           # LRU: the oldest flow is evicted when full
    hash_seed: int = 0x1B5EED
    tcp_syn_timeout_s: int = 30             # half-open flows
    tcp_established_timeout_s: int = 900    # idle established flows
    tcp_closing_timeout_s: int = 15         # after FIN or RST: lets the last ACKs through
    udp_timeout_s: int = 60
    frag_table_size: int = 16384            # LRU: fragmented datagrams in flight
    frag_timeout_s: int = 30                # like the kernel's ipfrag_time
    refresh_interval_ms: int = 1000         # last-seen stamps are rewritten at most this often
    # full-NAT (bpf_programs/lb_snat.h): its forward table; the reverse one, whose keys are the
    # claimed source ports, is twice as large (docs/modes.md says why).
    snat_table_size: int = 131072
    snat_max_addrs: int = 8                 # --snat addresses per VIP
    snat_port_tries: int = 32               # free ports probed for a new flow, from a random start
    snat_takeover_tries: int = 8            # then, of those, ports whose flow expired
    snat_time_wait_s: int = 60              # a closed flow's port waits out the backend's TIME_WAIT
    outcomes: tuple[str, ...] = field(default=OUTCOMES)
    flow_states: tuple[str, ...] = field(default=FLOW_STATES)
    backend_states: tuple[str, ...] = field(default=BACKEND_STATES)
    explain_verdicts: tuple[str, ...] = field(default=EXPLAIN_VERDICTS)
    explain_magic: int = EXPLAIN_MAGIC
    forwarding_modes: tuple[str, ...] = field(default=FORWARDING_MODES)

    @property
    def ring_entries(self) -> int:
        return self.max_vips * RINGS_PER_VIP * self.ring_size

    def ring_index(self, vip_id: int, ring_generation: int, slot: int = 0) -> int:
        """Where slot `slot` of a VIP's ring of that generation lives in `rings`. The program
        computes it with LB_RING_INDEX, the same formula rendered with the same constants;
        tests/bpf/test_layout.py runs the C macro against this function."""
        return (vip_id * RINGS_PER_VIP + ring_generation % RINGS_PER_VIP) * self.ring_size + slot

    def template_vars(self) -> dict[str, object]:
        values = asdict(self)
        values["ring_entries"] = self.ring_entries
        values["rings_per_vip"] = RINGS_PER_VIP
        values["vip_flags"] = dict(VIP_FLAGS)
        values["dp_flags"] = dict(DP_FLAGS)
        return values


DEFAULT_LIMITS = Limits()
