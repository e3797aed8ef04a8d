/* lb_xdp6.h: the IPv6 path (NAT66, two-arm): a v6 VIP's traffic is DNATed to a backend picked
 * by the VIP's Maglev ring and kept per flow in flows6; replies are reverse-NATed by rnat6;
 * a full-NAT VIP's flows are source-NATed too (lb_snat6.h); ICMPv6 errors about tracked
 * flows are translated; later fragments follow their first (lb_frag6.h); everything else
 * passes untouched. VIP and backend ids, rings and
 * counters are the IPv4 path's (one id space). */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>

#include "lb_ctx.h"
#include "lb_consts.h"
#include "lb_structs.h"
#include "lb_maps.h"
#include "lb_maps6.h"
#include "lb_stats.h"
#include "lb_flow.h"
#include "lb_maglev.h"
#include "lb_parse6.h"
#include "lb_flow6.h"
#include "lb_nat6.h"
#include "lb_fib6.h"
#include "lb_icmp6.h"
#include "lb_frag6.h"
#include "lb_snat6.h"

static __always_inline struct vip_meta *lb_vip6_lookup(const struct flow_key6 *key)
{
    struct vip_key6 vk = {};
    lb_addr6_copy(vk.addr, key->dst);
    vk.port = key->dport;
    vk.proto = key->proto;
    return vips6.lookup(&vk);
}

static __always_inline int lb_flow6_forward(LB_CTX *ctx, struct lb_packet6 *pkt,
                                            struct nat_entry6 *flow, __u64 now, __u64 bytes)
{
    int refreshed = lb_flow6_refresh(flow, &pkt->key, pkt->tcp_flags, now, LB_DIR_ORIGINAL);
    lb_count_flow(flow->e.vip_id, flow->e.backend_id, bytes, 0);
    int l2_only = flow->e.forwarding == LB_FWD_DSR;
    if (pkt->more_fragments)
        lb_record_fragment6(pkt, LB_DIR_ORIGINAL, flow->addr, flow->e.vip_id, flow->e.backend_id,
                            now, l2_only);
    if (l2_only)
        return lb_forward6_l2(ctx, pkt, bytes, flow->addr, &flow->e, refreshed);
    lb_rewrite6(pkt, 1, flow->addr, flow->e.port);
    return lb_forward6(ctx, pkt, bytes, &flow->e, refreshed);
}

static __always_inline int lb_new_flow6(LB_CTX *ctx, struct lb_packet6 *pkt,
                                        struct vip_meta *vip, __u64 now, __u64 bytes,
                                        struct nat_entry6 *old)
{
    /* lb_handle6 let hop limit 1 through for a DSR flow that ended; a new NAT flow is a
     * routing hop, and the kernel must see the limit run out. */
    __u8 forwarding = lb_vip_forwarding(vip->flags);
    if (pkt->ip6->hop_limit <= 1 && forwarding != LB_FWD_DSR)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = lb_pick6(vip, &pkt->key, &be, &slot);
    if (id == LB_NO_BACKEND || !be)
        return lb_drop_no_backend(vip->vip_id, bytes);
    struct lb_scratch6 *s = lb_scratch6();
    if (!s)
        return lb_drop_no_backend(vip->vip_id, bytes);
    __be32 addr[4];
    lb_addr6_copy(addr, be->addr6);
    __be16 port = be->port;
    struct nat_entry6 *fresh = &s->entry;
    __builtin_memset(fresh, 0, sizeof(*fresh));
    lb_addr6_copy(fresh->addr, addr);
    fresh->e.port = port;
    fresh->e.backend_id = id;
    fresh->e.vip_id = vip->vip_id;
    fresh->e.forwarding = forwarding;
    lb_flow6_create(s, &pkt->key, fresh, pkt->tcp_flags, now, old);

    lb_count_flow(vip->vip_id, id, bytes, 1);
    if (pkt->more_fragments)
        lb_record_fragment6(pkt, LB_DIR_ORIGINAL, addr, vip->vip_id, id, now,
                            forwarding == LB_FWD_DSR);
    /* DSR: the backend's port is the VIP's (the control plane refuses others). */
    if (forwarding == LB_FWD_DSR)
        return lb_forward6_l2(ctx, pkt, bytes, addr, NULL, 0);
    lb_rewrite6(pkt, 1, addr, port);
    return lb_forward6(ctx, pkt, bytes, NULL, 0);
}

static __always_inline int lb_from_backend6(LB_CTX *ctx, struct lb_packet6 *pkt,
                                            struct nat_entry6 *back, __u64 now, __u64 bytes)
{
    if (!lb_entry_live(&back->e, now, pkt->tcp_flags, LB_DIR_REPLY)) {
        lb_flow6_forget(&pkt->key, LB_DIR_REPLY);
        return lb_outcome(LB_PASS_STALE_REPLY, bytes, LB_ACT_PASS);
    }
    int refreshed = lb_flow6_refresh(back, &pkt->key, pkt->tcp_flags, now, LB_DIR_REPLY);
    lb_count_flow(back->e.vip_id, back->e.backend_id, bytes, 0);
    if (pkt->more_fragments)
        lb_record_fragment6(pkt, LB_DIR_REPLY, back->addr, back->e.vip_id, back->e.backend_id,
                            now, 0);
    lb_rewrite6(pkt, 0, back->addr, back->e.port);
    return lb_forward6(ctx, pkt, bytes, &back->e, refreshed);
}

