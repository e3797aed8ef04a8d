/* lb_parse6.h: bounds-checked Ethernet/IPv6/TCP/UDP parsing and the extension-header policy:
 * hop-by-hop options, destination options and a routing header with no segments left are
 * walked (up to LB_IPV6_EXT_MAX of them), then a fragment header if there is one (TCP or UDP
 * right behind it: a first fragment is parsed for its ports, a later one is handed to
 * lb_frag6.h); AH, a routing header with segments left, or a longer chain: the frame passes
 * untouched. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "lb_consts.h"
#include "lb_parse.h"
#include "lb_structs.h"

/* Extension headers walked before the L4 header; a bounded loop for the verifier. */
#ifndef LB_IPV6_EXT_MAX
#define LB_IPV6_EXT_MAX 4
#endif

struct lb_packet6 {
    struct ethhdr *eth;
    struct ipv6hdr *ip6;
    void *l4;
    __u16 *l4_check;        /* NULL: UDP without checksum (not valid in IPv6: left as it is) */
    __be16 *sport;
    __be16 *dport;
    __be32 tcp_flags;       /* as lb_packet's: tcp_flag_word() & LB_TCP_TRACKED_FLAGS */
    __u8 more_fragments;    /* a first fragment: its rewrite is recorded for the later ones */
    __be32 frag_id;         /* the fragment header's identification (fragments only) */
    struct flow_key6 key;
};

/* The fragment extension header (the kernel's struct frag_hdr is not UAPI). */
struct lb_ipv6_frag {
    __u8 nexthdr;
    __u8 reserved;
    __be16 frag_off;        /* offset in 8-byte units in the top 13 bits, M flag in bit 0 */
    __be32 identification;
};
#define LB_IPV6_FRAG_OFFSET 0xfff8
#define LB_IPV6_FRAG_MORE 0x0001

/* A bound on the L4 header's offset the verifier can carry: the longest walk is 14 + 40 +
 * LB_IPV6_EXT_MAX extension headers of 2,048 bytes + a fragment header's 8 = 8,254 bytes. */
#define LB_IPV6_L4_OFF_MAX 0x3fff

BPF_PERCPU_ARRAY(parse6_scratch, __u32, 1);

/* The first bytes every walked extension header shares (a routing header's are these four). */
struct lb_ipv6_ext {
    __u8 nexthdr;
    __u8 hdrlen;            /* in 8-byte units, not counting the first 8 */
    __u8 routing_type;
    __u8 segments_left;     /* routing header only */
};

/* Returns an outcome when the frame must pass untouched, LB_PARSED_L4 (TCP or UDP: pkt is
 * filled in; more_fragments and frag_id for a first fragment), LB_PARSED_ICMP (eth, ip6 and
 * l4 are set; l4 is the ICMPv6 header) or LB_PARSED_FRAGMENT (a later TCP/UDP fragment: eth,
 * ip6, key.src/dst/proto and frag_id are set, no ports). */
static __always_inline int lb_parse6(void *data, void *data_end, __u64 frame_len,
                                     struct lb_packet6 *pkt)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return LB_PASS_MALFORMED;
    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > data_end)
        return LB_PASS_MALFORMED;
    if (ip6->version != 6)
        return LB_PASS_MALFORMED;
    /* A payload length beyond the frame is a lie (a jumbogram's 0 never reaches Ethernet). */
    __u32 payload_len = lb_len16(ip6->payload_len);
    if (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + payload_len > frame_len)
        return LB_PASS_MALFORMED;
    void *end = (void *)(ip6 + 1) + payload_len;

    __u8 nexthdr = ip6->nexthdr;
    void *l4 = (void *)(ip6 + 1);
