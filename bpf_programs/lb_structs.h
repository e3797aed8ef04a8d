/* lb_structs.h: map keys and values; xdp/codec.py mirrors them and a test compares both layouts. */
#pragma once

#include <linux/types.h>

/* A VIP is (address, port, protocol); all network-order fields stay as on the wire. */
struct vip_key {
    __be32 addr;
    __be16 port;
    __u8 proto;
    __u8 pad;
};

struct vip_meta {
    __u32 vip_id;           /* index into the rings and stats_vip */
    __u32 flags;            /* LB_VIP_F_*: affinity and forwarding mode */
    __u32 ring_generation;  /* which of the VIP's two rings is live (0 or 1) */
    __u32 backend_count;
};

/* backends[] entry; the control plane also keeps weight and owner here so the maps alone
 * hold the whole configuration. One id space for both families: an IPv4 backend has its
 * address in `addr` (addr6 zero), an IPv6 one (flags & LB_BACKEND_F_IPV6) in `addr6` (addr
 * zero), so the IPv4 path reads the same field at the same offset as before. */
struct backend {
    __be32 addr;
    __be16 port;
    __u8 state;             /* enum lb_backend_state */
    __u8 flags;             /* LB_BACKEND_F_* */
    __u32 vip_id;
    __u32 weight;
    __be32 addr6[4];        /* network order, as in struct ipv6hdr */
};

/* A 5-tuple as seen on the wire, in the packet's own direction. */
struct flow_key {
    __be32 src;
    __be32 dst;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

/* flows: client->VIP key, addr/port = the backend. rnat: backend->client key, addr/port = the VIP. */
struct nat_entry {
    __be32 addr;
    __be16 port;
    __u8 state;             /* enum lb_flow_state */
    __u8 forwarding;        /* enum lb_forwarding: the VIP's mode when the flow started */
    __u32 backend_id;
    __u32 vip_id;
    __u64 last_seen_ns;
    __u64 created_ns;       /* time of the packet that created or re-created the flow */
    /* Next hop from bpf_fib_lookup, reused until the next refresh (at most
     * LB_REFRESH_INTERVAL_NS): the FIB lookup is half the cost of a flow hit. */
    __u32 nh_ifindex;       /* 0: nothing cached */
    __u16 nh_len_ok;        /* largest IP total length the lookup has cleared for the MTU */
    __u8 nh_dmac[6];
    __u8 nh_smac[6];
    __u8 nh_pad[2];
};

/* frags: a fragmented datagram as it arrived (addresses before any rewrite, IP id). */
struct frag_key {
    __be32 src;
    __be32 dst;
    __be16 id;
    __u8 proto;
    __u8 pad;
};

/* What the first fragment's NAT did, for the later fragments (which carry no ports). */
struct frag_entry {
    __be32 addr;            /* the new address */
    __u8 rewrite_dst;       /* 1: daddr (client->VIP); 0: saddr (a backend's reply) */
    __u8 pad[3];
    __u32 vip_id;
    __u32 backend_id;
    __u64 seen_ns;          /* when the first fragment went through */
};

/* dp_config's one entry: LB_DP_F_* switches the planner sets from the whole configuration. */
struct lb_dp_config {
    __u32 flags;
    __u32 pad;
};

struct lb_counters {
    __u64 packets;
    __u64 bytes;
    __u64 new_flows;
    __u64 drops;
};

/* XDP metadata that `lbctl explain` puts before a test-run frame; the program answers in it. */
struct lb_explain {
    __u32 magic;            /* LB_EXPLAIN_MAGIC, else the frame is an ordinary packet */
    __u32 verdict;          /* enum lb_explain_verdict */
    __u32 vip_id;
    __u32 ring_generation;
    __u32 slot;
    __u32 backend_id;
    __be32 backend_addr;
    __be16 backend_port;
    __u8 flow_state;
    __u8 forwarding;        /* enum lb_forwarding: the flow's (a hit) or the VIP's (a ring pick) */
    __u64 flow_age_ms;
    __be32 backend_addr6[4];    /* an IPv6 VIP's backend (backend_addr is then 0) */
};

/* IPv6 (lb_*6.h): its own maps and keys, the IPv4 ones untouched. Addresses are four
 * network-order words, as in struct in6_addr. */
struct vip_key6 {
    __be32 addr[4];
    __be16 port;
    __u8 proto;
    __u8 pad;
};

struct flow_key6 {
    __be32 src[4];
    __be32 dst[4];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

/* flows6 / rnat6: the rewrite's IPv6 address, then an IPv4 entry whose addr is 0 and whose
 * state, ids, times and next-hop cache mean what they mean there, so lb_flow.h's state
 * machine and timeouts apply to both families unchanged. */
struct nat_entry6 {
    __be32 addr[4];
    struct nat_entry e;
};

/* frags6: a fragmented IPv6 datagram as it arrived (addresses before any rewrite, the fragment
 * header's identification and the protocol behind it). */
struct frag_key6 {
    __be32 src[4];
    __be32 dst[4];
    __be32 id;
    __u8 proto;
    __u8 pad[3];
};

/* What an IPv6 first fragment's rewrite did: the new IPv6 address, then an IPv4 frag_entry
 * whose addr is 0 and whose direction, ids and time mean what they mean there. */
struct frag_entry6 {
    __be32 addr[4];
    struct frag_entry e;
};
