/* lb_snat_af.h: full-NAT's flow logic for one address family, written once: lb_snat.h
 * includes it for IPv4 and lb_snat6.h for IPv6, each first defining the LB_SNAT_* names
 * below for what differs (types, tables, header fields, rewrite and forward helpers).
 * No include guard: it is meant to be included once per family; it #undefs its names.
 *
 * What the includer defines:
 *   LB_SNAT_FN(name)          the family's name for a function (lb_snat_name, lb_snat6_name)
 *   LB_SNAT_KEY, LB_SNAT_ENTRY, LB_SNAT_PKT, LB_SNAT_SCRATCH   its types
 *   LB_SNAT_E(e)              the entry's struct nat_entry (state, times, ids, next hop)
 *   LB_SNAT_ADDR_SET(to, from), LB_SNAT_ADDR_EQ(a, b)          addresses (a word or four)
 *   LB_SNAT_BACKEND_ADDR(be)  a struct backend's address of this family
 *   LB_SNAT_HOP_LIMIT(pkt)    TTL or hop limit
 *   LB_SNAT_PICK, LB_SNAT_HASH(key), LB_SNAT_REWRITE, LB_SNAT_FORWARD   the family's helpers
 *   LB_SNAT_AFTER_REWRITE(pkt, vip_id, backend_id, now)   what a forwarded packet records
 *   LB_SNAT_INNER, LB_SNAT_ICMP_CHECK(icmp), LB_SNAT_OUTER_SRC(pkt), LB_SNAT_OUTER_DST(pkt),
 *   LB_SNAT_INNER_DST(inner), LB_SNAT_SET_OUTER(check, pkt, field, addr),
 *   LB_SNAT_QUOTE_REWRITE     ICMP error translation
 * and, before including, the functions LB_SNAT_FN(scratch), LB_SNAT_FN(lookup),
 * LB_SNAT_FN(store), LB_SNAT_FN(claim) (the tables: bcc rewrites map calls written out, not
 * ones a macro builds) and LB_SNAT_FN(source) (the SNAT address for a new flow). */

/* The key the other direction's packets carry (see struct snat_entry). */
static __always_inline void LB_SNAT_FN(other_key)(LB_SNAT_KEY *other, const LB_SNAT_ENTRY *e,
                                                  __u8 proto, enum lb_dir dir)
{
    if (dir == LB_DIR_ORIGINAL) {
        LB_SNAT_ADDR_SET(other->src, e->nat.addr);
        other->sport = LB_SNAT_E(e).port;
        LB_SNAT_ADDR_SET(other->dst, e->peer_addr);
        other->dport = e->peer_port;
    } else {
        LB_SNAT_ADDR_SET(other->src, e->peer_addr);
        other->sport = e->peer_port;
        LB_SNAT_ADDR_SET(other->dst, e->nat.addr);
        other->dport = LB_SNAT_E(e).port;
    }
    other->proto = proto;
    other->pad[0] = other->pad[1] = other->pad[2] = 0;
}

/* The other direction's entry: it rewrites back to what this direction's packets carry. */
static __always_inline void LB_SNAT_FN(other_entry)(LB_SNAT_ENTRY *other, const LB_SNAT_ENTRY *e,
                                                    const LB_SNAT_KEY *key, enum lb_dir dir)
{
    *other = *e;
    if (dir == LB_DIR_ORIGINAL) {
        LB_SNAT_ADDR_SET(other->nat.addr, key->dst);    /* the VIP */
        LB_SNAT_E(other).port = key->dport;
        LB_SNAT_ADDR_SET(other->peer_addr, key->src);   /* the client */
        other->peer_port = key->sport;
    } else {
        LB_SNAT_ADDR_SET(other->nat.addr, key->src);    /* the backend */
        LB_SNAT_E(other).port = key->sport;
        LB_SNAT_ADDR_SET(other->peer_addr, key->dst);   /* the SNAT address and port */
        other->peer_port = key->dport;
    }
    LB_SNAT_E(other).nh_ifindex = 0;
}

/* Takes `key` (backend -> SNAT addr:port) over for a new flow's reply entry when the flow
 * that held it has expired. One compare-and-swap on the old entry's last_seen decides, so two
 * CPUs cannot both win it; the winner then replaces the entry whole (a reader sees the old
 * entry or the new one). */
