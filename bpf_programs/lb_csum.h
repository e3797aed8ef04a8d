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
