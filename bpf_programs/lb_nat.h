/* lb_nat.h: address/port rewrites with checksum updates, and forwarding by the kernel FIB. */
#pragma once

/* Rewrites one address and one port of the packet; which pair is chosen by `dst`. */
static __always_inline void lb_rewrite(struct lb_packet *pkt, int dst, __be32 addr, __be16 port)
{
    struct iphdr *ip = pkt->ip;
    __be32 *ip_field = dst ? &ip->daddr : &ip->saddr;
    __be16 *port_field = dst ? pkt->dport : pkt->sport;
    __be32 old_addr = *ip_field;
    __be16 old_port = *port_field;

    lb_csum_replace4(&ip->check, old_addr, addr);
    if (pkt->l4_check) {
        /* The L4 checksum covers the pseudo-header addresses and the port. */
        lb_csum_replace4(pkt->l4_check, old_addr, addr);
        lb_csum_replace2(pkt->l4_check, old_port, port);
        /* For UDP 0 means "no checksum": a computed 0 is sent as 0xffff (RFC 768). */
        if (ip->protocol == IPPROTO_UDP && *pkt->l4_check == 0)
            *pkt->l4_check = 0xffff;
    }
    *ip_field = addr;
    *port_field = port;
}

/* Routes the rewritten packet like the kernel would, decrementing the TTL. Returns the XDP
 * action; on no route or no neighbour the rewritten packet goes to the kernel, which forwards
 * it and resolves the neighbour for the next one. */
static __always_inline int lb_forward(struct xdp_md *ctx, struct lb_packet *pkt, __u64 bytes)
{
    struct iphdr *ip = pkt->ip;
    struct bpf_fib_lookup fib = {};

    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.sport = *pkt->sport;
    fib.dport = *pkt->dport;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = ctx->ingress_ifindex;

    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return lb_outcome(LB_PASS_NO_ROUTE, bytes, XDP_PASS);

    /* TTL: like a router; the TTL-1 case was passed to the kernel before any rewrite. */
    __u16 old_ttl_word = *(__u16 *)&ip->ttl;
    ip->ttl--;
    lb_csum_replace2(&ip->check, old_ttl_word, *(__u16 *)&ip->ttl);

    __builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);
    if (fib.ifindex == ctx->ingress_ifindex)
        return lb_outcome(LB_TX, bytes, XDP_TX);
    return lb_outcome(LB_REDIRECT, bytes, bpf_redirect(fib.ifindex, 0));
}