static __always_inline int LB_SNAT_FN(take_over)(LB_SNAT_KEY *key, LB_SNAT_ENTRY *reply, __u64 now)
{
    LB_SNAT_ENTRY *old = LB_SNAT_FN(lookup)(key, LB_DIR_REPLY);
    if (!old)
        return LB_SNAT_FN(claim)(key, reply) == 0;  /* freed (LRU) since the first pass */
    if (!lb_snat_reusable(&LB_SNAT_E(old), now))
        return 0;
    __u64 seen = LB_SNAT_E(old).last_seen_ns;
    if (__sync_val_compare_and_swap(&LB_SNAT_E(old).last_seen_ns, seen, now) != seen)
        return 0;
    return LB_SNAT_FN(store)(key, reply, LB_DIR_REPLY) == 0;
}

/* Rewrites both ends of the packet by a full-NAT entry of direction `dir`. */
static __always_inline void LB_SNAT_FN(rewrite)(LB_SNAT_PKT *pkt, const LB_SNAT_ENTRY *e,
                                                enum lb_dir dir)
{
    int orig = dir == LB_DIR_ORIGINAL;
    LB_SNAT_REWRITE(pkt, orig, e->nat.addr, LB_SNAT_E(e).port);
    LB_SNAT_REWRITE(pkt, !orig, e->peer_addr, e->peer_port);
}

/* Moves a full-NAT flow on by this packet in both directions' entries (as lb_flow_refresh
 * does for NAT). A client packet whose reply entry is gone (LRU) claims its port back:
 * create-only, so a port another flow holds meanwhile is never taken from it. */
static __always_inline int LB_SNAT_FN(refresh)(LB_SNAT_ENTRY *e, LB_SNAT_KEY *key,
                                               __be32 tcp_flags, __u64 now, enum lb_dir dir)
{
    __u8 next = lb_next_state(LB_SNAT_E(e).state, tcp_flags, key->proto);
    if (next == LB_SNAT_E(e).state && lb_age_ns(now, LB_SNAT_E(e).last_seen_ns) <= LB_REFRESH_INTERVAL_NS)
        return 0;
    LB_SNAT_E(e).state = next;
    LB_SNAT_E(e).last_seen_ns = now;

    LB_SNAT_SCRATCH *sc = LB_SNAT_FN(scratch)();
    if (!sc)
        return 1;
    LB_SNAT_FN(other_key)(&sc->key, e, key->proto, dir);
    LB_SNAT_ENTRY *other = LB_SNAT_FN(lookup)(&sc->key, lb_dir_other(dir));
    if (other) {
        LB_SNAT_E(other).state = next;
        LB_SNAT_E(other).last_seen_ns = now;
    } else if (dir == LB_DIR_ORIGINAL) {
        LB_SNAT_FN(other_entry)(&sc->back, e, key, dir);
        LB_SNAT_FN(claim)(&sc->key, &sc->back);
    }
    return 1;
}

/* A packet of a live full-NAT flow, either direction. */
static __always_inline int LB_SNAT_FN(forward)(struct xdp_md *ctx, LB_SNAT_PKT *pkt,
                                               LB_SNAT_ENTRY *e, __u64 now, __u64 bytes,
                                               enum lb_dir dir)
{
    int refreshed = LB_SNAT_FN(refresh)(e, &pkt->key, pkt->tcp_flags, now, dir);
    lb_count_flow(LB_SNAT_E(e).vip_id, LB_SNAT_E(e).backend_id, bytes, 0);
    LB_SNAT_FN(rewrite)(pkt, e, dir);
    LB_SNAT_AFTER_REWRITE(pkt, LB_SNAT_E(e).vip_id, LB_SNAT_E(e).backend_id, now);
    return LB_SNAT_FORWARD(ctx, pkt, bytes, &LB_SNAT_E(e), refreshed);
}

/* A client's packet to a full-NAT VIP with no live flow: the ring picks the backend, a SNAT
 * address and a free port are claimed, and both directions are tracked. */
