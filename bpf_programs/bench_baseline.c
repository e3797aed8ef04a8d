/* bench_baseline.c: the trivial XDP program `lbctl bench dataplane` measures beside the
 * balancer: bounds-check the Ethernet header, swap the MACs, send the frame back out.
 *
 * Why this and not "return XDP_PASS": it is the least any XDP forwarder does per packet
 * (read the frame, write to it, return a transmit verdict), so the balancer's ratio to it is
 * the price of its own work (parsing, map lookups, hashing, checksums, the FIB lookup) and not
 * of touching the packet at all. Its verdict costs nothing extra in a test run, which never
 * transmits. Swapping twice restores the frame, so every repetition of a test run sees the same
 * bytes. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

int xdp_bench_baseline(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    unsigned char mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac, ETH_ALEN);
    return XDP_TX;
}
