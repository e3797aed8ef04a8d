/* lb_snat.h: full-NAT (one-arm): a VIP's flows get their source rewritten too, to a SNAT
 * address and a port claimed per flow, so backends reply to the balancer by plain routing. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <linux/socket.h>

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
};
BPF_PERCPU_ARRAY(snat_scratch, struct lb_snat_scratch, 1);

/* The key the other direction's packets carry (see struct snat_entry). */
static __always_inline void lb_snat_other_key(struct flow_key *other, const struct snat_entry *e,
                                              __u8 proto, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL) {
        other->src = e->nat.addr;
        other->sport = e->nat.port;
        other->dst = e->peer_addr;
        other->dport = e->peer_port;
    } else {
        other->src = e->peer_addr;
        other->sport = e->peer_port;
        other->dst = e->nat.addr;
        other->dport = e->nat.port;
    }
    other->proto = proto;
    other->pad[0] = other->pad[1] = other->pad[2] = 0;
}

/* The other direction's entry: it rewrites back to what this direction's packets carry. */
static __always_inline void lb_snat_other_entry(struct snat_entry *other, const struct snat_entry *e,
                                                const struct flow_key *key, enum lb_dir dir)
{
    *other = *e;
    if (dir == LB_DIR_ORIGINAL) {
        other->nat.addr = key->dst;     /* the VIP */
        other->nat.port = key->dport;
        other->peer_addr = key->src;    /* the client */
        other->peer_port = key->sport;
    } else {
        other->nat.addr = key->src;     /* the backend */
        other->nat.port = key->sport;
        other->peer_addr = key->dst;    /* the SNAT address and port */
        other->peer_port = key->dport;
    }
    other->nat.nh_ifindex = 0;
}

/* A claimed port is free again once its flow has expired; a closed TCP flow's port waits
 * out TIME_WAIT too, so the backend never sees a new SYN on a tuple it still holds. */
static __always_inline int lb_snat_reusable(const struct snat_entry *e, __u64 now)
{
    __u64 age = lb_age_ns(now, e->nat.last_seen_ns);
    if (age <= lb_timeout_ns(e->nat.state))
        return 0;
    return e->nat.state != LB_FLOW_CLOSING || age > LB_SNAT_TIME_WAIT_NS;
}

/* Takes `key` (backend -> SNAT addr:port) over for a new flow's reply entry when the flow
 * that held it has expired. One compare-and-swap on the old entry's last_seen decides, so two
 * CPUs cannot both win it; the winner then replaces the entry whole (a reader sees the old
 * entry or the new one). */
static __always_inline int lb_snat_take_over(struct flow_key *key, struct snat_entry *reply, __u64 now)
{
    struct snat_entry *old = snat_rnat.lookup(key);
    if (!old)
        return snat_rnat.insert(key, reply) == 0;   /* freed (LRU) since the first pass */
    if (!lb_snat_reusable(old, now))
        return 0;
    __u64 seen = old->nat.last_seen_ns;
    if (__sync_val_compare_and_swap(&old->nat.last_seen_ns, seen, now) != seen)
        return 0;
    return snat_rnat.update(key, reply) == 0;
}

/* The SNAT address for a new flow to `be`: one of the VIP's (by the flow hash, so a client's
 * retries keep it), else the source the kernel would use toward the backend. 0: none. */
static __always_inline __be32 lb_snat_source(struct xdp_md *ctx, const struct snat_cfg *cfg,
                                             const struct backend *be, __u32 hash, struct iphdr *ip)
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
        return cfg->addrs[i];
    }
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
    return fib.ipv4_src;
}

static __always_inline int lb_snat_drop(__u32 vip_id, __u32 outcome, __u64 bytes)
{
    struct lb_counters *vc = stats_vip.lookup(&vip_id);
    if (vc)
        vc->drops++;
    return lb_outcome(outcome, bytes, XDP_DROP);
}

