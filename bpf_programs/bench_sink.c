/* bench_sink.c: the packet sink of `lbctl bench peers` (packet-rate workload), attached on the
 * switch's end of the balancer's backend link: forwarded benchmark packets (UDP to SINK_PORT,
 * a -D flag, over IPv4 or IPv6) end there, counted by the interface, so the backends' own cost
 * stays out of the figure. Everything else passes. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

int sink_udp(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return XDP_PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        struct udphdr *udp6 = (void *)(ip6 + 1);
        if ((void *)(udp6 + 1) > end || ip6->nexthdr != IPPROTO_UDP)
            return XDP_PASS;
        return udp6->dest == bpf_htons(SINK_PORT) ? XDP_DROP : XDP_PASS;
    }
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end)
        return XDP_PASS;
    if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    return udp->dest == bpf_htons(SINK_PORT) ? XDP_DROP : XDP_PASS;
}
