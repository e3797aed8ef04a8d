/* lb_stats.h: per-CPU counters by outcome, per VIP and per backend. */
#pragma once

#include <uapi/linux/bpf.h>

#include "lb_ctx.h"
#include "lb_maps.h"

static __always_inline int lb_outcome(__u32 outcome, __u64 bytes, int action)
{
    struct lb_counters *c = stats_global.lookup(&outcome);
    if (c) {
        c->packets++;
        c->bytes += bytes;
    }
    return action;
}

static __always_inline void lb_count(struct lb_counters *c, __u64 bytes, int new_flow)
{
    if (!c)
        return;
    c->packets++;
    c->bytes += bytes;
    c->new_flows += new_flow;
}

/* A packet of a VIP's flow, counted for its VIP and its backend. */
static __always_inline void lb_count_flow(__u32 vip_id, __u32 backend_id, __u64 bytes, int new_flow)
{
    lb_count(stats_vip.lookup(&vip_id), bytes, new_flow);
    lb_count(stats_backend.lookup(&backend_id), bytes, new_flow);
}

/* A VIP packet dropped for want of a backend: the VIP's `drops`, the global outcome. */
static __always_inline int lb_drop_no_backend(__u32 vip_id, __u64 bytes)
{
    struct lb_counters *vc = stats_vip.lookup(&vip_id);
    if (vc)
        vc->drops++;
    return lb_outcome(LB_DROP_NO_BACKEND, bytes, LB_ACT_DROP);
}
