/* lb_ctx.h: what the program's two builds differ in. The same source runs as an XDP program
 * (the default) and, built with LB_TC, as a tc (sched_cls, direct-action) program on the
 * ingress hook: there it works on the socket buffer the stack already has, without generic
 * XDP's copy of every cloned or paged skb. Only the context type, the verdict codes, the
 * frame's length and byte loads differ; every decision is the same code. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#ifdef LB_TC
#define LB_CTX struct __sk_buff
#define LB_ACT_PASS TC_ACT_OK
#define LB_ACT_DROP TC_ACT_SHOT
/* The whole packet: data_end ends the skb's linear part, len counts its pages too. */
#define lb_frame_len(ctx) ((__u64)(ctx)->len)
#define lb_load_bytes bpf_skb_load_bytes
#else
#define LB_CTX struct xdp_md
#define LB_ACT_PASS XDP_PASS
#define LB_ACT_DROP XDP_DROP
#define lb_frame_len(ctx) ((__u64)((ctx)->data_end - (ctx)->data))
#define lb_load_bytes bpf_xdp_load_bytes
#endif

/* A frame sent back out of the interface it came in on: XDP_TX, or for tc a redirect to the
 * ingress device's egress (the same transmit path, in the skb's world). */
static __always_inline int lb_act_tx(LB_CTX *ctx)
{
#ifdef LB_TC
    return bpf_redirect(ctx->ingress_ifindex, 0);
#else
    return XDP_TX;
#endif
}

/* The verdict in XDP's codes, as `lbctl trace` reports both builds' actions. */
static __always_inline __u32 lb_xdp_action(int action)
{
#ifdef LB_TC
    if (action == TC_ACT_REDIRECT)
        return XDP_REDIRECT;
    if (action == TC_ACT_SHOT)
        return XDP_DROP;
    return XDP_PASS;
#else
    return action;
#endif
}