#pragma unroll
    for (int i = 0; i < LB_IPV6_EXT_MAX; i++) {
        if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_ROUTING)
            break;
        struct lb_ipv6_ext *ext = l4;
        if ((void *)(ext + 1) > data_end || (void *)(ext + 1) > end)
            return LB_PASS_MALFORMED;
        /* Segments left: the destination is a waypoint, not the VIP; the kernel routes it. */
        if (nexthdr == IPPROTO_ROUTING && ext->segments_left)
            return LB_PASS_EXT_HEADER;
        nexthdr = ext->nexthdr;
        l4 += ((__u32)ext->hdrlen + 1) * 8;
    }
    if (l4 > end)
        return LB_PASS_MALFORMED;
    int more_fragments = 0;
    if (nexthdr == IPPROTO_FRAGMENT) {
        struct lb_ipv6_frag *frag = l4;
        if ((void *)(frag + 1) > data_end || (void *)(frag + 1) > end)
            return LB_PASS_MALFORMED;
        /* Only TCP or UDP right behind the fragment header is followed; anything else
         * (ICMPv6, more extension headers) is the kernel's to reassemble. */
        nexthdr = frag->nexthdr;
        if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
            return LB_PASS_FRAGMENT;
        pkt->frag_id = frag->identification;
        __builtin_memcpy(pkt->key.src, &ip6->saddr, 16);
        __builtin_memcpy(pkt->key.dst, &ip6->daddr, 16);
        pkt->key.proto = nexthdr;
        if (frag->frag_off & bpf_htons(LB_IPV6_FRAG_OFFSET)) {
            pkt->eth = eth;
            pkt->ip6 = ip6;
            return LB_PARSED_FRAGMENT;
        }
        /* Offset 0: a first fragment (M set), whose L4 header must be whole here (RFC 8200
         * puts the whole header chain in the first fragment), or an atomic one (M clear,
         * RFC 6946), which is the whole datagram and goes as an unfragmented one would. */
        more_fragments = (frag->frag_off & bpf_htons(LB_IPV6_FRAG_MORE)) != 0;
        l4 = frag + 1;
    }
    /* The walk above (and a fragment header) leaves l4 at one of several offsets. The
     * verifier tracked each apart and checked all that follows (the whole IPv6 path) once per
     * offset: 850k of the 941k instructions it processed for the program, of its 1M limit.
     * Stored in a map entry and read back, the offset is one unknown value with one bound on
     * every path, and what follows is checked once (259k for the program). */
    __u32 zero = 0;
    __u32 *slot = parse6_scratch.lookup(&zero);
    if (!slot)
        return LB_PASS_MALFORMED;   /* cannot happen: the one entry of a per-CPU array */
    *slot = l4 - data;
    __u32 l4_off = *slot;
    if (l4_off > LB_IPV6_L4_OFF_MAX)
        return LB_PASS_EXT_HEADER;  /* cannot happen: see LB_IPV6_L4_OFF_MAX */
    l4 = data + l4_off;
    if (l4 > end)
        return LB_PASS_MALFORMED;

    if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_DSTOPTS ||
        nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_AH)
        return LB_PASS_EXT_HEADER;
    if (nexthdr == IPPROTO_ICMPV6) {
        pkt->eth = eth;
        pkt->ip6 = ip6;
        pkt->l4 = l4;
        pkt->key.proto = IPPROTO_ICMPV6;
        return LB_PARSED_ICMP;
    }
    if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
        return LB_PASS_NOT_VIP;

    __u32 l4_len = end - l4;
    if (nexthdr == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return LB_PASS_MALFORMED;
        if (tcp->doff < 5 || tcp->doff * 4 > l4_len)
            return LB_PASS_MALFORMED;
        pkt->l4_check = &tcp->check;
        pkt->sport = &tcp->source;
        pkt->dport = &tcp->dest;
        pkt->tcp_flags = tcp_flag_word(tcp) & LB_TCP_TRACKED_FLAGS;
    } else {
        struct udphdr *udp = l4;
        /* The header must lie inside the payload length, not in the frame's padding. */
        if ((void *)(udp + 1) > data_end || l4_len < sizeof(*udp))
            return LB_PASS_MALFORMED;
        /* A first fragment's UDP length covers the whole datagram, beyond this packet. */
        if (bpf_ntohs(udp->len) < sizeof(*udp) ||
            (!more_fragments && bpf_ntohs(udp->len) > l4_len))
            return LB_PASS_MALFORMED;
        pkt->l4_check = udp->check ? &udp->check : NULL;
        pkt->sport = &udp->source;
        pkt->dport = &udp->dest;
        pkt->tcp_flags = 0;
    }
    pkt->eth = eth;
    pkt->ip6 = ip6;
    pkt->l4 = l4;
    pkt->more_fragments = more_fragments;
    __builtin_memcpy(pkt->key.src, &ip6->saddr, 16);
    __builtin_memcpy(pkt->key.dst, &ip6->daddr, 16);
    pkt->key.sport = *pkt->sport;
    pkt->key.dport = *pkt->dport;
    pkt->key.proto = nexthdr;
    return LB_PARSED_L4;
}
