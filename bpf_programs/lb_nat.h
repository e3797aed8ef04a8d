/* lb_nat.h: address and port rewrites, each with its incremental checksum updates. */
#pragma once

#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "lb_csum.h"
#include "lb_parse.h"

/* One address of an IPv4 header, with that header's checksum. */
static __always_inline void lb_set_ip_addr(struct iphdr *ip, __be32 *field, __be32 addr)
{
    lb_csum_replace4(&ip->check, *field, addr);
    *field = addr;
}

/* A TCP/UDP checksum after one address of its pseudo-header and one port changed. */
static __always_inline void lb_l4_csum_update(__u16 *check, __u8 proto, __be32 old_addr,
                                              __be32 addr, __be16 old_port, __be16 port)
{
    lb_csum_replace4(check, old_addr, addr);
    lb_csum_replace2(check, old_port, port);
    /* For UDP 0 means "no checksum": a computed 0 is sent as 0xffff (RFC 768). */
    if (proto == IPPROTO_UDP && *check == 0)
        *check = 0xffff;
}

/* Rewrites one address and one port of the packet; which pair is chosen by `dst`. */
static __always_inline void lb_rewrite(struct lb_packet *pkt, int dst, __be32 addr, __be16 port)
{
    struct iphdr *ip = pkt->ip;
    __be32 *addr_field = dst ? &ip->daddr : &ip->saddr;
    __be16 *port_field = dst ? pkt->dport : pkt->sport;

    if (pkt->l4_check) {
#ifdef LB_TC
        lb_l4_fix_note((__u32)((void *)pkt->l4_check - (void *)pkt->eth),
                       ip->protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0,
                       addr_field, &addr, 1, *port_field, port);
#else
        lb_l4_csum_update(pkt->l4_check, ip->protocol, *addr_field, addr, *port_field, port);
#endif
    }
    lb_set_ip_addr(ip, addr_field, addr);
    *port_field = port;
}

/* A later fragment: one address and the IP header checksum. The L4 checksum is in the first
 * fragment, whose incremental update already covers the whole datagram. */
static __always_inline void lb_rewrite_addr(struct iphdr *ip, int dst, __be32 addr)
{
    lb_set_ip_addr(ip, dst ? &ip->daddr : &ip->saddr, addr);
}
