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