/* Rewrites both ends of the packet by a full-NAT entry of direction `dir`. */
static __always_inline void lb_snat_rewrite(struct lb_packet *pkt, const struct snat_entry *e,
                                            enum lb_dir dir)
{
    int orig = dir == LB_DIR_ORIGINAL;
    lb_rewrite(pkt, orig, e->nat.addr, e->nat.port);
    lb_rewrite(pkt, !orig, e->peer_addr, e->peer_port);
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

/* Moves a full-NAT flow on by this packet in both directions' entries (as lb_flow_refresh
 * does for NAT). A client packet whose reply entry is gone (LRU) claims its port back:
 * create-only, so a port another flow holds meanwhile is never taken from it. */
static __always_inline int lb_snat_refresh(struct snat_entry *e, struct flow_key *key,
                                           __be32 tcp_flags, __u64 now, enum lb_dir dir)
{
    __u8 next = lb_next_state(e->nat.state, tcp_flags, key->proto);
    if (next == e->nat.state && lb_age_ns(now, e->nat.last_seen_ns) <= LB_REFRESH_INTERVAL_NS)
        return 0;
    e->nat.state = next;
    e->nat.last_seen_ns = now;

    struct flow_key other_key = {};
    lb_snat_other_key(&other_key, e, key->proto, dir);
    struct snat_entry *other = dir == LB_DIR_ORIGINAL ? snat_rnat.lookup(&other_key)
                                                      : snat_flows.lookup(&other_key);
    if (other) {
        other->nat.state = next;
        other->nat.last_seen_ns = now;
    } else if (dir == LB_DIR_ORIGINAL) {
        __u32 zero = 0;
        struct lb_snat_scratch *sc = snat_scratch.lookup(&zero);
        if (sc) {
            lb_snat_other_entry(&sc->back, e, key, dir);
            snat_rnat.insert(&other_key, &sc->back);
        }
    }
    return 1;
}

/* A packet of a live full-NAT flow, either direction. */
static __always_inline int lb_snat_forward(struct xdp_md *ctx, struct lb_packet *pkt,
                                           struct snat_entry *e, __u64 now, __u64 bytes,
                                           enum lb_dir dir)
{
    int refreshed = lb_snat_refresh(e, &pkt->key, pkt->tcp_flags, now, dir);
    lb_count_flow(e->nat.vip_id, e->nat.backend_id, bytes, 0);
    lb_snat_rewrite(pkt, e, dir);
    if (pkt->more_fragments)
        lb_snat_record_fragment(pkt, e->nat.vip_id, e->nat.backend_id, now);
    return lb_forward(ctx, pkt, bytes, &e->nat, refreshed);
}

/* A client's packet to a full-NAT VIP with no live flow: the ring picks the backend, a SNAT
 * address and a free port are claimed, and both directions are tracked. */
static __always_inline int lb_snat_new_flow(struct xdp_md *ctx, struct lb_packet *pkt,
                                            struct vip_meta *vip, __u64 now, __u64 bytes)
{
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = lb_pick(vip, &pkt->key, &be, &slot);
    if (id == LB_NO_BACKEND || !be)
        return lb_drop_no_backend(vip->vip_id, bytes);
    __u32 vip_id = vip->vip_id;
    struct snat_cfg *cfg = snat_cfg.lookup(&vip_id);
    if (!cfg || cfg->port_min == 0 || cfg->port_max < cfg->port_min)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_SOURCE, bytes);
    __be32 source = lb_snat_source(ctx, cfg, be, lb_flow_hash(&pkt->key, 0), pkt->ip);
    if (!source)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_SOURCE, bytes);

    __u32 zero = 0;
    struct lb_snat_scratch *sc = snat_scratch.lookup(&zero);
    if (!sc)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_PORT, bytes);
    struct snat_entry *fwd = &sc->fwd;
    __builtin_memset(fwd, 0, sizeof(*fwd));
    fwd->nat.addr = be->addr;
    fwd->nat.port = be->port;
    fwd->nat.backend_id = id;
    fwd->nat.vip_id = vip_id;
    fwd->nat.created_ns = now;
    fwd->nat.last_seen_ns = now;
    fwd->nat.state = lb_initial_state(pkt->tcp_flags, pkt->key.proto);
    fwd->nat.forwarding = LB_FWD_FULLNAT;
    fwd->peer_addr = source;
    /* The reply entry does not depend on the port: only its key does. */
    lb_snat_other_entry(&sc->back, fwd, &pkt->key, LB_DIR_ORIGINAL);

    /* Linear probing from a random start: a range no larger than the tries is covered whole,
     * and CPUs claiming at once start apart. First a free port (a create-only insert), then,
     * among the first few, one whose flow has expired: two passes keep the program small
     * enough for the verifier (bcc cannot hand it a bpf_loop callback). */
    __u32 range = (__u32)cfg->port_max - cfg->port_min + 1;
    __u32 start = bpf_get_prandom_u32() % range;
    __u16 port_min = cfg->port_min;
    struct flow_key rkey = {};
    int claimed = 0;
    /* One bound, a constant: with a second (`i < range`) clang merges both into one the
     * verifier cannot bound. A range smaller than the tries is walked more than once. */
    for (__u32 i = 0; i < LB_SNAT_PORT_TRIES; i++) {
        fwd->peer_port = bpf_htons((__u16)(port_min + (start + i) % range));
        lb_snat_other_key(&rkey, fwd, pkt->key.proto, LB_DIR_ORIGINAL);
        if (snat_rnat.insert(&rkey, &sc->back) == 0) {
            claimed = 1;
            break;
        }
    }
    for (__u32 i = 0; i < LB_SNAT_TAKEOVER_TRIES && !claimed; i++) {
        fwd->peer_port = bpf_htons((__u16)(port_min + (start + i) % range));
        lb_snat_other_key(&rkey, fwd, pkt->key.proto, LB_DIR_ORIGINAL);
        claimed = lb_snat_take_over(&rkey, &sc->back, now);
    }
    if (!claimed)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_PORT, bytes);
    snat_flows.update(&pkt->key, fwd);

    lb_count_flow(vip_id, id, bytes, 1);
    lb_snat_rewrite(pkt, fwd, LB_DIR_ORIGINAL);
    if (pkt->more_fragments)
        lb_snat_record_fragment(pkt, vip_id, id, now);
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}