/* `lbctl explain` for an IPv6 VIP: lb_explain's answer, nothing created, counted or rewritten. */
static __always_inline int lb_explain6(struct lb_packet6 *pkt, struct lb_explain *out)
{
    struct vip_meta *vip = lb_vip6_lookup(&pkt->key);
    if (!vip) {
        out->verdict = LB_EXPLAIN_NOT_VIP;
        return LB_ACT_PASS;
    }
    __u64 now = lb_now_ns();
    out->vip_id = vip->vip_id;
    out->ring_generation = vip->ring_generation & 1;
    struct nat_entry6 *flow = lb_flow6_lookup(&pkt->key, LB_DIR_ORIGINAL);
    if (!flow) {
        struct snat_entry6 *snat = snat_flows6.lookup(&pkt->key);
        flow = snat ? &snat->nat : NULL;
    }
    out->forwarding = lb_vip_forwarding(vip->flags);
    if (flow && lb_flow6_usable(flow, now, pkt->tcp_flags)) {
        out->forwarding = flow->e.forwarding;
        out->verdict = LB_EXPLAIN_FLOW_HIT;
        out->backend_id = flow->e.backend_id;
        lb_addr6_copy(out->backend_addr6, flow->addr);
        out->backend_port = flow->e.port;
        out->flow_state = flow->e.state;
        out->flow_age_ms = lb_age_ns(now, flow->e.created_ns) / 1000000;
        return LB_ACT_PASS;
    }
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = lb_pick6(vip, &pkt->key, &be, &slot);
    out->slot = slot;
    if (id == LB_NO_BACKEND || !be) {
        out->verdict = LB_EXPLAIN_NO_BACKEND;
        out->backend_id = LB_NO_BACKEND;
        return LB_ACT_PASS;
    }
    out->verdict = LB_EXPLAIN_RING;
    out->backend_id = id;
    lb_addr6_copy(out->backend_addr6, be->addr6);
    out->backend_port = be->port;
    return LB_ACT_PASS;
}

/* The IPv6 twin of lb_handle: tracked traffic first, then replies, then a VIP's new flow. */
static __always_inline int lb_handle6(LB_CTX *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u64 bytes = lb_frame_len(ctx);
    struct lb_packet6 pkt = {};

    int verdict = lb_parse6(data, data_end, bytes, &pkt);
    if (verdict >= 0)
        return lb_outcome(verdict, bytes, LB_ACT_PASS);
    if (verdict == LB_PARSED_ICMP)
        return lb_icmp6(ctx, &pkt, data_end, bytes);
    /* A later fragment: its first fragment's table decides (lb_frag6.h). */
    if (verdict == LB_PARSED_FRAGMENT)
        return lb_fragment6(ctx, &pkt, bytes);

#ifndef LB_TC
    /* Live frames carry no metadata (data_meta == data): one compare on the hot path. */
    struct lb_explain *explain = (void *)(long)ctx->data_meta;
    if ((void *)(explain + 1) <= data && explain->magic == LB_EXPLAIN_MAGIC)
        return lb_explain6(&pkt, explain);
#endif

    struct nat_entry6 *flow = lb_flow6_lookup(&pkt.key, LB_DIR_ORIGINAL);
    struct nat_entry6 *back = NULL;
    struct vip_meta *vip = NULL;
    if (!flow) {
        back = lb_flow6_lookup(&pkt.key, LB_DIR_REPLY);
        if (!back) {
            vip = lb_vip6_lookup(&pkt.key);
            if (!vip) {
                /* Last, a backend's reply to a full-NAT source address and port. */
                struct snat_entry6 *snat_back =
                    lb_dp_on(LB_DP_F_FULLNAT6) ? snat_rnat6.lookup(&pkt.key) : NULL;
                if (snat_back)
                    return lb_snat6_from_backend(ctx, &pkt, snat_back, bytes);
                return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
            }
        }
    }
    /* The kernel must see the hop limit run out to send its ICMPv6 error. DSR is no routing
     * hop (the limit is kept), so its frames go on whatever their hop limit. */
    int l2_only = flow ? flow->e.forwarding == LB_FWD_DSR : (vip && (vip->flags & LB_VIP_F_DSR));
    if (pkt.ip6->hop_limit <= 1 && !l2_only)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    __u64 now = lb_now_ns();
    if (back)
        return lb_from_backend6(ctx, &pkt, back, now, bytes);
    if (flow && lb_flow6_usable(flow, now, pkt.tcp_flags))
        return lb_flow6_forward(ctx, &pkt, flow, now, bytes);
    if (!vip)
        vip = lb_vip6_lookup(&pkt.key);
    if (!vip)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    /* A full-NAT flow ends full-NAT even if its VIP changed mode since (as NAT flows do). */
    struct snat_entry6 *snat = lb_dp_on(LB_DP_F_FULLNAT6) ? snat_flows6.lookup(&pkt.key) : NULL;
    if (snat && lb_flow6_usable(&snat->nat, now, pkt.tcp_flags))
        return lb_snat6_forward(ctx, &pkt, snat, now, bytes, LB_DIR_ORIGINAL);
    if (vip->flags & LB_VIP_F_FULLNAT)
        return lb_snat6_new_flow(ctx, &pkt, vip, now, bytes);
    return lb_new_flow6(ctx, &pkt, vip, now, bytes, flow);
}
