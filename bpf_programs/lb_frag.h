/* lb_frag.h: IPv4 fragments: a forwarded first fragment is recorded, and its datagram's later
 * fragments (which carry no ports) follow it. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/ip.h>

#include "lb_ctx.h"
#include "lb_consts.h"
#include "lb_fib.h"
#include "lb_flow.h"
#include "lb_maps.h"
#include "lb_nat.h"
#include "lb_parse.h"
#include "lb_stats.h"

/* frag_entry.rewrite_dst for a DSR datagram: no address changes, the frame goes to the
 * backend `addr` at L2 (0 and 1 say which address a NATed datagram rewrites). */
#define LB_FRAG_L2_ONLY 2

/* A first fragment about to be forwarded in direction `dir`: its later fragments follow it by
 * (src, dst, IP id, proto) as the packet arrived, before the rewrite to `addr` (`l2_only`:
 * DSR, sent to the backend `addr` unchanged). */
static __always_inline void lb_record_fragment(const struct lb_packet *pkt, enum lb_dir dir,
                                               __be32 addr, __u32 vip_id, __u32 backend_id,
                                               __u64 now, int l2_only)
{
    struct frag_key fk = {};
    fk.src = pkt->key.src;
    fk.dst = pkt->key.dst;
    fk.id = pkt->ip->id;
    fk.proto = pkt->key.proto;
    struct frag_entry fe = {};
    fe.addr = addr;
    fe.rewrite_dst = dir == LB_DIR_ORIGINAL;
    if (l2_only)
        fe.rewrite_dst = LB_FRAG_L2_ONLY;
    fe.vip_id = vip_id;
    fe.backend_id = backend_id;
    fe.seen_ns = now;
    frags.update(&fk, &fe);
}

/* A later fragment (no L4 header) goes where its datagram's first fragment went. */
static __always_inline int lb_fragment(LB_CTX *ctx, struct lb_packet *pkt, __u64 bytes)
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
        return lb_outcome(LB_PASS_FRAGMENT, bytes, LB_ACT_PASS);
    if (fe->rewrite_dst == LB_FRAG_L2_ONLY) {
        lb_count_flow(fe->vip_id, fe->backend_id, bytes, 0);
        return lb_forward_l2(ctx, pkt, bytes, fe->addr, NULL, 0);
    }
    if (ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    lb_count_flow(fe->vip_id, fe->backend_id, bytes, 0);
    lb_rewrite_addr(ip, fe->rewrite_dst, fe->addr);
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}
