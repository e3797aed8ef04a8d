/* lb_maglev.h: backend selection for a new flow: the flow hash and the VIP's live Maglev ring. */
#pragma once

#include "lb_consts.h"
#include "lb_maps.h"
#include "lb_structs.h"

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

/* `flow` affinity hashes the 5-tuple; `client` the source address alone, so that every
 * connection of one client lands on one backend (only a new flow hashes: no flow-hit cost). */
static __always_inline __u32 lb_flow_hash(const struct flow_key *key, __u32 vip_flags)
{
    __u32 h = lb_mix32(key->src ^ LB_HASH_SEED);
    if (vip_flags & LB_VIP_F_CLIENT_AFFINITY)
        return h;
    h = lb_mix32(h ^ key->dst);
    h = lb_mix32(h ^ (((__u32)key->sport << 16) | key->dport));
    return lb_mix32(h ^ key->proto);
}

/* Picks the backend for a new flow from the VIP's live ring; LB_NO_BACKEND when none. */
static __always_inline __u32 lb_pick(const struct vip_meta *vip, const struct flow_key *key,
                                     struct backend **out, __u32 *slot_out)
{
    if (vip->vip_id >= LB_MAX_VIPS)
        return LB_NO_BACKEND;
    __u32 slot = lb_flow_hash(key, vip->flags) % LB_RING_SIZE;
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

/* An IPv6 tuple as the IPv4 hash takes it: each address folded to 32 bits, so affinity and
 * the mix are the IPv4 path's. */
static __always_inline void lb_flow6_fold(struct flow_key *folded, const struct flow_key6 *key6)
{
    folded->src = key6->src[0] ^ key6->src[1] ^ key6->src[2] ^ key6->src[3];
    folded->dst = key6->dst[0] ^ key6->dst[1] ^ key6->dst[2] ^ key6->dst[3];
    folded->sport = key6->sport;
    folded->dport = key6->dport;
    folded->proto = key6->proto;
}

static __always_inline __u32 lb_flow6_hash(const struct flow_key6 *key6, __u32 vip_flags)
{
    struct flow_key folded = {};
    lb_flow6_fold(&folded, key6);
    return lb_flow_hash(&folded, vip_flags);
}

static __always_inline __u32 lb_pick6(const struct vip_meta *vip, const struct flow_key6 *key6,
                                      struct backend **out, __u32 *slot_out)
{
    struct flow_key folded = {};
    lb_flow6_fold(&folded, key6);
    __u32 id = lb_pick(vip, &folded, out, slot_out);
    /* A ring slot is only ever an IPv6 VIP's own backend; a record of the other family
     * (a torn change) is no backend rather than a wrong rewrite. */
    if (id != LB_NO_BACKEND && *out && !((*out)->flags & LB_BACKEND_F_IPV6))
        return LB_NO_BACKEND;
    return id;
}
