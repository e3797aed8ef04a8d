/* lb_xdp.c: XDP entry of the two-arm NAT load balancer: VIP traffic is DNATed to a backend
 * picked by Maglev and kept per flow; backend replies are reverse-NATed; the rest passes. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <linux/socket.h>

#include "lb_consts.h"
#include "lb_structs.h"
#include "lb_maps.h"
#include "lb_stats.h"
#include "lb_csum.h"
#include "lb_parse.h"
#include "lb_nat.h"
#include "lb_icmp.h"

/* The coarse clock (a tick, a few ms) is ample for second-scale timeouts and cheaper. */
static __always_inline __u64 lb_now_ns(void)
{
    return bpf_ktime_get_coarse_ns();
}

/* murmur3's finaliser; a fixed mix so every balancer with the same seed picks the same slot. */
static __always_inline __u32 lb_mix32(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6bU;
    h ^= h >> 13;
    h *= 0xc2b2ae35U;
    h ^= h >> 16;
    return h;
}

static __always_inline __u32 lb_flow_hash(const struct flow_key *key)
{
    __u32 h = lb_mix32(key->src ^ LB_HASH_SEED);
    h = lb_mix32(h ^ key->dst);
    h = lb_mix32(h ^ (((__u32)key->sport << 16) | key->dport));
    return lb_mix32(h ^ key->proto);
}

static __always_inline __u64 lb_timeout_ns(__u8 state)
{
    switch (state) {
    case LB_FLOW_SYN:
        return LB_TCP_SYN_TIMEOUT_NS;
    case LB_FLOW_ESTABLISHED:
        return LB_TCP_ESTABLISHED_TIMEOUT_NS;
    case LB_FLOW_CLOSING:
        return LB_TCP_CLOSING_TIMEOUT_NS;
    default:
        return LB_UDP_TIMEOUT_NS;
    }
}

/* The state a tracked TCP flow moves to on this packet; UDP stays UDP. */
static __always_inline __u8 lb_next_state(__u8 state, __u8 tcp_flags, __u8 proto)
{
    if (proto != IPPROTO_TCP)
        return LB_FLOW_UDP;
    if (tcp_flags & (LB_TCP_FIN | LB_TCP_RST))
        return LB_FLOW_CLOSING;
    if (state == LB_FLOW_SYN && (tcp_flags & LB_TCP_ACK) && !(tcp_flags & LB_TCP_SYN))
        return LB_FLOW_ESTABLISHED;
    return state;
}

static __always_inline void lb_reply_key(struct flow_key *reply, const struct flow_key *fwd,
                                         __be32 backend_addr, __be16 backend_port)
{
    reply->src = backend_addr;
    reply->dst = fwd->src;
    reply->sport = backend_port;
    reply->dport = fwd->sport;
    reply->proto = fwd->proto;
    reply->pad[0] = reply->pad[1] = reply->pad[2] = 0;
}

/* now - then, or 0 when another CPU stamped `then` after we read the clock. */
static __always_inline __u64 lb_age_ns(__u64 now, __u64 then)
{
    return now > then ? now - then : 0;
}

