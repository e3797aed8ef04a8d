/* lb_csum.h: incremental Internet checksum updates (RFC 1624) for rewritten fields. */
#pragma once

#include <linux/types.h>

/* Fields are summed exactly as they lie in memory: one's complement addition commutes with
 * the byte swap, so network-order values need no conversion. */
static __always_inline __u16 lb_csum_fold(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* HC' = ~(~HC + ~m + m') for a 32-bit field m -> m'. */
static __always_inline void lb_csum_replace4(__u16 *check, __u32 from, __u32 to)
{
    __u32 sum = (__u16)~*check;
    sum += (~from & 0xffff) + (~from >> 16);
    sum += (to & 0xffff) + (to >> 16);
    *check = lb_csum_fold(sum);
}

static __always_inline void lb_csum_replace2(__u16 *check, __u16 from, __u16 to)
{
    __u32 sum = (__u16)~*check;
    sum += (__u16)~from;
    sum += to;
    *check = lb_csum_fold(sum);
}

#ifdef LB_TC
#include "lb_ctx.h"

/* The tc build's TCP/UDP checksum updates. A socket on the same host that sends over veth
 * with transmit checksum offload on (the kernel's default) hands over a segment whose checksum
 * field holds only the pseudo-header's sum (CHECKSUM_PARTIAL), for the device to finish; a
 * NIC may hand over one with the whole segment's sum beside it (CHECKSUM_COMPLETE). The XDP
 * build sees neither and updates the field as a full checksum. The tc build leaves it to the
 * kernel's helper, which updates each kind as the kernel's own NAT does: a partial sum by the
 * addresses only, a full one by addresses and ports, a complete sum in step.
 * The helper may move the packet's data, so the updates are gathered while the program
 * rewrites (lb_l4_fix_note) and made once, by the entry, after the program's last access to
 * the packet (lb_l4_fix_apply). They are gathered in a per-CPU entry, not on the stack: a
 * value kept in a map is not tracked by the verifier, which otherwise told apart, and checked
 * again, every path by what it had gathered (past its 1M-instruction limit). */
struct lb_l4_fix {
    __u32 pseudo;       /* the address changes: 32-bit one's complement sum of ~old + new */
    __u32 data;         /* the port changes, the same way */
    __u32 off_odd;      /* the checksum field's (even) offset from the frame's start, ^ 1;
                         * 0: no update pending */
    __u32 flags;        /* BPF_F_MARK_MANGLED_0 for UDP (a computed 0 is sent as 0xffff, a 0,
                         * no checksum, stays), LB_F_CSUM_IPV6 for IPv6 */
};

/* The kernel's BPF_F_IPV6 for bpf_l4_csum_replace (a complete sum does not cover an IPv6
 * pseudo-header's change); bcc's copy of the UAPI header predates it. A kernel from before it
 * refuses the update for the flag: the control plane asks the kernel, and defines
 * LB_CSUM_IPV6_FLAG only when it is known (xdp/program.py). */
#ifdef LB_CSUM_IPV6_FLAG
#define LB_F_CSUM_IPV6 (1ULL << 7)
#else
#define LB_F_CSUM_IPV6 0
#endif

BPF_PERCPU_ARRAY(l4_fix, struct lb_l4_fix, 1);

static __always_inline __u32 lb_csum_add(__u32 sum, __u32 v)
{
    sum += v;
    return sum + (sum < v);
}

static __always_inline struct lb_l4_fix *lb_l4_fix_get(void)
{
    __u32 zero = 0;
    return l4_fix.lookup(&zero);
}

/* One rewritten address (`words` 32-bit words, 1 or 4) and port of the segment whose checksum
 * field is `off` bytes into the frame. */
static __always_inline void lb_l4_fix_note(__u32 off, __u32 flags, const __be32 *from,
                                           const __be32 *to, int words, __u16 old_port, __u16 port)
{
    struct lb_l4_fix *fix = lb_l4_fix_get();
    if (!fix)
        return;
    __u32 sum = fix->pseudo;
    for (int i = 0; i < words; i++)
        sum = lb_csum_add(lb_csum_add(sum, ~from[i]), to[i]);
    fix->pseudo = sum;
    fix->data = lb_csum_add(lb_csum_add(fix->data, (__u16)~old_port), port);
    fix->off_odd = off ^ 1;
    fix->flags = flags;
}

/* Called by the entry before the program runs: nothing pending. */
static __always_inline void lb_l4_fix_reset(void)
{
    struct lb_l4_fix *fix = lb_l4_fix_get();
    if (fix)
        fix->off_odd = fix->pseudo = fix->data = 0;
}

/* Makes the gathered updates: two helper calls and no branch. With nothing pending the helper
 * gets the odd offset 1, which it refuses without touching the packet. The second call carries
 * no pseudo-header flag: the kernel then leaves a partial sum alone (the device sums the ports
 * itself) and a complete one too (a port and its checksum change cancel). */
static __always_inline void lb_l4_fix_apply(LB_CTX *ctx)
{
    struct lb_l4_fix *fix = lb_l4_fix_get();
    if (!fix)
        return;
    __u64 flags = fix->flags;
    bpf_l4_csum_replace(ctx, fix->off_odd ^ 1, 0, fix->pseudo, flags | BPF_F_PSEUDO_HDR);
    bpf_l4_csum_replace(ctx, fix->off_odd ^ 1, 0, fix->data, flags & BPF_F_MARK_MANGLED_0);
}
#endif
