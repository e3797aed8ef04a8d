/* lb_icmp6.h: ICMPv6 errors (destination unreachable, packet too big, time exceeded) about a
 * tracked flow are translated like the packets they quote, as lb_icmp.h does for IPv4, so
 * path MTU discovery works across the balancer and no backend address leaks to a client.
 * Every other ICMPv6 message (neighbour discovery, router advertisements, echo, MLD) passes
 * untouched. Unlike ICMP, the ICMPv6 checksum covers a pseudo-header with the outer addresses. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "lb_ctx.h"
#include "lb_csum.h"
#include "lb_fib6.h"
#include "lb_flow6.h"
#include "lb_icmp.h"
#include "lb_nat6.h"
#include "lb_parse6.h"
#include "lb_snat6.h"
#include "lb_stats.h"

/* An error quoting client->backend (from the backend or a router near it, to the client): the
 * quote goes back to client->VIP and a backend's own address as sender becomes the VIP. An
 * error quoting VIP->client (from a router near the client, to the VIP): it goes to the
 * backend, quoting backend->client. A full-NAT flow's errors: lb_snat6_icmp. Anything else
 * passes untouched. */
static __always_inline int lb_icmp6(LB_CTX *ctx, struct lb_packet6 *pkt, void *data_end,
                                    __u64 bytes)
{
    struct icmp6hdr *icmp = pkt->l4;
    if ((void *)(icmp + 1) > data_end)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    if (icmp->icmp6_type != ICMPV6_DEST_UNREACH && icmp->icmp6_type != ICMPV6_PKT_TOOBIG &&
        icmp->icmp6_type != ICMPV6_TIME_EXCEED)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);

    /* The quote starts with the offending packet's IPv6 header; a quote with extension
     * headers before its ports is not walked (it passes). */
    struct ipv6hdr *inner = (void *)(icmp + 1);
    if ((void *)(inner + 1) > data_end || inner->version != 6 ||
        (inner->nexthdr != IPPROTO_TCP && inner->nexthdr != IPPROTO_UDP))
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    struct lb_quoted_ports *ports = (void *)(inner + 1);
    if ((void *)(ports + 1) > data_end ||
        (void *)(ports + 1) > (void *)(pkt->ip6 + 1) + lb_len16(pkt->ip6->payload_len))
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    struct ipv6hdr *ip6 = pkt->ip6;
    if (!lb_addr6_equal(ip6->daddr.in6_u.u6_addr32, inner->saddr.in6_u.u6_addr32))
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);

    struct flow_key6 quoted = {};
    lb_addr6_copy(quoted.src, inner->saddr.in6_u.u6_addr32);
    lb_addr6_copy(quoted.dst, inner->daddr.in6_u.u6_addr32);
    quoted.sport = ports->src;
    quoted.dport = ports->dst;
    quoted.proto = inner->nexthdr;
    struct flow_key6 key;
    lb_flow6_reverse(&key, &quoted);
    enum lb_dir dir = LB_DIR_REPLY;
    struct nat_entry6 *e = lb_flow6_lookup(&key, LB_DIR_REPLY);
    if (!e) {
        dir = LB_DIR_ORIGINAL;
        e = lb_flow6_lookup(&key, LB_DIR_ORIGINAL);
    }
    /* The quoted L4 checksum is rewritten when the quote reaches it: within the IPv6 payload,
     * not in Ethernet padding past it, which no checksum covers. */
    void *end = (void *)(ip6 + 1) + lb_len16(ip6->payload_len);
    __u16 *l4_check = inner->nexthdr == IPPROTO_TCP
        ? (void *)ports + __builtin_offsetof(struct tcphdr, check)
        : (void *)ports + __builtin_offsetof(struct udphdr, check);
    if ((void *)(l4_check + 1) > data_end || (void *)(l4_check + 1) > end)
        l4_check = NULL;
    else if (inner->nexthdr == IPPROTO_UDP && *l4_check == 0)
        l4_check = NULL;
    if (!e) {
        int action = lb_snat6_icmp(ctx, pkt, icmp, inner, ports, l4_check, &key, bytes);
        return action >= 0 ? action : lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    }
    /* A DSR flow's backend sent its reply as the VIP: the error about it goes to that backend
     * at L2, unchanged (whatever the hop limit: DSR is no routing hop). */
    if (dir == LB_DIR_ORIGINAL && e->e.forwarding == LB_FWD_DSR) {
        pkt->sport = NULL;
        pkt->dport = NULL;
        return lb_forward6_l2(ctx, pkt, bytes, e->addr, NULL, 0);
    }
    if (ip6->hop_limit <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);

    __u16 *icmp_check = &icmp->icmp6_cksum;
    __be32 addr[4];
    lb_addr6_copy(addr, e->addr);
    __be16 port = e->e.port;
    if (dir == LB_DIR_REPLY) {
        if (lb_addr6_equal(ip6->saddr.in6_u.u6_addr32, inner->daddr.in6_u.u6_addr32))
            lb_icmp6_set_outer(icmp_check, ip6->saddr.in6_u.u6_addr32, addr);
        lb_icmp6_rewrite_quote(icmp_check, inner, ports, l4_check, 0, addr, port);
    } else {
        lb_icmp6_set_outer(icmp_check, ip6->daddr.in6_u.u6_addr32, addr);
        lb_icmp6_rewrite_quote(icmp_check, inner, ports, l4_check, 1, addr, port);
    }
    pkt->sport = NULL;
    pkt->dport = NULL;
    return lb_forward6(ctx, pkt, bytes, NULL, 0);
}
