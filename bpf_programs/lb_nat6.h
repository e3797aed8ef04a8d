/* lb_nat6.h: IPv6 address and port rewrites. IPv6 has no header checksum; TCP and UDP
 * checksums cover a pseudo-header with both 16-byte addresses, updated word by word. */
#pragma once

#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>

#include "lb_csum.h"
#include "lb_nat.h"
#include "lb_parse6.h"

/* A checksum whose coverage had a 16-byte address `from` replaced by `to`. */
static __always_inline void lb_csum_replace16(__u16 *check, const __be32 *from, const __be32 *to)
{
    lb_csum_replace4(check, from[0], to[0]);
    lb_csum_replace4(check, from[1], to[1]);
    lb_csum_replace4(check, from[2], to[2]);
    lb_csum_replace4(check, from[3], to[3]);
}

/* Rewrites one address and one port of the packet; which pair is chosen by `dst`. */
static __always_inline void lb_rewrite6(struct lb_packet6 *pkt, int dst, const __be32 *addr, __be16 port)
{
    struct ipv6hdr *ip6 = pkt->ip6;
    __be32 *addr_field = dst ? ip6->daddr.in6_u.u6_addr32 : ip6->saddr.in6_u.u6_addr32;
    __be16 *port_field = dst ? pkt->dport : pkt->sport;

    if (pkt->l4_check) {
#ifdef LB_TC
        lb_l4_fix_note((__u32)((void *)pkt->l4_check - (void *)pkt->eth),
                       (pkt->key.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) | LB_F_CSUM_IPV6,
                       addr_field, addr, 4, *port_field, port);
#else
        lb_csum_replace16(pkt->l4_check, addr_field, addr);
        lb_csum_replace2(pkt->l4_check, *port_field, port);
        if (pkt->key.proto == IPPROTO_UDP && *pkt->l4_check == 0)
            *pkt->l4_check = 0xffff;
#endif
    }
    addr_field[0] = addr[0];
    addr_field[1] = addr[1];
    addr_field[2] = addr[2];
    addr_field[3] = addr[3];
    *port_field = port;
}