static __always_inline int LB_SNAT_FN(new_flow)(struct xdp_md *ctx, LB_SNAT_PKT *pkt,
                                                struct vip_meta *vip, __u64 now, __u64 bytes)
{
    struct backend *be = NULL;
    __u32 slot = 0;
    __u32 id = LB_SNAT_PICK(vip, &pkt->key, &be, &slot);
    if (id == LB_NO_BACKEND || !be)
        return lb_drop_no_backend(vip->vip_id, bytes);
    __u32 vip_id = vip->vip_id;
    struct snat_cfg *cfg = snat_cfg.lookup(&vip_id);
    if (!cfg || cfg->port_min == 0 || cfg->port_max < cfg->port_min)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_SOURCE, bytes);
    LB_SNAT_SCRATCH *sc = LB_SNAT_FN(scratch)();
    if (!sc)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_PORT, bytes);
    LB_SNAT_ENTRY *fwd = &sc->fwd;
    __builtin_memset(fwd, 0, sizeof(*fwd));
    if (!LB_SNAT_FN(source)(ctx, cfg, be, LB_SNAT_HASH(&pkt->key), pkt, fwd))
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_SOURCE, bytes);
    LB_SNAT_ADDR_SET(fwd->nat.addr, LB_SNAT_BACKEND_ADDR(be));
    LB_SNAT_E(fwd).port = be->port;
    LB_SNAT_E(fwd).backend_id = id;
    LB_SNAT_E(fwd).vip_id = vip_id;
    LB_SNAT_E(fwd).created_ns = now;
    LB_SNAT_E(fwd).last_seen_ns = now;
    LB_SNAT_E(fwd).state = lb_initial_state(pkt->tcp_flags, pkt->key.proto);
    LB_SNAT_E(fwd).forwarding = LB_FWD_FULLNAT;
    /* The reply entry does not depend on the port: only its key does. */
    LB_SNAT_FN(other_entry)(&sc->back, fwd, &pkt->key, LB_DIR_ORIGINAL);

    /* Linear probing from a random start: a range no larger than the tries is covered whole,
     * and CPUs claiming at once start apart. First a free port (a create-only insert), then,
     * among the first few, one whose flow has expired: two passes keep the program small
     * enough for the verifier (bcc cannot hand it a bpf_loop callback). */
    __u32 range = (__u32)cfg->port_max - cfg->port_min + 1;
    __u32 start = bpf_get_prandom_u32() % range;
    __u16 port_min = cfg->port_min;
    int claimed = 0;
    /* One bound, a constant: with a second (`i < range`) clang merges both into one the
     * verifier cannot bound. A range smaller than the tries is walked more than once. */
    for (__u32 i = 0; i < LB_SNAT_PORT_TRIES; i++) {
        fwd->peer_port = bpf_htons((__u16)(port_min + (start + i) % range));
        LB_SNAT_FN(other_key)(&sc->key, fwd, pkt->key.proto, LB_DIR_ORIGINAL);
        if (LB_SNAT_FN(claim)(&sc->key, &sc->back) == 0) {
            claimed = 1;
            break;
        }
    }
    for (__u32 i = 0; i < LB_SNAT_TAKEOVER_TRIES && !claimed; i++) {
        fwd->peer_port = bpf_htons((__u16)(port_min + (start + i) % range));
        LB_SNAT_FN(other_key)(&sc->key, fwd, pkt->key.proto, LB_DIR_ORIGINAL);
        claimed = LB_SNAT_FN(take_over)(&sc->key, &sc->back, now);
    }
    if (!claimed)
        return lb_snat_drop(vip_id, LB_DROP_SNAT_NO_PORT, bytes);
    LB_SNAT_FN(store)(&pkt->key, fwd, LB_DIR_ORIGINAL);

    lb_count_flow(vip_id, id, bytes, 1);
    LB_SNAT_FN(rewrite)(pkt, fwd, LB_DIR_ORIGINAL);
    LB_SNAT_AFTER_REWRITE(pkt, vip_id, id, now);
    return LB_SNAT_FORWARD(ctx, pkt, bytes, NULL, 0);
}

/* A backend's reply to a SNAT address and port: back to the client from the VIP. An ended
 * flow's entry stays (its port waits to be reusable) and the packet goes to the kernel. */
