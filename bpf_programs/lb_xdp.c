/* lb_xdp.c: XDP entry of the load balancer: VIP traffic goes to a backend picked by Maglev and
 * kept per flow, DNATed (two-arm NAT; backend replies are reverse-NATed), for a full-NAT VIP
 * source-NATed too (lb_snat.h), or, for a DSR VIP, sent on at L2 with only its MACs changed;
 * the rest passes. IPv6 frames go to lb_handle6 (lb_xdp6.h), IPv4 ones stay here. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "lb_consts.h"
#include "lb_ctx.h"
#include "lb_structs.h"
#include "lb_maps.h"
#include "lb_stats.h"
#include "lb_parse.h"
#include "lb_flow.h"
#include "lb_maglev.h"
#include "lb_nat.h"
#include "lb_fib.h"
#include "lb_frag.h"
#include "lb_icmp.h"
#include "lb_snat.h"
#include "lb_trace.h"
#include "lb_xdp6.h"

/* A client's packet of a live tracked flow: it goes to the flow's backend, in the mode the
 * flow began in (a VIP's mode change moves new flows only). */
static __always_inline int lb_flow_forward(LB_CTX *ctx, struct lb_packet *pkt,
                                           struct nat_entry *flow, __u64 now, __u64 bytes)
{
    int refreshed = lb_flow_refresh(flow, &pkt->key, pkt->tcp_flags, now, LB_DIR_ORIGINAL);
    lb_count_flow(flow->vip_id, flow->backend_id, bytes, 0);
    int l2_only = flow->forwarding == LB_FWD_DSR;
    if (pkt->more_fragments)
        lb_record_fragment(pkt, LB_DIR_ORIGINAL, flow->addr, flow->vip_id, flow->backend_id, now,
                           l2_only);
    if (l2_only)
        return lb_forward_l2(ctx, pkt, bytes, flow->addr, flow, refreshed);
    lb_rewrite(pkt, 1, flow->addr, flow->port);
    return lb_forward(ctx, pkt, bytes, flow, refreshed);
}

/* A client's packet to a VIP with no live flow: the VIP's ring picks the backend. `old`: the
 * ended flow its key still finds, if any (lb_flow_create reuses its entries). */
static __always_inline int lb_new_flow(LB_CTX *ctx, struct lb_packet *pkt,
                                       struct vip_meta *vip, __u64 now, __u64 bytes,
                                       struct nat_entry *old)
{
    /* lb_handle let TTL 1 through for a DSR flow that has ended; if its VIP has since
     * turned to NAT, the new flow is routed and the kernel must see the TTL expire. */
    if (pkt->ip->ttl <= 1 && !(vip->flags & LB_VIP_F_DSR))
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = lb_pick(vip, &pkt->key, &be, &slot);
    if (id == LB_NO_BACKEND || !be)
        return lb_drop_no_backend(vip->vip_id, bytes);
    struct nat_entry fresh = {};
    fresh.addr = be->addr;
    fresh.port = be->port;
    fresh.backend_id = id;
    fresh.vip_id = vip->vip_id;
    fresh.forwarding = lb_vip_forwarding(vip->flags);
    int l2_only = fresh.forwarding == LB_FWD_DSR;
    lb_flow_create(&pkt->key, &fresh, pkt->tcp_flags, now, old);

    lb_count_flow(fresh.vip_id, fresh.backend_id, bytes, 1);
    if (pkt->more_fragments)
        lb_record_fragment(pkt, LB_DIR_ORIGINAL, fresh.addr, fresh.vip_id, fresh.backend_id, now,
                           l2_only);
    /* DSR: the backend's port is the VIP's (the control plane refuses others), so the frame
     * needs no rewrite above Ethernet. */
    if (l2_only)
        return lb_forward_l2(ctx, pkt, bytes, fresh.addr, NULL, 0);
    lb_rewrite(pkt, 1, fresh.addr, fresh.port);
    /* The entry is on the stack here: its next hop is cached by the flow's first hit. */
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}

static __always_inline int lb_from_backend(LB_CTX *ctx, struct lb_packet *pkt,
                                           struct nat_entry *back, __u64 now, __u64 bytes)
{
    if (!lb_entry_live(back, now, pkt->tcp_flags, LB_DIR_REPLY)) {
        lb_flow_forget(&pkt->key, LB_DIR_REPLY);
        return lb_outcome(LB_PASS_STALE_REPLY, bytes, LB_ACT_PASS);
    }
    int refreshed = lb_flow_refresh(back, &pkt->key, pkt->tcp_flags, now, LB_DIR_REPLY);

