/* lb_snat6.h: full-NAT over IPv6: lb_snat.h's contract (source rewritten to a SNAT address
 * and a port claimed per flow, both directions tracked) in IPv6 tables; the flow logic is
 * lb_snat_af.inc's, shared with IPv4. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>
#include <linux/socket.h>

#include "lb_ctx.h"
#include "lb_consts.h"
#include "lb_fib6.h"
#include "lb_flow.h"
#include "lb_flow6.h"
#include "lb_icmp_quote.h"
#include "lb_maglev.h"
#include "lb_maps.h"
#include "lb_nat6.h"
#include "lb_parse6.h"
#include "lb_snat.h"
#include "lb_stats.h"
#include "lb_structs.h"

/* struct snat_entry's IPv6 twin: `nat` is a NAT66 entry (the first rewrite's address, then
 * the IPv4-shaped entry whose state, times, ids and next hop lb_flow.h and lb_fib6.h read).
 * snat_flows6, key client->VIP: nat = the backend, peer = SNAT addr:port.
 * snat_rnat6, key backend->SNAT addr:port: nat = the VIP, peer = the client. */
struct snat_entry6 {
    struct nat_entry6 nat;
    __be32 peer_addr[4];
    __be16 peer_port;
    __u8 pad[6];
};

/* Sized as IPv4's, for the same reason (docs/modes.md: table sizes and LRU eviction). */
BPF_TABLE_PINNED("lru_hash", struct flow_key6, struct snat_entry6, snat_flows6, LB_SNAT_TABLE_SIZE,
                 LB_PIN_DIR "snat_flows6");
BPF_TABLE_PINNED("lru_hash", struct flow_key6, struct snat_entry6, snat_rnat6, 2 * LB_SNAT_TABLE_SIZE,
                 LB_PIN_DIR "snat_rnat6");

/* A new flow's two entries and the other direction's key, per CPU (the stack has no room). */
struct lb_snat6_scratch {
    struct snat_entry6 fwd;
    struct snat_entry6 back;
    struct flow_key6 key;
};
BPF_PERCPU_ARRAY(snat6_scratch, struct lb_snat6_scratch, 1);

static __always_inline struct lb_snat6_scratch *lb_snat6_scratch(void)
{
    __u32 zero = 0;
    return snat6_scratch.lookup(&zero);
}

static __always_inline struct snat_entry6 *lb_snat6_lookup(struct flow_key6 *key, enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? snat_flows6.lookup(key) : snat_rnat6.lookup(key);
}

static __always_inline int lb_snat6_store(struct flow_key6 *key, struct snat_entry6 *e, enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? snat_flows6.update(key, e) : snat_rnat6.update(key, e);
}

static __always_inline int lb_snat6_claim(struct flow_key6 *key, struct snat_entry6 *reply)
{
    return snat_rnat6.insert(key, reply);
}

/* lb_snat_source for IPv6: one of the VIP's addresses (snat_cfg.addrs6) by the flow hash,
 * else the source the kernel would use toward the backend (BPF_FIB_LOOKUP_SRC does IPv6
 * too: the route's preferred source, else the interface's by RFC 6724). 0: none. */
static __always_inline int lb_snat6_source(LB_CTX *ctx, const struct snat_cfg *cfg,
                                           const struct backend *be, __u32 hash,
                                           struct lb_packet6 *pkt, struct snat_entry6 *fwd)
{
    __u32 count = cfg->addr_count;
    if (count > 0) {
        if (count > LB_SNAT_MAX_ADDRS)
            count = LB_SNAT_MAX_ADDRS;
        __u32 i = hash % count;
        /* The index is masked in the register the access uses (clang computes the offset
         * from a copy taken before any compare, so a bound check alone is lost). */
        _Static_assert((LB_SNAT_MAX_ADDRS & (LB_SNAT_MAX_ADDRS - 1)) == 0, "a power of two");
        asm volatile("%0 &= %1" : "+r"(i) : "i"(LB_SNAT_MAX_ADDRS - 1));
        lb_addr6_copy(fwd->peer_addr, &cfg->addrs6[i * 4]);
    } else {
        struct bpf_fib_lookup fib = {};
        fib.family = AF_INET6;
        fib.l4_protocol = pkt->key.proto;
        fib.tot_len = bpf_ntohs(pkt->ip6->payload_len) + sizeof(struct ipv6hdr);
        __builtin_memcpy(fib.ipv6_dst, be->addr6, 16);
        fib.ifindex = ctx->ingress_ifindex;
        int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), LB_FIB_LOOKUP_SRC | LB_FIB_LOOKUP_SKIP_NEIGH);
        if (rc != BPF_FIB_LKUP_RET_SUCCESS)
            return 0;
        __builtin_memcpy(fwd->peer_addr, fib.ipv6_src, 16);
    }
    return (fwd->peer_addr[0] | fwd->peer_addr[1] | fwd->peer_addr[2] | fwd->peer_addr[3]) != 0;
}

/* The IPv6 instance of lb_snat_af.inc: lb_snat6_forward, lb_snat6_new_flow,
 * lb_snat6_from_backend, lb_snat6_icmp and their parts. IPv6 fragments never get here
 * (lb_parse6 passes them). */
#define LB_SNAT_FN(name) lb_snat6_##name
#define LB_SNAT_KEY struct flow_key6
#define LB_SNAT_ENTRY struct snat_entry6
#define LB_SNAT_PKT struct lb_packet6
#define LB_SNAT_SCRATCH struct lb_snat6_scratch
#define LB_SNAT_E(entry) ((entry)->nat.e)
#define LB_SNAT_ADDR_SET(to, from) lb_addr6_copy(to, from)
#define LB_SNAT_ADDR_EQ(a, b) lb_addr6_equal(a, b)
#define LB_SNAT_BACKEND_ADDR(be) ((be)->addr6)
#define LB_SNAT_HOP_LIMIT(pkt) ((pkt)->ip6->hop_limit)
#define LB_SNAT_PICK lb_pick6
#define LB_SNAT_HASH(key) lb_flow6_hash(key, 0)
#define LB_SNAT_REWRITE lb_rewrite6
#define LB_SNAT_FORWARD lb_forward6
#define LB_SNAT_AFTER_REWRITE(pkt, vip_id, backend_id, now) do { } while (0)
#define LB_SNAT_INNER struct ipv6hdr
#define LB_SNAT_ICMP_CHECK(icmp) (&((struct icmp6hdr *)(icmp))->icmp6_cksum)
#define LB_SNAT_OUTER_SRC(pkt) ((pkt)->ip6->saddr.in6_u.u6_addr32)
#define LB_SNAT_OUTER_DST(pkt) ((pkt)->ip6->daddr.in6_u.u6_addr32)
#define LB_SNAT_INNER_DST(inner) ((inner)->daddr.in6_u.u6_addr32)
/* The ICMPv6 checksum covers the outer addresses (its pseudo-header). */
#define LB_SNAT_SET_OUTER(check, pkt, field, addr) lb_icmp6_set_outer(check, field, addr)
#define LB_SNAT_QUOTE_REWRITE lb_icmp6_rewrite_quote
#include "lb_snat_af.inc"
