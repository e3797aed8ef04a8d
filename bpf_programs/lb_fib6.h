/* lb_fib6.h: forwarding a rewritten IPv6 packet by the kernel's FIB (AF_INET6), with the
 * next hop cached in the flow's entry between refreshes, as lb_fib.h does for IPv4. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <linux/socket.h>

#include "lb_ctx.h"
#include "lb_fib.h"
#include "lb_parse6.h"
#include "lb_stats.h"
#include "lb_structs.h"

static __always_inline void lb_set_macs_hop(struct lb_packet6 *pkt, const __u8 *dmac, const __u8 *smac)
{
    /* Like a router; the hop-limit-1 case was passed to the kernel before any rewrite. No
     * header checksum to mend in IPv6. */
    pkt->ip6->hop_limit--;
    __builtin_memcpy(pkt->eth->h_dest, dmac, ETH_ALEN);
    __builtin_memcpy(pkt->eth->h_source, smac, ETH_ALEN);
}

/* The FIB question for `pkt` sent on to `dst`, asked as the kernel's own route lookup would.
 * Inlined: bcc links no BPF-to-BPF calls, and `fib` stays in the caller's frame. */
static __always_inline void lb_fib6_request(struct bpf_fib_lookup *fib, LB_CTX *ctx,
                                            const struct lb_packet6 *pkt, const __be32 *dst,
                                            __u32 tot_len)
{
    fib->family = AF_INET6;
    /* Traffic class and flow label, as the kernel's own route lookup sees them. */
    fib->flowinfo = *(__be32 *)pkt->ip6 & bpf_htonl(0x0FFFFFFF);
    fib->l4_protocol = pkt->key.proto;
    if (pkt->sport && pkt->dport) {   /* ICMPv6 has no ports */
        fib->sport = *pkt->sport;
        fib->dport = *pkt->dport;
    }
    fib->tot_len = tot_len;
    __builtin_memcpy(fib->ipv6_src, &pkt->ip6->saddr, 16);
    __builtin_memcpy(fib->ipv6_dst, dst, 16);
    fib->ifindex = ctx->ingress_ifindex;
}

/* L2 DSR for IPv6 (lb_forward_l2's twin): only the MACs change, toward `backend`, which must
 * be on an attached link (the FIB answers it as its own next hop); anything else is dropped,
 * since handing the VIP's packet to the kernel would route it back out. The hop limit is kept:
 * DSR is no routing hop. */
static __always_inline int lb_forward6_l2(LB_CTX *ctx, struct lb_packet6 *pkt, __u64 bytes,
                                          const __be32 *backend, struct nat_entry *nh, int relookup)
{
    struct ipv6hdr *ip6 = pkt->ip6;
    __u32 tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);

    if (nh && !relookup && nh->nh_ifindex && tot_len <= nh->nh_len_ok) {
        __builtin_memcpy(pkt->eth->h_dest, nh->nh_dmac, ETH_ALEN);
        __builtin_memcpy(pkt->eth->h_source, nh->nh_smac, ETH_ALEN);
        return lb_send(ctx, nh->nh_ifindex, bytes);
    }
    struct bpf_fib_lookup fib = {};
    lb_fib6_request(&fib, ctx, pkt, backend, tot_len);
    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    /* Via a gateway the FIB writes the gateway into ipv6_dst: not on an attached link. */
    if (rc != BPF_FIB_LKUP_RET_SUCCESS ||
        ((fib.ipv6_dst[0] ^ backend[0]) | (fib.ipv6_dst[1] ^ backend[1]) |
         (fib.ipv6_dst[2] ^ backend[2]) | (fib.ipv6_dst[3] ^ backend[3]))) {
        if (nh)
            nh->nh_ifindex = 0;
        return lb_outcome(LB_DROP_DSR_UNREACHABLE, bytes, LB_ACT_DROP);
    }
    lb_nh_remember(nh, &fib, tot_len, relookup);
    __builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);
    return lb_send(ctx, fib.ifindex, bytes);
}

/* lb_forward for IPv6: `nh` is the tracked entry's embedded IPv4-shaped part (its next-hop
 * cache), or NULL. */
static __always_inline int lb_forward6(LB_CTX *ctx, struct lb_packet6 *pkt, __u64 bytes,
                                       struct nat_entry *nh, int relookup)
{
    struct ipv6hdr *ip6 = pkt->ip6;
    __u32 tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);

    if (nh && !relookup && nh->nh_ifindex && tot_len <= nh->nh_len_ok) {
        lb_set_macs_hop(pkt, nh->nh_dmac, nh->nh_smac);
        return lb_send(ctx, nh->nh_ifindex, bytes);
    }

    struct bpf_fib_lookup fib = {};
    lb_fib6_request(&fib, ctx, pkt, (const __be32 *)&ip6->daddr, tot_len);
    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
        if (nh)
            nh->nh_ifindex = 0;
        return lb_outcome(LB_PASS_NO_ROUTE, bytes, LB_ACT_PASS);
    }
    lb_nh_remember(nh, &fib, tot_len, relookup);
    lb_set_macs_hop(pkt, fib.dmac, fib.smac);
    return lb_send(ctx, fib.ifindex, bytes);
}
