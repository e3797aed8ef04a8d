/* lb_stats.h: per-CPU counters by outcome, per VIP and per backend. */
#pragma once

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
