/* lb_flow.h: flow tracking: a flow's two directions and the key each carries, its states and
 * their timeouts, whether an entry still holds, and the refresh that keeps both in step. */
#pragma once

#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "lb_consts.h"
#include "lb_maps.h"
#include "lb_parse.h"
#include "lb_structs.h"

/* The two directions of a flow, each tracked in its own table under the key its packets
 * carry on arrival; the entry says how that direction is rewritten (nat_entry addr/port). */
enum lb_dir {
    LB_DIR_ORIGINAL = 0,    /* client -> VIP, in flows: the destination becomes the backend */
    LB_DIR_REPLY = 1,       /* backend -> client, in rnat: the source becomes the VIP */
};

static __always_inline enum lb_dir lb_dir_other(enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? LB_DIR_REPLY : LB_DIR_ORIGINAL;
}

/* The mode a VIP's new flows start in, from its vip_meta.flags. */
static __always_inline __u8 lb_vip_forwarding(__u32 vip_flags)
{
    if (vip_flags & LB_VIP_F_DSR)
        return LB_FWD_DSR;
    if (vip_flags & LB_VIP_F_FULLNAT)
        return LB_FWD_FULLNAT;
    return LB_FWD_NAT;
}

/* The coarse clock (a tick, a few ms) is ample for second-scale timeouts and cheaper. */
static __always_inline __u64 lb_now_ns(void)
{
    return bpf_ktime_get_coarse_ns();
}

/* now - then, or 0 when another CPU stamped `then` after we read the clock. */
static __always_inline __u64 lb_age_ns(__u64 now, __u64 then)
{
    return now > then ? now - then : 0;
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
static __always_inline __u8 lb_next_state(__u8 state, __be32 tcp_flags, __u8 proto)
{
    if (proto != IPPROTO_TCP)
        return LB_FLOW_UDP;
    if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
        return LB_FLOW_CLOSING;
    if (state == LB_FLOW_SYN && (tcp_flags & TCP_FLAG_ACK) && !(tcp_flags & TCP_FLAG_SYN))
        return LB_FLOW_ESTABLISHED;
    return state;
}

/* The state of a flow this packet starts. One first seen mid-stream (a balancer restart, an
 * LRU eviction) is taken as established. */
static __always_inline __u8 lb_initial_state(__be32 tcp_flags, __u8 proto)
{
    if (proto != IPPROTO_TCP)
        return LB_FLOW_UDP;
    if ((tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
        return LB_FLOW_SYN;
    return lb_next_state(LB_FLOW_ESTABLISHED, tcp_flags, IPPROTO_TCP);
}

/* The same tuple seen from the other end. */
static __always_inline void lb_flow_reverse(struct flow_key *out, const struct flow_key *in)
{
    out->src = in->dst;
    out->dst = in->src;
    out->sport = in->dport;
    out->dport = in->sport;
    out->proto = in->proto;
    out->pad[0] = out->pad[1] = out->pad[2] = 0;
}

/* The key the other direction's packets carry: this packet's tuple as the entry rewrites it
 * on its way out, reversed. */
static __always_inline void lb_flow_other_key(struct flow_key *other, const struct flow_key *key,
                                              const struct nat_entry *e, enum lb_dir dir)
{
    struct flow_key out = *key;
    if (dir == LB_DIR_ORIGINAL) {
        out.dst = e->addr;
        out.dport = e->port;
    } else {
        out.src = e->addr;
        out.sport = e->port;
    }
    lb_flow_reverse(other, &out);
}

/* The other direction's entry: the same flow, rewriting back to what this packet carried. */
static __always_inline void lb_flow_other_entry(struct nat_entry *other, const struct nat_entry *e,
                                                const struct flow_key *key, enum lb_dir dir)
{
    *other = *e;
    if (dir == LB_DIR_ORIGINAL) {
        other->addr = key->dst;
        other->port = key->dport;
    } else {
        other->addr = key->src;
        other->port = key->sport;
    }
    other->nh_ifindex = 0;      /* each direction has its own next hop */
}

static __always_inline struct nat_entry *lb_flow_lookup(struct flow_key *key, enum lb_dir dir)
{
    return dir == LB_DIR_ORIGINAL ? flows.lookup(key) : rnat.lookup(key);
}

static __always_inline void lb_flow_store(struct flow_key *key, struct nat_entry *e, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL)
        flows.update(key, e);
    else
        rnat.update(key, e);
}

static __always_inline void lb_flow_forget(struct flow_key *key, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL)
        flows.delete(key);
    else
        rnat.delete(key);
}

/* Whether an entry still speaks for the packet that found it.
 * Original direction: until it times out, or a fresh SYN reopens a closing flow.
 * Reply direction: an entry outlived by its connection must not catch traffic that merely
 * reuses the tuple (a direct client->backend connection from the same client port): expired,
 * or a SYN-ACK for a connection that has closed or whose SYN is long past. A new SYN through
 * the VIP re-creates the entry in the SYN state, so its own SYN-ACK is never stale. */
static __always_inline int lb_entry_live(const struct nat_entry *e, __u64 now, __be32 tcp_flags,
                                         enum lb_dir dir)
{
    if (lb_age_ns(now, e->last_seen_ns) > lb_timeout_ns(e->state))
        return 0;
    __be32 syn_ack = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK);
    if (dir == LB_DIR_ORIGINAL)
        return !(e->state == LB_FLOW_CLOSING && syn_ack == TCP_FLAG_SYN);
    return !(syn_ack == (TCP_FLAG_SYN | TCP_FLAG_ACK) &&
             (e->state == LB_FLOW_CLOSING ||
              lb_age_ns(now, e->created_ns) > LB_TCP_SYN_TIMEOUT_NS));
}

