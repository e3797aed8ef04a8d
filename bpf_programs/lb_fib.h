/* lb_fib.h: forwarding a rewritten packet by the kernel's FIB, with the next hop cached in
 * the flow's entry between refreshes. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <linux/socket.h>

#include "lb_ctx.h"
#include "lb_csum.h"
#include "lb_parse.h"
#include "lb_stats.h"
#include "lb_structs.h"

static __always_inline void lb_set_macs_ttl(struct lb_packet *pkt, const __u8 *dmac, const __u8 *smac)
{
    struct iphdr *ip = pkt->ip;
    /* TTL: like a router; the TTL-1 case was passed to the kernel before any rewrite. */
    __u16 old_ttl_word = *(__u16 *)&ip->ttl;
    ip->ttl--;
    lb_csum_replace2(&ip->check, old_ttl_word, *(__u16 *)&ip->ttl);
    __builtin_memcpy(pkt->eth->h_dest, dmac, ETH_ALEN);
    __builtin_memcpy(pkt->eth->h_source, smac, ETH_ALEN);
}

static __always_inline int lb_send(LB_CTX *ctx, __u32 ifindex, __u64 bytes)
{
    if (ifindex == ctx->ingress_ifindex)
        return lb_outcome(LB_TX, bytes, lb_act_tx(ctx));
    return lb_outcome(LB_REDIRECT, bytes, bpf_redirect(ifindex, 0));
}

/* Routes the rewritten packet like the kernel would, decrementing the TTL. Returns the XDP
 * action; on no route or no neighbour the rewritten packet goes to the kernel, which forwards
 * it and resolves the neighbour for the next one. `nh` (a tracked entry, or NULL) caches the
 * next hop: used while fresh, looked up again when `relookup` (the entry's refresh) is set. */
/* After a successful FIB lookup: the flow's next-hop cache (`nh`, NULL for none) takes the
 * answer. A fresh lookup restarts the MTU clearance at this packet's size. */
static __always_inline void lb_nh_remember(struct nat_entry *nh, const struct bpf_fib_lookup *fib,
                                           __u32 tot_len, int relookup)
{
    if (!nh)
        return;
    if (relookup || !nh->nh_ifindex || nh->nh_ifindex != fib->ifindex || tot_len > nh->nh_len_ok)
        nh->nh_len_ok = tot_len;
    nh->nh_ifindex = fib->ifindex;
    __builtin_memcpy(nh->nh_dmac, fib->dmac, ETH_ALEN);
    __builtin_memcpy(nh->nh_smac, fib->smac, ETH_ALEN);
}

static __always_inline int lb_forward(LB_CTX *ctx, struct lb_packet *pkt, __u64 bytes,
                                      struct nat_entry *nh, int relookup)
{
    struct iphdr *ip = pkt->ip;
    __u16 tot_len = bpf_ntohs(ip->tot_len);

    if (nh && !relookup && nh->nh_ifindex && tot_len <= nh->nh_len_ok) {
        lb_set_macs_ttl(pkt, nh->nh_dmac, nh->nh_smac);
        return lb_send(ctx, nh->nh_ifindex, bytes);
    }

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    if (pkt->sport && pkt->dport) {   /* ICMP has no ports; multipath hashes without them */
        fib.sport = *pkt->sport;
        fib.dport = *pkt->dport;
    }
    fib.tot_len = tot_len;
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = ctx->ingress_ifindex;

    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
        if (nh)
            nh->nh_ifindex = 0;
        return lb_outcome(LB_PASS_NO_ROUTE, bytes, LB_ACT_PASS);
    }
    lb_nh_remember(nh, &fib, tot_len, relookup);
    lb_set_macs_ttl(pkt, fib.dmac, fib.smac);
    return lb_send(ctx, fib.ifindex, bytes);
}

/* L2 DSR: the frame goes to the backend `backend` on a directly attached link with only its
 * MACs changed: IP header (TTL too) and L4 untouched, since the backend holds the VIP itself
 * and the balancer is no routing hop. The FIB is asked for the backend's address, not the
 * packet's destination (the VIP). A backend reached through a gateway (the lookup then names
 * the gateway), an unresolved neighbour or a frame beyond the link's MTU cannot be sent at L2:
 * dropped and counted, because passing it up would have the kernel route a packet for the VIP,
 * which is not its own, back out toward the clients. `nh` caches the answer as lb_forward's. */
static __always_inline int lb_forward_l2(LB_CTX *ctx, struct lb_packet *pkt, __u64 bytes,
                                         __be32 backend, struct nat_entry *nh, int relookup)
{
    struct iphdr *ip = pkt->ip;
    __u16 tot_len = bpf_ntohs(ip->tot_len);

    if (nh && !relookup && nh->nh_ifindex && tot_len <= nh->nh_len_ok) {
        __builtin_memcpy(pkt->eth->h_dest, nh->nh_dmac, ETH_ALEN);
        __builtin_memcpy(pkt->eth->h_source, nh->nh_smac, ETH_ALEN);
        return lb_send(ctx, nh->nh_ifindex, bytes);
    }

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    if (pkt->sport && pkt->dport) {
        fib.sport = *pkt->sport;
        fib.dport = *pkt->dport;
    }
    fib.tot_len = tot_len;
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = backend;
    fib.ifindex = ctx->ingress_ifindex;

    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ipv4_dst != backend) {
        if (nh)
            nh->nh_ifindex = 0;
        return lb_outcome(LB_DROP_DSR_UNREACHABLE, bytes, LB_ACT_DROP);
    }
    lb_nh_remember(nh, &fib, tot_len, relookup);
    __builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);
    return lb_send(ctx, fib.ifindex, bytes);
}
