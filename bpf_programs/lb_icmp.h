/* lb_icmp.h: ICMP errors (unreachable, time exceeded) about a tracked flow are translated
 * like the packets they quote, so path MTU discovery and port-unreachable work across the
 * balancer and no backend address leaks to a client. */
#pragma once

#define LB_ICMP_DEST_UNREACH 3
#define LB_ICMP_TIME_EXCEEDED 11

/* Rewrites the quoted packet's address and port (`src` picks which pair), keeping the quoted
 * IP and TCP/UDP checksums and the ICMP checksum (which covers all of the quote) right. */
static __always_inline void lb_icmp_rewrite_quote(__u16 *icmp_check, struct iphdr *inner,
                                                  __be16 *ports, __u16 *l4_check, int src,
                                                  __be32 addr, __be16 port)
{
    __be32 *addr_field = src ? &inner->saddr : &inner->daddr;
    __be16 *port_field = src ? &ports[0] : &ports[1];
    __be32 old_addr = *addr_field;
    __be16 old_port = *port_field;
    __u16 old_ip_check = inner->check;

    lb_csum_replace4(&inner->check, old_addr, addr);
    if (l4_check) {
        __u16 old_l4_check = *l4_check;
        lb_csum_replace4(l4_check, old_addr, addr);
        lb_csum_replace2(l4_check, old_port, port);
        if (inner->protocol == IPPROTO_UDP && *l4_check == 0)
            *l4_check = 0xffff;
        lb_csum_replace2(icmp_check, old_l4_check, *l4_check);
    }
    lb_csum_replace4(icmp_check, old_addr, addr);
    lb_csum_replace2(icmp_check, old_port, port);
    lb_csum_replace2(icmp_check, old_ip_check, inner->check);
    *addr_field = addr;
    *port_field = port;
}

/* An error quoting client->backend (sent by the backend or a router near it, to the client):
 * the quote goes back to client->VIP and a backend's own address as sender becomes the VIP.
 * An error quoting VIP->client (from a router near the client, to the VIP): it goes to the
 * backend, quoting backend->client. Anything else passes untouched. */
static __always_inline int lb_icmp(struct xdp_md *ctx, struct lb_packet *pkt, void *data_end,
                                   __u64 bytes)
{
    __u8 *icmp = pkt->l4;
    if ((void *)(icmp + 8) > data_end)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, XDP_PASS);
    if (icmp[0] != LB_ICMP_DEST_UNREACH && icmp[0] != LB_ICMP_TIME_EXCEEDED)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, XDP_PASS);

    struct iphdr *inner = (void *)(icmp + 8);
    if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5 ||
        (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP))
        return lb_outcome(LB_PASS_NOT_VIP, bytes, XDP_PASS);
    /* RFC 792: the quote holds at least the first 8 bytes past the IP header: the ports. */
    __be16 *ports = (void *)inner + inner->ihl * 4;
    if ((void *)(ports + 4) > data_end || pkt->ip->daddr != inner->saddr)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, XDP_PASS);

    /* The tuple the quoted packet answers to: a reverse entry for client->backend quotes,
     * a flow entry for VIP->client quotes. */
    struct flow_key key = {};
    key.src = inner->daddr;
    key.dst = inner->saddr;
    key.sport = ports[1];
    key.dport = ports[0];
    key.proto = inner->protocol;
    int to_client = 1;
    struct nat_entry *e = rnat.lookup(&key);
    if (!e) {
        e = flows.lookup(&key);
        to_client = 0;
    }
    if (!e)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, XDP_PASS);
    if (pkt->ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, XDP_PASS);

    /* The quoted L4 checksum is rewritten when the quote reaches it (UDP: always). */
    __u16 *l4_check = inner->protocol == IPPROTO_TCP ? (__u16 *)&ports[8] : (__u16 *)&ports[3];
    if ((void *)(l4_check + 1) > data_end)
        l4_check = NULL;
    else if (inner->protocol == IPPROTO_UDP && *l4_check == 0)
        l4_check = NULL;
    __u16 *icmp_check = (__u16 *)(icmp + 2);
    __be32 addr = e->addr;
    __be16 port = e->port;
    if (to_client) {
        if (pkt->ip->saddr == inner->daddr) {
            lb_csum_replace4(&pkt->ip->check, pkt->ip->saddr, addr);
            pkt->ip->saddr = addr;
        }
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 0, addr, port);
    } else {
        lb_csum_replace4(&pkt->ip->check, pkt->ip->daddr, addr);
        pkt->ip->daddr = addr;
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 1, addr, port);
    }
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}
