/* lb_icmp_quote.h: the packet an ICMP or ICMPv6 error quotes, and its rewrite with every
 * checksum it touches (NAT mode's lb_icmp.h/lb_icmp6.h and full-NAT's lb_snat_af.inc all
 * translate quotes). */
#pragma once

#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lb_csum.h"
#include "lb_flow6.h"
#include "lb_nat.h"
#include "lb_nat6.h"

/* RFC 792: an error quotes the IP header and at least the first 8 bytes past it: the ports
 * (and, for UDP, the checksum). These are the only L4 fields known to be there. */
struct lb_quoted_ports {
    __be16 src;
    __be16 dst;
    __be32 next;            /* UDP length and checksum, or TCP's sequence number */
};

/* Rewrites the quoted packet's address and port (`src` picks which pair), keeping the quoted
 * IP and TCP/UDP checksums and the ICMP checksum (which covers all of the quote) right. */
static __always_inline void lb_icmp_rewrite_quote(__u16 *icmp_check, struct iphdr *inner,
                                                  struct lb_quoted_ports *ports, __u16 *l4_check,
                                                  int src, __be32 addr, __be16 port)
{
    __be32 *addr_field = src ? &inner->saddr : &inner->daddr;
    __be16 *port_field = src ? &ports->src : &ports->dst;
    __be32 old_addr = *addr_field;
    __be16 old_port = *port_field;
    __u16 old_ip_check = inner->check;

    lb_set_ip_addr(inner, addr_field, addr);
    if (l4_check) {
        __u16 old_l4_check = *l4_check;
        lb_l4_csum_update(l4_check, inner->protocol, old_addr, addr, old_port, port);
        lb_csum_replace2(icmp_check, old_l4_check, *l4_check);
    }
    lb_csum_replace4(icmp_check, old_addr, addr);
    lb_csum_replace2(icmp_check, old_port, port);
    lb_csum_replace2(icmp_check, old_ip_check, inner->check);
    *port_field = port;
}

/* Rewrites the quoted packet's address and port (`src` picks which pair), keeping the quoted
 * TCP/UDP checksum and the ICMPv6 checksum (which covers all of the quote) right. */
static __always_inline void lb_icmp6_rewrite_quote(__u16 *icmp_check, struct ipv6hdr *inner,
                                                   struct lb_quoted_ports *ports, __u16 *l4_check,
                                                   int src, const __be32 *addr, __be16 port)
{
    __be32 *addr_field = src ? inner->saddr.in6_u.u6_addr32 : inner->daddr.in6_u.u6_addr32;
    __be16 *port_field = src ? &ports->src : &ports->dst;
    __be16 old_port = *port_field;

    if (l4_check) {
        __u16 old_l4_check = *l4_check;
        lb_csum_replace16(l4_check, addr_field, addr);
        lb_csum_replace2(l4_check, old_port, port);
        if (inner->nexthdr == IPPROTO_UDP && *l4_check == 0)
            *l4_check = 0xffff;
        lb_csum_replace2(icmp_check, old_l4_check, *l4_check);
    }
    lb_csum_replace16(icmp_check, addr_field, addr);
    lb_csum_replace2(icmp_check, old_port, port);
    lb_addr6_copy(addr_field, addr);
    *port_field = port;
}

/* One outer address: the ICMPv6 checksum's pseudo-header has it. */
static __always_inline void lb_icmp6_set_outer(__u16 *icmp_check, __be32 *field, const __be32 *addr)
{
    lb_csum_replace16(icmp_check, field, addr);
    lb_addr6_copy(field, addr);
}