    lb_count_flow(back->vip_id, back->backend_id, bytes, 0);
    if (pkt->more_fragments)
        lb_record_fragment(pkt, LB_DIR_REPLY, back->addr, back->vip_id, back->backend_id, now, 0);
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
    out->forwarding = lb_vip_forwarding(vip->flags);
    struct nat_entry *flow = lb_flow_lookup(&pkt->key, LB_DIR_ORIGINAL);
    if (!flow) {
        struct snat_entry *snat = snat_flows.lookup(&pkt->key);
        flow = snat ? &snat->nat : NULL;
    }
    if (flow && lb_flow_usable(flow, now, pkt->tcp_flags)) {
        out->verdict = LB_EXPLAIN_FLOW_HIT;
        out->backend_id = flow->backend_id;
        out->backend_addr = flow->addr;
        out->backend_port = flow->port;
        out->flow_state = flow->state;
        out->forwarding = flow->forwarding;
        out->flow_age_ms = lb_age_ns(now, flow->created_ns) / 1000000;
        return LB_ACT_PASS;
    }
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = lb_pick(vip, &pkt->key, &be, &slot);
    out->slot = slot;
    if (id == LB_NO_BACKEND || !be) {
        out->verdict = LB_EXPLAIN_NO_BACKEND;
        out->backend_id = LB_NO_BACKEND;
        return LB_ACT_PASS;
    }
    out->verdict = LB_EXPLAIN_RING;
    out->backend_id = id;
    out->backend_addr = be->addr;
    out->backend_port = be->port;
    return LB_ACT_PASS;
}

static __always_inline struct vip_meta *lb_vip_lookup(const struct flow_key *key)
{
    struct vip_key vk = {};
    vk.addr = key->dst;
    vk.port = key->dport;
    vk.proto = key->proto;
    return vips.lookup(&vk);
}

static __always_inline int lb_handle(LB_CTX *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u64 bytes = lb_frame_len(ctx);

    /* IPv6 takes its own path (lb_xdp6.h); the IPv4 one below is as it was. */
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IPV6))
        return lb_handle6(ctx);

    /* Declared after the IPv6 branch, so that its stack slots can be the IPv6 path's too (one
     * 512-byte frame holds both families, full-NAT and the trace, all inlined). */
    struct lb_packet pkt = {};
    int verdict = lb_parse(data, data_end, bytes, &pkt);
    if (verdict >= 0)
        return lb_outcome(verdict, bytes, LB_ACT_PASS);
    if (verdict == LB_PARSED_ICMP)
        return lb_icmp(ctx, &pkt, data_end, bytes);
    if (verdict == LB_PARSED_FRAGMENT) {
        int action = lb_snat_fragment(ctx, &pkt, bytes);
        return action >= 0 ? action : lb_fragment(ctx, &pkt, bytes);
    }

#ifndef LB_TC
    /* Live frames carry no metadata (data_meta == data): one compare on the hot path. The
     * tc build is never asked: `lbctl explain` test-runs the XDP build. */
    struct lb_explain *explain = (void *)(long)ctx->data_meta;
    if ((void *)(explain + 1) <= data && explain->magic == LB_EXPLAIN_MAGIC) {
        struct vip_meta *vip = lb_vip_lookup(&pkt.key);
        if (!vip) {
            explain->verdict = LB_EXPLAIN_NOT_VIP;
            return LB_ACT_PASS;
        }
        return lb_explain(&pkt, vip, explain);
    }
#endif

    /* Tracked traffic is looked up first, so that a flow hit, the common packet, needs no
     * other lookup: a client's packet of a flow, else a backend's reply, else maybe a VIP's
     * new flow. No key is in two of these tables: a flow's key ends at a VIP, a reply's at a
     * client. A flow outlives its VIP only while `vip del` forgets the VIP's flows.
     * Full-NAT keeps its own tables (lb_snat.h): its flows are looked up once the VIP is
     * known (a flow hit costs one lookup more than NAT's; a NAT SYN one more too), and a
     * reply to a SNAT address last, when nothing else claimed the packet. */
    struct nat_entry *flow = lb_flow_lookup(&pkt.key, LB_DIR_ORIGINAL);
    struct nat_entry *back = NULL;
    struct vip_meta *vip = NULL;
    if (!flow) {
        back = lb_flow_lookup(&pkt.key, LB_DIR_REPLY);
        if (!back) {
            vip = lb_vip_lookup(&pkt.key);
            if (!vip) {
                /* Last, a backend's reply to a full-NAT source address and port; only
                 * while full-NAT is in use (dp_config): other hosts pay no hash lookup. */
                struct snat_entry *snat_back =
                    lb_dp_on(LB_DP_F_FULLNAT) ? snat_rnat.lookup(&pkt.key) : NULL;
                if (snat_back)
                    return lb_snat_from_backend(ctx, &pkt, snat_back, bytes);
                return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
            }
        }
    }
    /* The kernel must see TTL expiry to send its ICMP error; nothing was rewritten yet. DSR
     * is no routing hop (the TTL is not decremented), so its frames go on whatever their TTL. */
    int l2_only = flow ? flow->forwarding == LB_FWD_DSR : (vip && (vip->flags & LB_VIP_F_DSR));
    if (pkt.ip->ttl <= 1 && !l2_only)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    __u64 now = lb_now_ns();
    if (back)
        return lb_from_backend(ctx, &pkt, back, now, bytes);
    if (flow && lb_flow_usable(flow, now, pkt.tcp_flags))
        return lb_flow_forward(ctx, &pkt, flow, now, bytes);
    /* No flow, or one that ended: the VIP's ring decides, if the VIP is still there. */
    if (!vip)
        vip = lb_vip_lookup(&pkt.key);
    if (!vip)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    /* A full-NAT flow ends full-NAT even if its VIP changed mode since (as NAT flows do).
     * Looked for only while full-NAT is in use (dp_config: a full-NAT VIP, or replies to one
     * still tracked): a NAT VIP's new flow pays no lookup of a table it never fills. */
    struct snat_entry *snat = lb_dp_on(LB_DP_F_FULLNAT) ? snat_flows.lookup(&pkt.key) : NULL;
    if (snat && lb_flow_usable(&snat->nat, now, pkt.tcp_flags))
        return lb_snat_forward(ctx, &pkt, snat, now, bytes, LB_DIR_ORIGINAL);
    if (vip->flags & LB_VIP_F_FULLNAT)
        return lb_snat_new_flow(ctx, &pkt, vip, now, bytes);
    return lb_new_flow(ctx, &pkt, vip, now, bytes, flow);
}

