/* lb_snat.h: full-NAT (one-arm): a VIP's flows get their source rewritten too, to a SNAT
 * address and a port claimed per flow, so backends reply to the balancer by plain routing. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <linux/socket.h>

#include "lb_ctx.h"
#include "lb_consts.h"
#include "lb_fib.h"
#include "lb_flow.h"
#include "lb_icmp_quote.h"
#include "lb_maglev.h"
#include "lb_maps.h"
#include "lb_nat.h"
#include "lb_parse.h"
#include "lb_stats.h"
#include "lb_structs.h"

/* bpf_fib_lookup flags by our own names: the uapi header bcc compiles against may predate
 * them (SKIP_NEIGH: kernel 6.3, SRC: 6.7, which fills ipv4_src with the source the kernel
 * would pick). The running kernel must have them; tests/bpf proves it does. */
#define LB_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#define LB_FIB_LOOKUP_SRC (1U << 4)

/* snat_cfg[vip_id]: a full-NAT VIP's SNAT addresses and source-port range (the planner). */
struct snat_cfg {
    __be32 addrs[LB_SNAT_MAX_ADDRS];
    __u32 addr_count;       /* 0: the balancer's own address toward the backend, by the FIB */
    __u16 port_min;         /* host order, inclusive */
    __u16 port_max;
    /* An IPv6 VIP's addresses, four words each (addr_count counts these then; a VIP has one
     * family). Flat: bcc mirrors a two-dimensional array with the wrong size. */
    __be32 addrs6[LB_SNAT_MAX_ADDRS * 4];
};

/* One direction of a full-NAT flow. `nat` is what a NAT entry holds (and what lb_flow.h and
 * lb_fib.h read: state, times, ids, next hop); `peer` is the second rewrite.
 * snat_flows, key client->VIP: nat = the backend (new destination), peer = SNAT addr:port (new source).
 * snat_rnat, key backend->SNAT addr:port: nat = the VIP (new source), peer = the client (new destination). */
struct snat_entry {
    struct nat_entry nat;
    __be32 peer_addr;
    __be16 peer_port;
    __u8 pad[2];
};

/* A full-NAT datagram's later fragments: both addresses, as its first fragment got them. */
struct snat_frag_entry {
    __be32 saddr;
    __be32 daddr;
    __u32 vip_id;
    __u32 backend_id;
    __u64 seen_ns;
};

BPF_TABLE_PINNED("array", u32, struct snat_cfg, snat_cfg, LB_MAX_VIPS, LB_PIN_DIR "snat_cfg");
/* Both LRU: see docs/modes.md ("full-NAT: table sizes and LRU eviction") for why the reverse
 * table, whose keys are the claimed ports, is twice the size of the forward one. */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct snat_entry, snat_flows, LB_SNAT_TABLE_SIZE,
                 LB_PIN_DIR "snat_flows");
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct snat_entry, snat_rnat, 2 * LB_SNAT_TABLE_SIZE,
                 LB_PIN_DIR "snat_rnat");
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct snat_frag_entry, snat_frags, LB_FRAG_TABLE_SIZE,
                 LB_PIN_DIR "snat_frags");

/* A new flow's two entries, per CPU: on the stack they would take 128 of the program's 512
 * bytes, on top of the IPv6 path's and the FIB lookup's frames. */
struct lb_snat_scratch {
    struct snat_entry fwd;
    struct snat_entry back;
    struct flow_key key;    /* the other direction's key */
};
BPF_PERCPU_ARRAY(snat_scratch, struct lb_snat_scratch, 1);

static __always_inline struct lb_snat_scratch *lb_snat_scratch(void)
{
    __u32 zero = 0;
    return snat_scratch.lookup(&zero);
}

/* The two directions' tables, by direction (as lb_flow_lookup): snat_flows, snat_rnat. */
static __always_inline struct snat_entry *lb_snat_lookup(struct flow_key *key, enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? snat_flows.lookup(key) : snat_rnat.lookup(key);
}

static __always_inline int lb_snat_store(struct flow_key *key, struct snat_entry *e, enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? snat_flows.update(key, e) : snat_rnat.update(key, e);
}

/* A port's claim: a create-only insert of its reply entry (0: ours). */
static __always_inline int lb_snat_claim(struct flow_key *key, struct snat_entry *reply)
{
    return snat_rnat.insert(key, reply);
}

/* Whether the planner has switched on an LB_DP_F_* path (an array lookup: cheaper than the
 * hash lookup it saves a packet that is no VIP's while no full-NAT VIP exists). */
static __always_inline int lb_dp_on(__u32 flag)
{
    __u32 zero = 0;
    struct lb_dp_config *c = dp_config.lookup(&zero);
    return c && (c->flags & flag);
}

/* A claimed port is free again once its flow has expired; a closed TCP flow's port waits
 * out TIME_WAIT too, so the backend never sees a new SYN on a tuple it still holds. */
static __always_inline int lb_snat_reusable(const struct nat_entry *e, __u64 now)
{
    __u64 age = lb_age_ns(now, e->last_seen_ns);
    if (age <= lb_timeout_ns(e->state))
        return 0;
    return e->state != LB_FLOW_CLOSING || age > LB_SNAT_TIME_WAIT_NS;
}