/* A flow entry still forwards unless it timed out, or a fresh SYN reopens a closing one. */
static __always_inline int lb_entry_alive(const struct nat_entry *e, __u64 now, __u8 tcp_flags)
{
    if (lb_age_ns(now, e->last_seen_ns) > lb_timeout_ns(e->state))
        return 0;
    if (e->state == LB_FLOW_CLOSING && (tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN)
        return 0;
    return 1;
}

/* A tracked flow keeps its backend while alive; a backend marked down loses its flows, a
 * deleted one keeps them until they end. */
static __always_inline int lb_flow_usable(const struct nat_entry *flow, __u64 now, __u8 tcp_flags)
{
    if (!lb_entry_alive(flow, now, tcp_flags))
        return 0;
    __u32 id = flow->backend_id;
    struct backend *be = backends.lookup(&id);
    if (be && be->state == LB_BACKEND_DOWN && be->addr == flow->addr && be->port == flow->port)
        return 0;
    return 1;
}

/* Picks the backend for a new flow from the VIP's live ring; LB_NO_BACKEND when none. */
static __always_inline __u32 lb_pick(const struct vip_meta *vip, const struct flow_key *key,
                                     struct backend **out, __u32 *slot_out)
{
    if (vip->vip_id >= LB_MAX_VIPS)
        return LB_NO_BACKEND;
    __u32 slot = lb_flow_hash(key) % LB_RING_SIZE;
    *slot_out = slot;
    __u32 index = LB_RING_INDEX(vip->vip_id, vip->ring_generation, slot);
    __u32 *backend_id = rings.lookup(&index);
    if (!backend_id || *backend_id >= LB_MAX_BACKENDS)
        return LB_NO_BACKEND;
    __u32 id = *backend_id;
    struct backend *be = backends.lookup(&id);
    if (!be || !(be->flags & LB_BACKEND_F_IN_USE) || be->state != LB_BACKEND_ACTIVE)
        return LB_NO_BACKEND;
    *out = be;
    return id;
}

/* A first fragment about to be forwarded: its later fragments, which carry no ports, follow
 * it by (src, dst, IP id, proto) as the packet arrived, before the rewrite. */
static __always_inline void lb_record_fragment(const struct lb_packet *pkt, int rewrite_dst,
                                               __be32 addr, __u32 vip_id, __u32 backend_id,
                                               __u64 now)
{
    struct frag_key fk = {};
    fk.src = pkt->key.src;
    fk.dst = pkt->key.dst;
    fk.id = pkt->ip->id;
    fk.proto = pkt->key.proto;
    struct frag_entry fe = {};
    fe.addr = addr;
    fe.rewrite_dst = rewrite_dst;
    fe.vip_id = vip_id;
    fe.backend_id = backend_id;
    fe.seen_ns = now;
    frags.update(&fk, &fe);
}

/* A later fragment (no L4 header) goes where its datagram's first fragment went. */
static __always_inline int lb_fragment(struct xdp_md *ctx, struct lb_packet *pkt, __u64 bytes)
{
    struct iphdr *ip = pkt->ip;
    struct frag_key fk = {};
    fk.src = ip->saddr;
    fk.dst = ip->daddr;
    fk.id = ip->id;
    fk.proto = ip->protocol;
    struct frag_entry *fe = frags.lookup(&fk);
    /* Before its first fragment (reordered) or long after it: the kernel gets it untouched. */
    if (!fe || lb_age_ns(lb_now_ns(), fe->seen_ns) > LB_FRAG_TIMEOUT_NS)
        return lb_outcome(LB_PASS_FRAGMENT, bytes, XDP_PASS);
    if (ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    __u32 vip_id = fe->vip_id;
    __u32 backend_id = fe->backend_id;
    lb_count(stats_vip.lookup(&vip_id), bytes, 0);
    lb_count(stats_backend.lookup(&backend_id), bytes, 0);
    lb_rewrite_addr(ip, fe->rewrite_dst, fe->addr);
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}

static __always_inline int lb_from_client(struct xdp_md *ctx, struct lb_packet *pkt,
                                          struct vip_meta *vip, __u64 bytes)
{
    __u64 now = lb_now_ns();
    struct nat_entry *flow = flows.lookup(&pkt->key);
    struct nat_entry fresh = {};
    int new_flow = 0, refreshed = 0;

    if (flow && !lb_flow_usable(flow, now, pkt->tcp_flags))
        flow = NULL;

    if (!flow) {
        struct backend *be = NULL;
        __u32 slot = 0;
        __u32 id = lb_pick(vip, &pkt->key, &be, &slot);
        if (id == LB_NO_BACKEND || !be) {
            __u32 vip_id = vip->vip_id;
            struct lb_counters *vc = stats_vip.lookup(&vip_id);
            if (vc)
                vc->drops++;
            return lb_outcome(LB_DROP_NO_BACKEND, bytes, XDP_DROP);
        }
        fresh.addr = be->addr;
        fresh.port = be->port;
        fresh.backend_id = id;
        fresh.vip_id = vip->vip_id;
        fresh.created_ns = now;
        fresh.last_seen_ns = now;
        /* A flow first seen mid-stream (balancer restart, LRU eviction) is taken as established. */
        if (pkt->key.proto != IPPROTO_TCP)
            fresh.state = LB_FLOW_UDP;
        else if ((pkt->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN)
            fresh.state = LB_FLOW_SYN;
        else
            fresh.state = lb_next_state(LB_FLOW_ESTABLISHED, pkt->tcp_flags, IPPROTO_TCP);
        flows.update(&pkt->key, &fresh);

        struct flow_key reply = {};
        struct nat_entry back = fresh;
        lb_reply_key(&reply, &pkt->key, fresh.addr, fresh.port);
        back.addr = pkt->key.dst;
        back.port = pkt->key.dport;
        rnat.update(&reply, &back);
        flow = &fresh;
        new_flow = 1;
    } else {
        __u8 next = lb_next_state(flow->state, pkt->tcp_flags, pkt->key.proto);
        if (next != flow->state || lb_age_ns(now, flow->last_seen_ns) > LB_REFRESH_INTERVAL_NS) {
            refreshed = 1;
            flow->state = next;
            flow->last_seen_ns = now;
            /* Keep the reverse entry in step: an evicted or closing reply path follows us. */
            struct flow_key reply = {};
            lb_reply_key(&reply, &pkt->key, flow->addr, flow->port);
            struct nat_entry *back = rnat.lookup(&reply);
            if (back) {
                back->state = next;
                back->last_seen_ns = now;
            } else {
                struct nat_entry again = *flow;
                again.addr = pkt->key.dst;
                again.port = pkt->key.dport;
                again.nh_ifindex = 0;   /* the other direction has its own next hop */
                rnat.update(&reply, &again);
            }
        }
    }

    __u32 vip_id = flow->vip_id;
    __u32 backend_id = flow->backend_id;
    lb_count(stats_vip.lookup(&vip_id), bytes, new_flow);
    lb_count(stats_backend.lookup(&backend_id), bytes, new_flow);
    if (pkt->more_fragments)
        lb_record_fragment(pkt, 1, flow->addr, vip_id, backend_id, now);
    lb_rewrite(pkt, 1, flow->addr, flow->port);
    /* A new flow lives on the stack here: its next hop is cached by its first hit. */
    return lb_forward(ctx, pkt, bytes, new_flow ? NULL : flow, refreshed);
}

static __always_inline int lb_from_backend(struct xdp_md *ctx, struct lb_packet *pkt,
                                           struct nat_entry *back, __u64 bytes)
{
    __u64 now = lb_now_ns();
    /* An entry outlived by its connection must not catch traffic that merely reuses the
     * tuple (a direct client->backend connection from the same client port): expired, or a
     * SYN-ACK for a connection that has closed or whose SYN is long past. A new SYN through
     * the VIP re-creates the entry in the SYN state, so its own SYN-ACK is never stale. */
    int stale = lb_age_ns(now, back->last_seen_ns) > lb_timeout_ns(back->state);
    if ((pkt->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == (LB_TCP_SYN | LB_TCP_ACK) &&
        (back->state == LB_FLOW_CLOSING ||
         lb_age_ns(now, back->created_ns) > LB_TCP_SYN_TIMEOUT_NS))
        stale = 1;
    if (stale) {
        rnat.delete(&pkt->key);
        return lb_outcome(LB_PASS_STALE_REPLY, bytes, XDP_PASS);
    }

    __u8 next = lb_next_state(back->state, pkt->tcp_flags, pkt->key.proto);
    int refreshed = 0;
    if (next != back->state || lb_age_ns(now, back->last_seen_ns) > LB_REFRESH_INTERVAL_NS) {
        refreshed = 1;
        back->state = next;
        back->last_seen_ns = now;
        struct flow_key fwd = {};
        fwd.src = pkt->key.dst;
        fwd.dst = back->addr;
        fwd.sport = pkt->key.dport;
        fwd.dport = back->port;
        fwd.proto = pkt->key.proto;
        struct nat_entry *flow = flows.lookup(&fwd);
        if (flow) {
            flow->state = next;
            flow->last_seen_ns = now;
        }
    }

    __u32 vip_id = back->vip_id;
    __u32 backend_id = back->backend_id;
    lb_count(stats_vip.lookup(&vip_id), bytes, 0);
    lb_count(stats_backend.lookup(&backend_id), bytes, 0);
    if (pkt->more_fragments)
        lb_record_fragment(pkt, 0, back->addr, vip_id, backend_id, now);
    lb_rewrite(pkt, 0, back->addr, back->port);
    return lb_forward(ctx, pkt, bytes, back, refreshed);
}

/* `lbctl explain`: the decision lb_from_client would take for this packet, written into the
 * metadata instead of acted on: no flow is created, no counter moves, nothing is rewritten. */
static __always_inline int lb_explain(struct lb_packet *pkt, struct vip_meta *vip,
                                      struct lb_explain *out)
{
    __u64 now = lb_now_ns();
    out->vip_id = vip->vip_id;
    out->ring_generation = vip->ring_generation & 1;
    struct nat_entry *flow = flows.lookup(&pkt->key);
    if (flow && lb_flow_usable(flow, now, pkt->tcp_flags)) {
        out->verdict = LB_EXPLAIN_FLOW_HIT;
        out->backend_id = flow->backend_id;
        out->backend_addr = flow->addr;
        out->backend_port = flow->port;
        out->flow_state = flow->state;
        out->flow_age_ms = lb_age_ns(now, flow->created_ns) / 1000000;
        return XDP_PASS;
    }
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = lb_pick(vip, &pkt->key, &be, &slot);
    out->slot = slot;
    if (id == LB_NO_BACKEND || !be) {
        out->verdict = LB_EXPLAIN_NO_BACKEND;
        out->backend_id = LB_NO_BACKEND;
        return XDP_PASS;
    }
    out->verdict = LB_EXPLAIN_RING;
    out->backend_id = id;
    out->backend_addr = be->addr;
    out->backend_port = be->port;
    return XDP_PASS;
}

int xdp_lb(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u64 bytes = data_end - data;
    struct lb_packet pkt = {};

    int verdict = lb_parse(data, data_end, &pkt);
    if (verdict >= 0)
        return lb_outcome(verdict, bytes, XDP_PASS);
    if (verdict == LB_PARSED_ICMP)
        return lb_icmp(ctx, &pkt, data_end, bytes);
    if (verdict == LB_PARSED_FRAGMENT)
        return lb_fragment(ctx, &pkt, bytes);

    struct vip_key vk = {};
    vk.addr = pkt.key.dst;
    vk.port = pkt.key.dport;
    vk.proto = pkt.key.proto;
    struct vip_meta *vip = vips.lookup(&vk);

    /* Live frames carry no metadata (data_meta == data): one compare on the hot path. */
    struct lb_explain *explain = (void *)(long)ctx->data_meta;
    if ((void *)(explain + 1) <= data && explain->magic == LB_EXPLAIN_MAGIC) {
        if (!vip) {
            explain->verdict = LB_EXPLAIN_NOT_VIP;
            return XDP_PASS;
        }
        return lb_explain(&pkt, vip, explain);
    }

    struct nat_entry *back = NULL;
    if (!vip) {
        back = rnat.lookup(&pkt.key);
        if (!back)
            return lb_outcome(LB_PASS_NOT_VIP, bytes, XDP_PASS);
    }
    /* The kernel must see TTL expiry to send its ICMP error; nothing was rewritten yet. */
    if (pkt.ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    if (vip)
        return lb_from_client(ctx, &pkt, vip, bytes);
    return lb_from_backend(ctx, &pkt, back, bytes);
}
