/* lb_frag6.h: IPv6 fragments, as lb_frag.h does for IPv4: a forwarded first fragment (offset 0,
 * M set) is recorded by (src, dst, identification, protocol), and its datagram's later
 * fragments (which carry no ports) follow it to the same backend, rewritten as it was. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/ipv6.h>

#include "lb_ctx.h"
#include "lb_consts.h"
#include "lb_fib6.h"
#include "lb_flow.h"
#include "lb_flow6.h"
#include "lb_frag.h"
#include "lb_maps6.h"
#include "lb_parse6.h"
#include "lb_stats.h"
#include "lb_structs.h"

/* The key a datagram's fragments share, as they arrived. Other tables of IPv6 fragments (a
 * full-NAT one) key by it too, so first and later fragments always agree. */
static __always_inline void lb_frag6_key(const struct lb_packet6 *pkt, struct frag_key6 *fk)
{
    __builtin_memset(fk, 0, sizeof(*fk));
    __builtin_memcpy(fk->src, pkt->key.src, 16);
    __builtin_memcpy(fk->dst, pkt->key.dst, 16);
    fk->id = pkt->frag_id;
    fk->proto = pkt->key.proto;
}

/* A first fragment about to be forwarded in direction `dir`, rewritten to `addr` (`l2_only`:
 * DSR, sent to the backend `addr` unchanged). */
static __always_inline void lb_record_fragment6(const struct lb_packet6 *pkt, enum lb_dir dir,
                                                const __be32 *addr, __u32 vip_id,
                                                __u32 backend_id, __u64 now, int l2_only)
{
    /* Key and entry in the per-CPU scratch: on the stack they pushed the program's one frame
     * (both families and full-NAT inlined into xdp_lb) past 512 bytes. */
    struct lb_scratch6 *s = lb_scratch6();
    if (!s)
        return;
    struct frag_key6 *fk = &s->frag_key;
    struct frag_entry6 *fe = &s->frag_entry;
    lb_frag6_key(pkt, fk);
    __builtin_memset(fe, 0, sizeof(*fe));
    __builtin_memcpy(fe->addr, addr, 16);
    fe->e.rewrite_dst = dir == LB_DIR_ORIGINAL;
    if (l2_only)
        fe->e.rewrite_dst = LB_FRAG_L2_ONLY;
    fe->e.vip_id = vip_id;
    fe->e.backend_id = backend_id;
    fe->e.seen_ns = now;
    frags6.update(fk, fe);
}

/* A later fragment (LB_PARSED_FRAGMENT) goes where its datagram's first fragment went. The L4
 * checksum is in the first fragment, whose update covered the whole datagram, and IPv6 has no
 * header checksum: only the address changes. */
static __always_inline int lb_fragment6(LB_CTX *ctx, struct lb_packet6 *pkt, __u64 bytes)
{
    struct lb_scratch6 *s = lb_scratch6();
    if (!s)
        return lb_outcome(LB_PASS_FRAGMENT, bytes, LB_ACT_PASS);
    lb_frag6_key(pkt, &s->frag_key);
    struct frag_entry6 *fe = frags6.lookup(&s->frag_key);
    /* Before its first fragment (reordered), long after it, or of a datagram the program did
     * not forward: the kernel gets it untouched (docs/modes.md: the fragment policy). */
    if (!fe || lb_age_ns(lb_now_ns(), fe->e.seen_ns) > LB_FRAG_TIMEOUT_NS)
        return lb_outcome(LB_PASS_FRAGMENT, bytes, LB_ACT_PASS);
    if (fe->e.rewrite_dst == LB_FRAG_L2_ONLY) {
        lb_count_flow(fe->e.vip_id, fe->e.backend_id, bytes, 0);
        return lb_forward6_l2(ctx, pkt, bytes, fe->addr, NULL, 0);
    }
    if (pkt->ip6->hop_limit <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);
    lb_count_flow(fe->e.vip_id, fe->e.backend_id, bytes, 0);
    __be32 *field = fe->e.rewrite_dst ? pkt->ip6->daddr.in6_u.u6_addr32
                                      : pkt->ip6->saddr.in6_u.u6_addr32;
    field[0] = fe->addr[0];
    field[1] = fe->addr[1];
    field[2] = fe->addr[2];
    field[3] = fe->addr[3];
    return lb_forward6(ctx, pkt, bytes, NULL, 0);
}