/* The SNAT address for a new flow to `be`, into fwd->peer_addr: one of the VIP's (by the
 * flow hash, so a client's retries keep it), else the source the kernel would use toward the
 * backend. 0: none. */
static __always_inline int lb_snat_source(LB_CTX *ctx, const struct snat_cfg *cfg,
                                          const struct backend *be, __u32 hash,
                                          struct lb_packet *pkt, struct snat_entry *fwd)
{
    __u32 count = cfg->addr_count;
    if (count > 0) {
        if (count > LB_SNAT_MAX_ADDRS)
            count = LB_SNAT_MAX_ADDRS;
        __u32 i = hash % count;
        /* clang drops the bound below as implied by the clamp; the verifier needs it seen. */
        asm volatile("" : "+r"(i));
        if (i >= LB_SNAT_MAX_ADDRS)
            return 0;
        fwd->peer_addr = cfg->addrs[i];
        return fwd->peer_addr != 0;
    }
    struct iphdr *ip = pkt->ip;
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_dst = be->addr;
    fib.ifindex = ctx->ingress_ifindex;
    /* SKIP_NEIGH: only the source is wanted here; lb_forward resolves the next hop. */
    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), LB_FIB_LOOKUP_SRC | LB_FIB_LOOKUP_SKIP_NEIGH);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return 0;
    fwd->peer_addr = fib.ipv4_src;
    return fwd->peer_addr != 0;
}

static __always_inline int lb_snat_drop(__u32 vip_id, __u32 outcome, __u64 bytes)
{
    struct lb_counters *vc = stats_vip.lookup(&vip_id);
    if (vc)
        vc->drops++;
    return lb_outcome(outcome, bytes, LB_ACT_DROP);
}

static __always_inline void lb_snat_record_fragment(const struct lb_packet *pkt, __u32 vip_id,
                                                    __u32 backend_id, __u64 now)
{
    struct frag_key fk = {};
    fk.src = pkt->key.src;
    fk.dst = pkt->key.dst;
    fk.id = pkt->ip->id;
    fk.proto = pkt->key.proto;
    struct snat_frag_entry fe = {};
    fe.saddr = pkt->ip->saddr;      /* called after the rewrite */
    fe.daddr = pkt->ip->daddr;
    fe.vip_id = vip_id;
    fe.backend_id = backend_id;
    fe.seen_ns = now;
    snat_frags.update(&fk, &fe);
}

/* A later fragment of a full-NAT datagram; -1 when none of ours was recorded. */
static __always_inline int lb_snat_fragment(LB_CTX *ctx, struct lb_packet *pkt, __u64 bytes)
{
    struct iphdr *ip = pkt->ip;
    struct frag_key fk = {};
    fk.src = ip->saddr;
    fk.dst = ip->daddr;
    fk.id = ip->id;
    fk.proto = ip->protocol;
    struct snat_frag_entry *fe = snat_frags.lookup(&fk);
    if (!fe || lb_age_ns(lb_now_ns(), fe->seen_ns) > LB_FRAG_TIMEOUT_NS)
        return -1;
    if (ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    lb_count_flow(fe->vip_id, fe->backend_id, bytes, 0);
    lb_rewrite_addr(ip, 0, fe->saddr);
    lb_rewrite_addr(ip, 1, fe->daddr);
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}


/* The IPv4 instance of lb_snat_af.inc: lb_snat_forward, lb_snat_new_flow, lb_snat_from_backend,
 * lb_snat_icmp and their parts. */
#define LB_SNAT_FN(name) lb_snat_##name
#define LB_SNAT_KEY struct flow_key
#define LB_SNAT_ENTRY struct snat_entry
#define LB_SNAT_PKT struct lb_packet
#define LB_SNAT_SCRATCH struct lb_snat_scratch
#define LB_SNAT_E(e) ((e)->nat)
#define LB_SNAT_ADDR_SET(to, from) ((to) = (from))
#define LB_SNAT_ADDR_EQ(a, b) (*(a) == *(b))
#define LB_SNAT_BACKEND_ADDR(be) ((be)->addr)
#define LB_SNAT_HOP_LIMIT(pkt) ((pkt)->ip->ttl)
#define LB_SNAT_PICK lb_pick
#define LB_SNAT_HASH(key) lb_flow_hash(key, 0)
#define LB_SNAT_REWRITE lb_rewrite
#define LB_SNAT_FORWARD lb_forward
#define LB_SNAT_AFTER_REWRITE(pkt, vip_id, backend_id, now) \
    do { \
        if ((pkt)->more_fragments) \
            lb_snat_record_fragment(pkt, vip_id, backend_id, now); \
    } while (0)
#define LB_SNAT_INNER struct iphdr
#define LB_SNAT_ICMP_CHECK(icmp) (&((struct icmphdr *)(icmp))->checksum)
#define LB_SNAT_OUTER_SRC(pkt) (&(pkt)->ip->saddr)
#define LB_SNAT_OUTER_DST(pkt) (&(pkt)->ip->daddr)
#define LB_SNAT_INNER_DST(inner) (&(inner)->daddr)
#define LB_SNAT_SET_OUTER(check, pkt, field, addr) lb_set_ip_addr((pkt)->ip, field, addr)
#define LB_SNAT_QUOTE_REWRITE lb_icmp_rewrite_quote
#include "lb_snat_af.inc"
