/* lb_parse.h: bounds-checked Ethernet/IPv4/TCP/UDP parsing; each step either fills the
 * packet view or says why the frame is not ours to touch. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "lb_consts.h"
#include "lb_structs.h"

/* frag_off bits, by the kernel's names (include/net/ip.h, which is not UAPI). */
#ifndef IP_MF
#define IP_MF 0x2000            /* more fragments follow */
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1fff        /* the fragment's offset, in 8-byte units */
#endif

/* The TCP flags flow tracking reads, as they lie in tcp_flag_word() (network order). */
#define LB_TCP_TRACKED_FLAGS (TCP_FLAG_FIN | TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_ACK)

struct lb_packet {
    struct ethhdr *eth;
    struct iphdr *ip;
    void *l4;
    __u16 *l4_check;        /* NULL: UDP without checksum */
    __be16 *sport;
    __be16 *dport;
    __be32 tcp_flags;       /* tcp_flag_word() & LB_TCP_TRACKED_FLAGS; 0 for UDP */
    __u8 more_fragments;    /* a first fragment: its NAT is recorded for the later ones */
    struct flow_key key;
};

/* A 16-bit length field (network order) in host order, with its range known to the verifier.
 * Before Linux 6.x's byte-swap tracking (Debian 12's 6.1 among them) the verifier forgets
 * every bound of a swapped register, and a packet pointer plus it is refused ("math between
 * pkt pointer and register with unbounded min value"). The mask restores the bound; the asm
 * keeps clang, which knows a swapped 16-bit value fits, from dropping it as redundant. */
static __always_inline __u32 lb_len16(__be16 field)
{
    __u32 len = bpf_ntohs(field);
    asm volatile("%0 &= %1" : "+r"(len) : "i"(0xffff));
    return len;
}

/* lb_parse's answers besides an outcome (>= 0: pass untouched). */
#define LB_PARSED_L4 (-1)       /* TCP or UDP: pkt is filled in */
#define LB_PARSED_ICMP (-2)     /* unfragmented ICMP: eth, ip and l4 are set */
#define LB_PARSED_FRAGMENT (-3) /* a later TCP/UDP fragment (no L4 header): eth and ip are set */

/* Returns an outcome when the frame must pass untouched, or an LB_PARSED_* code. */
static __always_inline int lb_parse(void *data, void *data_end, __u64 frame_len,
                                    struct lb_packet *pkt)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return LB_PASS_MALFORMED;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return LB_PASS_NOT_IPV4;

    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return LB_PASS_MALFORMED;
    if (ip->version != 4 || ip->ihl < 5)
        return LB_PASS_MALFORMED;
    __u32 ip_len = ip->ihl * 4;
    __u32 tot_len = lb_len16(ip->tot_len);
    /* A total length beyond the frame or shorter than the header is a lie. The frame's length,
     * not data_end: a tc build's skb may hold its payload beyond the linear part. */
    if (tot_len < ip_len || sizeof(struct ethhdr) + tot_len > frame_len)
        return LB_PASS_MALFORMED;
    if (ip->protocol == IPPROTO_ICMP && !(ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))) {
        /* Maybe an error about a tracked flow: lb_icmp.h decides. */
        pkt->eth = eth;
        pkt->ip = ip;
        pkt->l4 = (void *)ip + ip_len;
        return LB_PARSED_ICMP;
    }
    if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
        return LB_PASS_NOT_VIP;
    /* A non-zero offset: no ports here; the datagram's first fragment decides (frags). */
    if (ip->frag_off & bpf_htons(IP_OFFSET)) {
        pkt->eth = eth;
        pkt->ip = ip;
        return LB_PARSED_FRAGMENT;
    }
    /* MF with offset 0: a first fragment, whose L4 header is whole (checked below). */
    int more_fragments = (ip->frag_off & bpf_htons(IP_MF)) != 0;

    void *l4 = (void *)ip + ip_len;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return LB_PASS_MALFORMED;
        if (tcp->doff < 5 || tcp->doff * 4 > tot_len - ip_len)
            return LB_PASS_MALFORMED;
        pkt->l4_check = &tcp->check;
        pkt->sport = &tcp->source;
        pkt->dport = &tcp->dest;
        pkt->tcp_flags = tcp_flag_word(tcp) & LB_TCP_TRACKED_FLAGS;
    } else {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            return LB_PASS_MALFORMED;
        /* A first fragment's UDP length covers the whole datagram, beyond this packet. */
        if (bpf_ntohs(udp->len) < sizeof(*udp) ||
            (!more_fragments && bpf_ntohs(udp->len) > tot_len - ip_len))
            return LB_PASS_MALFORMED;
        pkt->l4_check = udp->check ? &udp->check : NULL;
        pkt->sport = &udp->source;
        pkt->dport = &udp->dest;
        pkt->tcp_flags = 0;
    }
    pkt->eth = eth;
    pkt->ip = ip;
    pkt->l4 = l4;
    pkt->more_fragments = more_fragments;
    pkt->key.src = ip->saddr;
    pkt->key.dst = ip->daddr;
    pkt->key.sport = *pkt->sport;
    pkt->key.dport = *pkt->dport;
    pkt->key.proto = ip->protocol;
    return LB_PARSED_L4;
}
