/* lb_icmp_quote.h: the packet an ICMP error quotes, and its rewrite with every checksum it
 * touches (NAT mode's lb_icmp.h and full-NAT's lb_snat.h both translate quotes). */
#pragma once

#include <uapi/linux/ip.h>

#include "lb_csum.h"
#include "lb_nat.h"

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
