/* lb_flow6.h: IPv6 flow tracking: the two directions' keys and entries in flows6/rnat6; the
 * states, timeouts and liveness are lb_flow.h's, applied to the embedded IPv4-shaped entry. */
#pragma once

#include "lb_consts.h"
#include "lb_flow.h"
#include "lb_maps.h"
#include "lb_maps6.h"
#include "lb_structs.h"

/* The IPv6 path's larger temporaries (a 72-byte entry and a 40-byte key each), per CPU:
 * on the stack they would not fit beside the IPv4 path's in the program's one 512-byte frame
 * (bcc links no BPF-to-BPF calls, so both paths are inlined into xdp_lb). */
struct lb_scratch6 {
    struct nat_entry6 entry;
    struct flow_key6 key;
    /* lb_frag6.h's: apart from the fields above, which a new flow may still be using. */
    struct frag_key6 frag_key;
    struct frag_entry6 frag_entry;
};
BPF_PERCPU_ARRAY(scratch6, struct lb_scratch6, 1);

static __always_inline struct lb_scratch6 *lb_scratch6(void)
{
    __u32 zero = 0;
    return scratch6.lookup(&zero);
}

static __always_inline void lb_addr6_copy(__be32 *to, const __be32 *from)
{
    to[0] = from[0];
    to[1] = from[1];
    to[2] = from[2];
    to[3] = from[3];
}

static __always_inline int lb_addr6_equal(const __be32 *a, const __be32 *b)
{
    return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline void lb_flow6_reverse(struct flow_key6 *out, const struct flow_key6 *in)
{
    lb_addr6_copy(out->src, in->dst);
    lb_addr6_copy(out->dst, in->src);
    out->sport = in->dport;
    out->dport = in->sport;
    out->proto = in->proto;
    out->pad[0] = out->pad[1] = out->pad[2] = 0;
}

/* The key the other direction's packets carry: this packet's tuple as the entry rewrites it
 * on its way out, reversed (lb_flow_other_key's IPv6 twin). */
static __always_inline void lb_flow6_other_key(struct flow_key6 *other, const struct flow_key6 *key,
                                               const struct nat_entry6 *e, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL) {
        lb_addr6_copy(other->src, e->addr);
        lb_addr6_copy(other->dst, key->src);
        other->sport = e->e.port;
        other->dport = key->sport;
    } else {
        lb_addr6_copy(other->src, key->dst);
        lb_addr6_copy(other->dst, e->addr);
        other->sport = key->dport;
        other->dport = e->e.port;
    }
    other->proto = key->proto;
    other->pad[0] = other->pad[1] = other->pad[2] = 0;
}

static __always_inline void lb_flow6_other_entry(struct nat_entry6 *other, const struct nat_entry6 *e,
                                                 const struct flow_key6 *key, enum lb_dir dir)
{
    *other = *e;
    if (dir == LB_DIR_ORIGINAL) {
        lb_addr6_copy(other->addr, key->dst);
        other->e.port = key->dport;
    } else {
        lb_addr6_copy(other->addr, key->src);
        other->e.port = key->sport;
    }
    other->e.nh_ifindex = 0;    /* each direction has its own next hop */
}

static __always_inline struct nat_entry6 *lb_flow6_lookup(struct flow_key6 *key, enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? flows6.lookup(key) : rnat6.lookup(key);
}

static __always_inline void lb_flow6_store(struct flow_key6 *key, struct nat_entry6 *e, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL)
        flows6.update(key, e);
    else
        rnat6.update(key, e);
}

static __always_inline void lb_flow6_forget(struct flow_key6 *key, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL)
        flows6.delete(key);
    else
        rnat6.delete(key);
}

/* lb_flow_usable for IPv6: live, and its backend not marked down. */
static __always_inline int lb_flow6_usable(const struct nat_entry6 *flow, __u64 now, __be32 tcp_flags)
{
    if (!lb_entry_live(&flow->e, now, tcp_flags, LB_DIR_ORIGINAL))
        return 0;
    __u32 id = flow->e.backend_id;
    struct backend *be = backends.lookup(&id);
    if (be && be->state == LB_BACKEND_DOWN && (be->flags & LB_BACKEND_F_IPV6) &&
        lb_addr6_equal(be->addr6, flow->addr) && be->port == flow->e.port)
        return 0;
    return 1;
}

/* `fresh` is the caller's (scratch) entry, with the backend's address and port and the ids;
 * it is stored as the original direction, then turned into the reply direction's entry.
 * `old`: an ended flow's entry under the same key, overwritten in place as lb_flow_create's. */
static __always_inline void lb_flow6_create(struct lb_scratch6 *s, struct flow_key6 *key,
                                            struct nat_entry6 *fresh, __be32 tcp_flags, __u64 now,
                                            struct nat_entry6 *old)
{
    fresh->e.created_ns = now;
    fresh->e.last_seen_ns = now;
    fresh->e.state = lb_initial_state(tcp_flags, key->proto);
    if (old)
        *old = *fresh;
    else
        lb_flow6_store(key, fresh, LB_DIR_ORIGINAL);
    /* DSR replies go from the backend straight to the client: no reply direction. */
    if (fresh->e.forwarding == LB_FWD_DSR)
        return;

    lb_flow6_other_key(&s->key, key, fresh, LB_DIR_ORIGINAL);
    /* In place: the reply entry rewrites the source back to the VIP the client used. */
    lb_addr6_copy(fresh->addr, key->dst);
    fresh->e.port = key->dport;
    fresh->e.nh_ifindex = 0;
    struct nat_entry6 *stale = old ? lb_flow6_lookup(&s->key, LB_DIR_REPLY) : NULL;
    if (stale)
        *stale = *fresh;
    else
        lb_flow6_store(&s->key, fresh, LB_DIR_REPLY);
}

/* lb_flow_refresh for IPv6: both directions in step; returns 1 when it refreshed. */
static __always_inline int lb_flow6_refresh(struct nat_entry6 *e, struct flow_key6 *key,
                                            __be32 tcp_flags, __u64 now, enum lb_dir dir)
{
    __u8 next = lb_next_state(e->e.state, tcp_flags, key->proto);
    if (next == e->e.state && lb_age_ns(now, e->e.last_seen_ns) <= LB_REFRESH_INTERVAL_NS)
        return 0;
    e->e.state = next;
    e->e.last_seen_ns = now;
    if (e->e.forwarding == LB_FWD_DSR)
        return 1;

    struct lb_scratch6 *s = lb_scratch6();
    if (!s)
        return 1;
    lb_flow6_other_key(&s->key, key, e, dir);
    struct nat_entry6 *other = lb_flow6_lookup(&s->key, lb_dir_other(dir));
    if (other) {
        other->e.state = next;
        other->e.last_seen_ns = now;
    } else if (dir == LB_DIR_ORIGINAL) {
        /* An evicted reply path would let replies out un-NATed, so it is put back. */
        lb_flow6_other_entry(&s->entry, e, key, dir);
        lb_flow6_store(&s->key, &s->entry, LB_DIR_REPLY);
    }
    return 1;
}