/* The tc build's TCP/UDP checksum updates, made after the program's last access to the
 * packet (lb_csum.h); the XDP build made them as it rewrote. */
static __always_inline int lb_tc_finish(LB_CTX *ctx, int action)
{
#ifdef LB_TC
    lb_l4_fix_apply(ctx);
#endif
    return action;
}

#ifdef LB_TC
/* The tc build's headers must be in the skb's linear part, where direct access reaches: a
 * socket's paged skb may hold less there. At most this many bytes are pulled, and only
 * when short (the pull copies, and may reallocate the skb's head). */
#define LB_TC_HEAD_BYTES 128

/* How many leading bytes the parsers read in place for this frame: Ethernet, IP and the
 * TCP or UDP header (lb_parse, lb_parse6). A local socket's TCP segment holds exactly its
 * headers in the linear part and its payload in pages; pulling the first 128 bytes moved
 * payload into the linear part on every such segment (a copy, often a new head), and the
 * receiving socket then copied it out by the slower, checked path: about 0.1 ms of the
 * 10 ms of CPU per 1,000 keep-alive requests, in perf (docs/benchmarks.md, 2026-12-03).
 * ICMP (quoted headers), IPv6 extension headers and frames too short to tell get the whole
 * bound. */
static __always_inline __u32 lb_tc_head_need(void *data, void *data_end, __u32 bound)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return bound;
    __u32 need = bound;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return bound;
        __u32 l4 = sizeof(*eth) + ip->ihl * 4;
        if (ip->frag_off & bpf_htons(IP_OFFSET))
            need = l4;             /* a later fragment: no L4 header */
        else if (ip->protocol == IPPROTO_TCP)
            need = l4 + sizeof(struct tcphdr);
        else if (ip->protocol == IPPROTO_UDP)
            need = l4 + sizeof(struct udphdr);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return bound;
        if (ip6->nexthdr == IPPROTO_TCP)
            need = sizeof(*eth) + sizeof(*ip6) + sizeof(struct tcphdr);
        else if (ip6->nexthdr == IPPROTO_UDP)
            need = sizeof(*eth) + sizeof(*ip6) + sizeof(struct udphdr);
    } else {
        need = sizeof(*eth);       /* neither family: passed on the EtherType alone */
    }
    return need < bound ? need : bound;
}

int tc_lb(struct __sk_buff *ctx)
#else
int xdp_lb(struct xdp_md *ctx)
#endif
{
#ifdef LB_TC
    __u32 head = ctx->len < LB_TC_HEAD_BYTES ? ctx->len : LB_TC_HEAD_BYTES;
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    if (data + head > data_end) {
        head = lb_tc_head_need(data, data_end, head);
        if (data + head > data_end)
            bpf_skb_pull_data(ctx, head);
    }
    lb_l4_fix_reset();
#endif
#ifdef LB_WITHOUT_TRACE
    /* A build without `lbctl trace`: the bench measures what the switched-off trace costs a
     * packet against it (xdp/program.py WITHOUT_TRACE). The maps are still declared. */
    return lb_tc_finish(ctx, lb_handle(ctx));
#endif
    /* Whether this packet is traced is kept in its scratch entry (memory whose contents the
     * verifier does not track), not in a register live across lb_handle: with a pointer that
     * is NULL on one path and not on the other, the verifier checked lb_handle once per trace
     * state, 3.4x the instructions (489k of its 1M limit before full-NAT over IPv6 came). */
    __u32 zero = 0;
    struct lb_trace_scratch *s = trace_scratch.lookup(&zero);
    if (!s)
        return LB_ACT_PASS;    /* cannot happen: the one entry of a per-CPU array */
    struct lb_trace_ctl *trace = lb_trace_on();
    s->active = trace && lb_trace_begin(ctx, trace);
    /* The tc build's checksums are made before the trace's snapshot: it shows the frame as
     * it leaves. */
    int action = lb_tc_finish(ctx, lb_handle(ctx));
    if (s->active) {
        s->active = 0;
        trace = lb_trace_on();
        if (trace)
            lb_trace_end(ctx, trace, s, lb_xdp_action(action));
    }
    return action;
}