/* A live flow keeps its backend; a backend marked down loses its flows, a deleted one keeps
 * them until they end. */
static __always_inline int lb_flow_usable(const struct nat_entry *flow, __u64 now, __be32 tcp_flags)
{
    if (!lb_entry_live(flow, now, tcp_flags, LB_DIR_ORIGINAL))
        return 0;
    __u32 id = flow->backend_id;
    struct backend *be = backends.lookup(&id);
    if (be && be->state == LB_BACKEND_DOWN && be->addr == flow->addr && be->port == flow->port)
        return 0;
    return 1;
}

/* Starts tracking a flow in both directions (DSR: the original only). `fresh` holds the original direction's rewrite
 * (backend address and port) and ids; its times and state are set here. `old`: the entry the
 * packet's lookup found under the same key (a connection that ended, or timed out), or NULL.
 * A client that reuses its source port soon finds its last connection's entries there: they
 * are overwritten in place, without the LRU's free-list pop and push and the bucket lock an
 * update of an existing key takes (the reply entry is looked up first only in that case: for
 * a new key the update alone is cheaper). */
static __always_inline void lb_flow_create(struct flow_key *key, struct nat_entry *fresh,
                                           __be32 tcp_flags, __u64 now, struct nat_entry *old)
{
    fresh->created_ns = now;
    fresh->last_seen_ns = now;
    fresh->state = lb_initial_state(tcp_flags, key->proto);
    if (old)
        *old = *fresh;
    else
        lb_flow_store(key, fresh, LB_DIR_ORIGINAL);
    /* DSR replies go from the backend straight to the client: there is no reply direction. */
    if (fresh->forwarding == LB_FWD_DSR)
        return;

    struct flow_key reply = {};
    struct nat_entry back;
    lb_flow_other_key(&reply, key, fresh, LB_DIR_ORIGINAL);
    lb_flow_other_entry(&back, fresh, key, LB_DIR_ORIGINAL);
    struct nat_entry *stale = old ? lb_flow_lookup(&reply, LB_DIR_REPLY) : NULL;
    if (stale)
        *stale = back;
    else
        lb_flow_store(&reply, &back, LB_DIR_REPLY);
}

/* Moves a tracked flow on by this packet, in the entry it hit and in the other direction's:
 * when the state changes, else at most once per LB_REFRESH_INTERVAL_NS. Returns 1 when it
 * refreshed (the caller then asks the FIB again). */
static __always_inline int lb_flow_refresh(struct nat_entry *e, struct flow_key *key,
                                           __be32 tcp_flags, __u64 now, enum lb_dir dir)
{
    __u8 next = lb_next_state(e->state, tcp_flags, key->proto);
    if (next == e->state && lb_age_ns(now, e->last_seen_ns) <= LB_REFRESH_INTERVAL_NS)
        return 0;
    e->state = next;
    e->last_seen_ns = now;
    if (e->forwarding == LB_FWD_DSR)
        return 1;           /* one direction only: nothing to keep in step */

    struct flow_key other_key = {};
    lb_flow_other_key(&other_key, key, e, dir);
    struct nat_entry *other = lb_flow_lookup(&other_key, lb_dir_other(dir));
    if (other) {
        other->state = next;
        other->last_seen_ns = now;
    } else if (dir == LB_DIR_ORIGINAL) {
        /* An evicted reply path would let replies out un-NATed, so it is put back. A missing
         * original entry needs no such care: the next client packet picks from the ring. */
        struct nat_entry again;
        lb_flow_other_entry(&again, e, key, dir);
        lb_flow_store(&other_key, &again, LB_DIR_REPLY);
    }
    return 1;
}
