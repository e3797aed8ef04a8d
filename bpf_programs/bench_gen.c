/* bench_gen.c: the packet generator of `lbctl bench peers` (packet-rate workload).
 *
 * Run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: the kernel builds frames from one
 * template and sends those this program returns XDP_TX for out of the interface given as
 * ingress (the client's veth, so they arrive at the balancer). Live frames are recycled without
 * being reset, and the balancer rewrites them in place (veth hands the page over), so every run
 * writes the whole header back from the template. The template is IPv4 or IPv6 (its ethertype
 * says which). GEN_FLOWS and GEN_FLOW_BASE come as -D flags. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

/* Literals: bcc describes map value types to Python from their text, sizeof and all. */
#define GEN_HDR_LEN 42
#define GEN_HDR6_LEN 62
_Static_assert(GEN_HDR_LEN == sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr),
               "an IPv4 template covers Ethernet, IPv4 without options and UDP");
_Static_assert(GEN_HDR6_LEN == sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr),
               "an IPv6 template covers Ethernet, IPv6 without extension headers and UDP");

struct gen_template { u8 bytes[62]; };
BPF_ARRAY(gen_template_map, struct gen_template, 1);
BPF_PERCPU_ARRAY(gen_seq, u32, 1);

int gen_udp(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    if (data + GEN_HDR_LEN > end)
        return XDP_ABORTED;
    u32 zero = 0;
    struct gen_template *t = gen_template_map.lookup(&zero);
    u32 *seq = gen_seq.lookup(&zero);
    if (!t || !seq)
        return XDP_ABORTED;
    u32 l3_len = sizeof(struct iphdr);
    if (t->bytes[12] == 0x86 && t->bytes[13] == 0xdd) {
        if (data + GEN_HDR6_LEN > end)
            return XDP_ABORTED;
        __builtin_memcpy(data, t->bytes, GEN_HDR6_LEN);
        l3_len = sizeof(struct ipv6hdr);
    } else {
        __builtin_memcpy(data, t->bytes, GEN_HDR_LEN);
    }
    u32 n = *seq + 1;
    *seq = n;
    /* One source port per flow; the UDP checksum is 0 (none), so nothing else changes (IPv6
     * forbids a 0 checksum, but the balancer forwards it as it came and the sink drops it). */
    struct udphdr *udp = data + sizeof(struct ethhdr) + l3_len;
    if ((void *)(udp + 1) > end)
        return XDP_ABORTED;
    udp->source = bpf_htons(GEN_FLOW_BASE + n % GEN_FLOWS);
    return XDP_TX;
}
