/* lb_icmp.h: ICMP errors (unreachable, time exceeded) about a tracked flow are translated
 * like the packets they quote, so path MTU discovery and port-unreachable work across the
 * balancer and no backend address leaks to a client. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "lb_ctx.h"
#include "lb_csum.h"
#include "lb_fib.h"
#include "lb_flow.h"
#include "lb_icmp_quote.h"
#include "lb_nat.h"
#include "lb_parse.h"
#include "lb_snat.h"
#include "lb_stats.h"

/* An error quoting client->backend (sent by the backend or a router near it, to the client):
 * the quote goes back to client->VIP and a backend's own address as sender becomes the VIP.
 * An error quoting VIP->client (from a router near the client, to the VIP): it goes to the
 * backend, quoting backend->client (DSR: unchanged, at L2). A full-NAT flow's errors:
 * lb_snat_icmp. Anything else passes untouched. */
static __always_inline int lb_icmp(LB_CTX *ctx, struct lb_packet *pkt, void *data_end,
                                   __u64 bytes)
{
    struct icmphdr *icmp = pkt->l4;
    if ((void *)(icmp + 1) > data_end)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);

    struct iphdr *inner = (void *)(icmp + 1);
    if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5 ||
        (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP))
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    struct lb_quoted_ports *ports = (void *)inner + inner->ihl * 4;
    if ((void *)(ports + 1) > data_end || pkt->ip->daddr != inner->saddr)
        return lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);

    /* The quoted packet went the other way: its reverse is the tuple of the packets the
     * error answers for; a reply entry for client->backend quotes, a flow entry for
     * VIP->client quotes. */
    struct flow_key quoted = {};
    quoted.src = inner->saddr;
    quoted.dst = inner->daddr;
    quoted.sport = ports->src;
    quoted.dport = ports->dst;
    quoted.proto = inner->protocol;
    struct flow_key key;
    lb_flow_reverse(&key, &quoted);
    enum lb_dir dir = LB_DIR_REPLY;
    struct nat_entry *e = lb_flow_lookup(&key, LB_DIR_REPLY);
    if (!e) {
        dir = LB_DIR_ORIGINAL;
        e = lb_flow_lookup(&key, LB_DIR_ORIGINAL);
    }
    /* The quoted L4 checksum is rewritten when the quote reaches it (UDP: always). */
    __u16 *l4_check = inner->protocol == IPPROTO_TCP
        ? (void *)ports + __builtin_offsetof(struct tcphdr, check)
        : (void *)ports + __builtin_offsetof(struct udphdr, check);
    if ((void *)(l4_check + 1) > data_end)
        l4_check = NULL;
    else if (inner->protocol == IPPROTO_UDP && *l4_check == 0)
        l4_check = NULL;
    if (!e) {
        int action = lb_snat_icmp(ctx, pkt, icmp, inner, ports, l4_check, &key, bytes);
        return action >= 0 ? action : lb_outcome(LB_PASS_NOT_VIP, bytes, LB_ACT_PASS);
    }
    /* DSR: the error quotes the backend's own VIP->client packet; it goes to that backend as
     * it is (path MTU discovery then works on the backend, which sent the packet). */
    if (e->forwarding == LB_FWD_DSR)
        return lb_forward_l2(ctx, pkt, bytes, e->addr, NULL, 0);
    if (pkt->ip->ttl <= 1)
        return lb_outcome(LB_PASS_TTL, bytes, LB_ACT_PASS);

    __u16 *icmp_check = &icmp->checksum;
    __be32 addr = e->addr;
    __be16 port = e->port;
    if (dir == LB_DIR_REPLY) {
        if (pkt->ip->saddr == inner->daddr)
            lb_set_ip_addr(pkt->ip, &pkt->ip->saddr, addr);
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 0, addr, port);
    } else {
        lb_set_ip_addr(pkt->ip, &pkt->ip->daddr, addr);
        lb_icmp_rewrite_quote(icmp_check, inner, ports, l4_check, 1, addr, port);
    }
    return lb_forward(ctx, pkt, bytes, NULL, 0);
}