static __always_inline int LB_SNAT_FN(from_backend)(struct xdp_md *ctx, LB_SNAT_PKT *pkt,
                                                    LB_SNAT_ENTRY *e, __u64 bytes)
{
    if (LB_SNAT_HOP_LIMIT(pkt) <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    __u64 now = lb_now_ns();
    if (!lb_entry_live(&LB_SNAT_E(e), now, pkt->tcp_flags, LB_DIR_REPLY))
        return lb_outcome(LB_PASS_STALE_REPLY, bytes, XDP_PASS);
    return LB_SNAT_FN(forward)(ctx, pkt, e, now, bytes, LB_DIR_REPLY);
}

/* An ICMP error about a full-NAT flow; -1 when it quotes none. `key` is the quoted packet's
 * tuple reversed: the tuple of the packets the error answers for.
 * From the backend's side, quoting SNAT->backend: to the client, quoting client->VIP, sent
 * by the VIP when the backend itself sent it (as NAT mode does).
 * From the client's side, quoting VIP->client: to the backend, quoting backend->SNAT, and
 * sent by the SNAT address, the only one of ours the backend knows how to reach. */
static __always_inline int LB_SNAT_FN(icmp)(struct xdp_md *ctx, LB_SNAT_PKT *pkt, void *icmp,
                                            LB_SNAT_INNER *inner, struct lb_quoted_ports *ports,
                                            __u16 *l4_check, LB_SNAT_KEY *key, __u64 bytes)
{
    enum lb_dir dir = LB_DIR_REPLY;
    LB_SNAT_ENTRY *e = LB_SNAT_FN(lookup)(key, LB_DIR_REPLY);
    if (!e) {
        dir = LB_DIR_ORIGINAL;
        e = LB_SNAT_FN(lookup)(key, LB_DIR_ORIGINAL);
    }
    if (!e)
        return -1;
    if (LB_SNAT_HOP_LIMIT(pkt) <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);
    __u16 *icmp_check = LB_SNAT_ICMP_CHECK(icmp);
    if (dir == LB_DIR_REPLY) {
        /* The quote is SNAT->backend: its source goes back to the client, its destination to the VIP. */
        if (LB_SNAT_ADDR_EQ(LB_SNAT_OUTER_SRC(pkt), LB_SNAT_INNER_DST(inner)))
            LB_SNAT_SET_OUTER(icmp_check, pkt, LB_SNAT_OUTER_SRC(pkt), e->nat.addr);
        LB_SNAT_SET_OUTER(icmp_check, pkt, LB_SNAT_OUTER_DST(pkt), e->peer_addr);
        LB_SNAT_QUOTE_REWRITE(icmp_check, inner, ports, l4_check, 1, e->peer_addr, e->peer_port);
        LB_SNAT_QUOTE_REWRITE(icmp_check, inner, ports, l4_check, 0, e->nat.addr, LB_SNAT_E(e).port);
    } else {
        /* The quote is VIP->client: it becomes backend->SNAT. */
        LB_SNAT_SET_OUTER(icmp_check, pkt, LB_SNAT_OUTER_SRC(pkt), e->peer_addr);
        LB_SNAT_SET_OUTER(icmp_check, pkt, LB_SNAT_OUTER_DST(pkt), e->nat.addr);
        LB_SNAT_QUOTE_REWRITE(icmp_check, inner, ports, l4_check, 1, e->nat.addr, LB_SNAT_E(e).port);
        LB_SNAT_QUOTE_REWRITE(icmp_check, inner, ports, l4_check, 0, e->peer_addr, e->peer_port);
    }
    /* An error has no ports of its own for the FIB's multipath hash. */
    pkt->sport = NULL;
    pkt->dport = NULL;
    return LB_SNAT_FORWARD(ctx, pkt, bytes, NULL, 0);
}

#undef LB_SNAT_FN
#undef LB_SNAT_KEY
#undef LB_SNAT_ENTRY
#undef LB_SNAT_PKT
#undef LB_SNAT_SCRATCH
#undef LB_SNAT_E
#undef LB_SNAT_ADDR_SET
#undef LB_SNAT_ADDR_EQ
#undef LB_SNAT_BACKEND_ADDR
#undef LB_SNAT_HOP_LIMIT
#undef LB_SNAT_PICK
#undef LB_SNAT_HASH
#undef LB_SNAT_REWRITE
#undef LB_SNAT_FORWARD
#undef LB_SNAT_AFTER_REWRITE
#undef LB_SNAT_INNER
#undef LB_SNAT_ICMP_CHECK
#undef LB_SNAT_OUTER_SRC
#undef LB_SNAT_OUTER_DST
#undef LB_SNAT_INNER_DST
#undef LB_SNAT_SET_OUTER
#undef LB_SNAT_QUOTE_REWRITE
