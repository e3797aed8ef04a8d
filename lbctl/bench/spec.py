"""What the peer bench measures: the setups, the workloads, the lab's ports and the run sizes."""
from __future__ import annotations

# The order the issue lists them in; each is measured in turn, round after round.
SETUPS: tuple[str, ...] = ("xdp-native", "xdp-generic", "xdp-tc", "xdp-fullnat", "xdp-dsr",
                           "xdp-ipv6", "nftables", "haproxy", "direct")
SETUP_TITLES = {
    "xdp-native": "lbctl XDP (native)",
    "xdp-generic": "lbctl XDP (generic)",
    "xdp-tc": "lbctl on the tc hook (--mode tc)",
    "xdp-fullnat": "lbctl XDP full-NAT (native)",
    "xdp-dsr": "lbctl XDP L2 DSR (native)",
    "xdp-ipv6": "lbctl XDP NAT66, IPv6 (native)",
    "nftables": "nftables DNAT",
    "haproxy": "HAProxy mode tcp",
    "direct": "direct (no balancer)",
}
WORKLOADS: tuple[str, ...] = ("short", "short1", "keepalive", "bulk", "pps")
WORKLOAD_TITLES = {
    "short": "short connections (new TCP connection per request)",
    "short1": "short connections to one backend (the balancer against direct to that server)",
    "keepalive": "keep-alive requests",
    "bulk": "bulk TCP (iperf3, one stream)",
    "pps": "packet rate (60-byte UDP, 4096 flows)",
}

# Ports inside the lab. nginx listens beside the lab's own Python server (port 80), which
# stays up so the lab's readiness checks keep holding.
HTTP_VIP_PORT = 80
SINGLE_VIP_PORT = 81  # a VIP with one backend (the first one's nginx): nothing else differs
NGINX_PORT = 8080
# nginx's second port, on the first backend only: DSR keeps the VIP's port, so its one-backend
# VIP is VIP:8081 (its many-backend one VIP:8080) where NAT maps 81 and 80.
SINGLE_NGINX_PORT = 8081
BULK_PORT = 5201
PPS_PORT = 9999  # nothing listens: packets are dropped by the sink past the balancer
PPS_FLOWS = 4096
PPS_FLOW_BASE = 1024  # the generator's first source port
PPS_PAYLOAD_BYTES = 18  # 14 + 20 + 8 + 18 = 60-byte frames, the Ethernet minimum sans FCS

# One thread per backend, so a direct run gives each backend one thread's connections.
WRK_THREADS = 3
WRK_CONNECTIONS = 63
# The balancer kept up with the generator if it forwarded this share of what was offered;
# the figure is then the generator's limit, not the balancer's.
GENERATOR_BOUND_SHARE = 0.95
# Above this share of failed requests a run is reported as failed, not averaged in.
MAX_ERROR_SHARE = 0.01
TEST_RUN_CALLS = 20_000

# xdp-dsr: the client's second interface on the backends' segment, where the backends send
# their replies straight to it (their default route during that setup), as in
# tests/netns/dsr_topology.yaml.
DSR_CLIENT_SIDE = "10.77.2.50"