/* A backend's reply to a SNAT address and port: back to the client from the VIP. An ended
 * flow's entry stays (its port waits to be reusable) and the packet goes to the kernel. */
static __always_inline int lb_snat_from_backend(struct xdp_md *ctx, struct lb_packet *pkt,
                                                struct snat_entry *e, __u64 bytes)
{
    if (pkt->ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    __u64 now = lb_now_ns();
    if (!lb_entry_live(&e->nat, now, pkt->tcp_flags, LB_DIR_REPLY))
        return lb_outcome(LB_PASS_STALE_REPLY, bytes, XDP_PASS);
    return lb_snat_forward(ctx, pkt, e, now, bytes, LB_DIR_REPLY);
}

/* A later fragment of a full-NAT datagram; -1 when none of ours was recorded. */
static __always_inline int lb_snat_fragment(struct xdp_md *ctx, struct lb_packet *pkt, __u64 bytes)
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
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    lb_count_flow(fe->vip_id, fe->backend_id, bytes, 0);
    lb_rewrite_addr(ip, 0, fe->saddr);
    lb_rewrite_addr(ip, 1, fe->daddr);
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}

/* An ICMP error about a full-NAT flow; -1 when it quotes none. `key` is the quoted packet's
 * tuple reversed: the tuple of the packets the error answers for.
 * From the backend's side, quoting SNAT->backend: to the client, quoting client->VIP, sent
 * by the VIP when the backend itself sent it (as NAT mode does).
 * From the client's side, quoting VIP->client: to the backend, quoting backend->SNAT, and
 * sent by the SNAT address, the only one of ours the backend knows how to reach. */
static __always_inline int lb_snat_icmp(struct xdp_md *ctx, struct lb_packet *pkt,
                                        struct icmphdr *icmp, struct iphdr *inner,
                                        struct lb_quoted_ports *ports, __u16 *l4_check,
                                        struct flow_key *key, __u64 bytes)
{
    enum lb_dir dir = LB_DIR_REPLY;
    struct snat_entry *e = snat_rnat.lookup(key);
    if (!e) {
        dir = LB_DIR_ORIGINAL;
        e = snat_flows.lookup(key);
    }
    if (!e)
        return -1;
    if (pkt->ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    __u16 *icmp_check = &icmp->checksum;
    struct iphdr *ip = pkt->ip;
    if (dir == LB_DIR_REPLY) {
        /* The quote is SNAT->backend: its source goes back to the client, its destination to the VIP. */
        if (ip->saddr == inner->daddr)
            lb_set_ip_addr(ip, &ip->saddr, e->nat.addr);
        lb_set_ip_addr(ip, &ip->daddr, e->peer_addr);
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 1, e->peer_addr, e->peer_port);
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 0, e->nat.addr, e->nat.port);
    } else {
        /* The quote is VIP->client: it becomes backend->SNAT. */
        lb_set_ip_addr(ip, &ip->saddr, e->peer_addr);
        lb_set_ip_addr(ip, &ip->daddr, e->nat.addr);
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 1, e->nat.addr, e->nat.port);
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 0, e->peer_addr, e->peer_port);
    }
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}
