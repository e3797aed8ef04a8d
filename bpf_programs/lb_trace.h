/* lb_trace.h: `lbctl trace` and `lbctl capture`: while a tracer has switched it on, one event
 * a packet (tuple in and out, outcome, backend, the frame's first bytes before and after the
 * rewrite) into a ring buffer. Off, it costs the packet one array lookup and a branch. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lb_ctx.h"
#include "lb_consts.h"
#include "lb_structs.h"
#include "lb_maps.h"
#include "lb_maps6.h"
#include "lb_snat.h"

/* Bytes of each frame an event carries, before and after the rewrite: Ethernet, IPv4 with
 * options and a TCP header with options fit, and the start of the payload. A power of two. */
#ifndef LB_TRACE_SNAP_BYTES
#define LB_TRACE_SNAP_BYTES 128
#endif
/* The ring buffer's size (a power of two pages): ~1500 events before a slow reader loses some. */
#ifndef LB_TRACE_RING_BYTES
#define LB_TRACE_RING_BYTES (512 * 1024)
#endif

/* What trace_ctl's one entry says. Written by the tracer; a zero `enabled` is off. */
#define LB_TRACE_F_FRAMES 0x1   /* copy the frames' first bytes (capture) */

/* What the event says happened, beyond the outcome counter it moved. */
enum lb_trace_kind {
    LB_TRACE_PASS = 0,          /* to the kernel untouched: the outcome says why */
    LB_TRACE_NEW_FLOW = 1,      /* client -> VIP, backend picked by the ring */
    LB_TRACE_FLOW_HIT = 2,      /* client -> VIP, backend from the flow table */
    LB_TRACE_REVERSE_NAT = 3,   /* backend -> client, source rewritten to the VIP */
    LB_TRACE_DROP = 4,          /* dropped: the outcome says why */
    LB_TRACE_OTHER = 5,         /* rewritten another way (ICMP errors, later fragments) */
};

/* The outcome field when no outcome counter moved (cannot happen unless a path forgets). */
#define LB_TRACE_NO_OUTCOME 0xffffffffU

/* Addresses of either family: IPv4 in the first word, the rest 0. */
struct lb_trace_tuple {
    __be32 src[4];
    __be32 dst[4];
    __be16 sport;
    __be16 dport;
    __u8 proto;             /* 0: neither IPv4 nor IPv6 */
    __u8 family;            /* 4, 6, or 0 with proto */
    __u8 pad[2];
};

struct lb_trace_ctl {
    __u32 enabled;          /* the tracer's pid: `lbctl trace` clears it when that pid is gone */
    __u32 flags;            /* LB_TRACE_F_* */
    /* Filters, each of one family (4 or 6; 0 matches anything). A VIP matches the destination
     * a client's packet arrives with or the source a reply leaves with; a client either end
     * of the original tuple; a backend the rewritten destination or a reply's source. A port
     * or protocol of 0 matches any. */
    __be32 vip_addr[4];
    __be16 vip_port;
    __u8 vip_proto;
    __u8 vip_family;
    __be32 client_addr[4];
    __be32 backend_addr[4];
    __be16 backend_port;
    __u8 client_family;
    __u8 backend_family;
};

struct lb_trace_event {
    __u64 ts_ns;            /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u32 ifindex;          /* where the frame arrived */
    __u32 action;           /* XDP_* the program returned (a tc build's verdict in XDP's codes) */
    __u32 outcome;          /* enum lb_outcome, or LB_TRACE_NO_OUTCOME */
    __u32 kind;             /* enum lb_trace_kind */
    __u32 backend_id;       /* LB_NO_BACKEND when none */
    __u32 frame_len;        /* the frame's length as it arrived */
    struct lb_trace_tuple in;
    struct lb_trace_tuple out;
    __u16 before_len;       /* bytes valid in before[] (0: frames not asked for) */
    __u16 after_len;
    __u32 pad;
    __u8 before[LB_TRACE_SNAP_BYTES];
    __u8 after[LB_TRACE_SNAP_BYTES];
};

/* The packet being traced: the event in the making, each outcome counter's value before the
 * program ran (the one that moved is the outcome), and the new-flow count of the VIP the
 * packet is addressed to (moved: the ring picked a backend). */
struct lb_trace_scratch {
    struct lb_trace_event ev;
    __u64 outcome_packets[LB_OUTCOME_MAX];
    __u64 vip_new_flows;
    __u32 vip_id;           /* LB_NO_BACKEND: not addressed to a VIP */
    __u32 active;           /* xdp_lb: lb_trace_begin ran for this packet */
    /* IPv6 lookup keys, here rather than on the stack the balancer's own path fills. */
    struct vip_key6 vip_key6;
    struct flow_key6 flow_key6;
    /* The IPv4 keys too: with both families and full-NAT inlined into xdp_lb, 24 bytes more
     * on its stack passed the 512-byte frame. */
    struct vip_key vip_key4;
    struct flow_key flow_key4;
    __u32 outcome_key;      /* the outcome counters' key, per lookup */
    __u32 pad2;
};

BPF_TABLE_PINNED("array", u32, struct lb_trace_ctl, trace_ctl, 1, LB_PIN_DIR "trace_ctl");
/* bcc's BPF_RINGBUF_OUTPUT, pinned (bcc has no pinned form of it): the tracer is another
 * process and finds the ring by its path. */
struct trace_events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:" LB_PIN_DIR "trace_events")))
struct trace_events_table_t trace_events = { .max_entries = LB_TRACE_RING_BYTES };
/* Per-CPU, not pinned: an event is built and sent within one run of the program. */
BPF_PERCPU_ARRAY(trace_scratch, struct lb_trace_scratch, 1);

/* The tracer's settings when tracing is on, else NULL: the only cost while off. */
static __always_inline struct lb_trace_ctl *lb_trace_on(void)
{
    __u32 zero = 0;
    struct lb_trace_ctl *tc = trace_ctl.lookup(&zero);
    if (tc && tc->enabled)
        return tc;
    return NULL;
}

static __always_inline void lb_trace_tuple_of(LB_CTX *ctx, struct lb_trace_tuple *t)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __builtin_memset(t, 0, sizeof(*t));
    if ((void *)(eth + 1) > data_end)
        return;
    __be16 *ports = NULL;
    if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return;
        __builtin_memcpy(t->src, &ip6->saddr, 16);
        __builtin_memcpy(t->dst, &ip6->daddr, 16);
        t->proto = ip6->nexthdr;
        t->family = 6;
        /* Ports where TCP/UDP follows the fixed header (not behind extension headers). */
        if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
            return;
        ports = (void *)(ip6 + 1);
    } else if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->ihl < 5)
            return;
        t->src[0] = ip->saddr;
        t->dst[0] = ip->daddr;
        t->proto = ip->protocol;
        t->family = 4;
        /* Ports only where the L4 header is there: not in a later fragment. */
        if (ip->frag_off & bpf_htons(0x1fff))
            return;
        if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
            return;
        ports = (void *)ip + ip->ihl * 4;
    } else {
        return;
    }
    if ((void *)(ports + 2) > data_end)
        return;
    t->sport = ports[0];
    t->dport = ports[1];
}

static __always_inline int lb_trace_addr_eq(const __be32 *a, const __be32 *b)
{
    return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]));
}

static __always_inline __u16 lb_trace_copy(LB_CTX *ctx, __u8 *buf)
{
    __u64 len = lb_frame_len(ctx);
    if (len >= LB_TRACE_SNAP_BYTES)
        return lb_load_bytes(ctx, 0, buf, LB_TRACE_SNAP_BYTES) < 0 ? 0 : LB_TRACE_SNAP_BYTES;
    if (len < 1)
        return 0;
    /* The verifier needs the length bounded in the register the call reads, at least 1 and
     * at most the buffer: len - 1 masked (a power of two less one; the asm keeps clang from
     * dropping the mask as redundant), plus 1. Not len masked and tested against 0: before
     * Linux 6.x's refinement of "!= 0", Debian 12's 6.1 learns no lower bound from that test
     * and refuses a call that may read 0 bytes. */
    __u64 last = len - 1;
    asm volatile("%0 &= %1" : "+r"(last) : "i"(LB_TRACE_SNAP_BYTES - 1));
    return lb_load_bytes(ctx, 0, buf, last + 1) < 0 ? 0 : len;
}

/* Before the program decides: the tuple and frame as they arrived, the counters as they were. */
static __always_inline struct lb_trace_scratch *lb_trace_begin(LB_CTX *ctx,
                                                                struct lb_trace_ctl *tc)
{
#ifndef LB_TC
    /* `lbctl explain` asks with metadata in a test run: not traffic, not traced. */
    if (ctx->data_meta != ctx->data)
        return NULL;
#endif
    __u32 zero = 0;
    struct lb_trace_scratch *s = trace_scratch.lookup(&zero);
    if (!s)
        return NULL;
    s->ev.ts_ns = bpf_ktime_get_ns();
    s->ev.ifindex = ctx->ingress_ifindex;
    s->ev.frame_len = lb_frame_len(ctx);
    lb_trace_tuple_of(ctx, &s->ev.in);
    s->ev.before_len = 0;
    s->ev.after_len = 0;
    if (tc->flags & LB_TRACE_F_FRAMES)
        s->ev.before_len = lb_trace_copy(ctx, s->ev.before);
    /* One key slot for every unrolled lookup (a key per iteration cost a stack slot each). */
    __u32 *okey = &s->outcome_key;
#pragma unroll
    for (__u32 i = 0; i < LB_OUTCOME_MAX; i++) {
        *okey = i;
        struct lb_counters *c = stats_global.lookup(okey);
        s->outcome_packets[i] = c ? c->packets : 0;
    }
    s->vip_id = LB_NO_BACKEND;
    s->vip_new_flows = 0;
    struct vip_meta *vip = NULL;
    if (s->ev.in.family == 6) {
        __builtin_memcpy(s->vip_key6.addr, s->ev.in.dst, 16);
        s->vip_key6.port = s->ev.in.dport;
        s->vip_key6.proto = s->ev.in.proto;
        s->vip_key6.pad = 0;
        vip = vips6.lookup(&s->vip_key6);
    } else {
        struct vip_key *vk = &s->vip_key4;
        __builtin_memset(vk, 0, sizeof(*vk));
        vk->addr = s->ev.in.dst[0];
        vk->port = s->ev.in.dport;
        vk->proto = s->ev.in.proto;
        vip = vips.lookup(vk);
    }
    if (vip) {
        __u32 vip_id = vip->vip_id;
        struct lb_counters *c = stats_vip.lookup(&vip_id);
        s->vip_id = vip_id;
        s->vip_new_flows = c ? c->new_flows : 0;
    }
    return s;
}

static __always_inline int lb_trace_match(struct lb_trace_ctl *tc, struct lb_trace_event *ev,
                                          int reply)
{
    if (tc->vip_family) {
        struct lb_trace_tuple *t = reply ? &ev->out : &ev->in;
        __be32 *addr = reply ? t->src : t->dst;
        __be16 port = reply ? t->sport : t->dport;
        if (t->family != tc->vip_family || !lb_trace_addr_eq(addr, tc->vip_addr) ||
            (tc->vip_port && port != tc->vip_port) || (tc->vip_proto && t->proto != tc->vip_proto))
            return 0;
    }
    if (tc->client_family && (ev->in.family != tc->client_family ||
                              (!lb_trace_addr_eq(ev->in.src, tc->client_addr) &&
                               !lb_trace_addr_eq(ev->in.dst, tc->client_addr))))
        return 0;
    if (tc->backend_family) {
        struct lb_trace_tuple *t = reply ? &ev->in : &ev->out;
        __be32 *addr = reply ? t->src : t->dst;
        __be16 port = reply ? t->sport : t->dport;
        if (t->family != tc->backend_family || !lb_trace_addr_eq(addr, tc->backend_addr) ||
            (tc->backend_port && port != tc->backend_port))
            return 0;
    }
    return 1;
}

/* The IPv6 twin of the kind below: the flows6/rnat6 entry the packet hit, if any. */
static __always_inline int lb_trace_kind6(struct lb_trace_scratch *s, int *reply)
{
    struct lb_trace_event *ev = &s->ev;
    struct flow_key6 *key = &s->flow_key6;
    __builtin_memcpy(key->src, ev->in.src, 16);
    __builtin_memcpy(key->dst, ev->in.dst, 16);
    key->sport = ev->in.sport;
    key->dport = ev->in.dport;
    key->proto = ev->in.proto;
    key->pad[0] = key->pad[1] = key->pad[2] = 0;
    struct nat_entry6 *e = flows6.lookup(key);
    if (e && !lb_trace_addr_eq(ev->out.dst, ev->in.dst)) {
        __u32 vip_id = s->vip_id;
        struct lb_counters *c = stats_vip.lookup(&vip_id);
        ev->backend_id = e->e.backend_id;
        return c && c->new_flows != s->vip_new_flows ? LB_TRACE_NEW_FLOW : LB_TRACE_FLOW_HIT;
    }
    if (!lb_trace_addr_eq(ev->out.src, ev->in.src) && (e = rnat6.lookup(key))) {
        ev->backend_id = e->e.backend_id;
        *reply = 1;
        return LB_TRACE_REVERSE_NAT;
    }
    return LB_TRACE_OTHER;
}

/* After the program decided: what it did, filtered, sent to the tracer. */
static __always_inline void lb_trace_end(LB_CTX *ctx, struct lb_trace_ctl *tc,
                                         struct lb_trace_scratch *s, int action)
{
    struct lb_trace_event *ev = &s->ev;
    ev->action = action;
    ev->outcome = LB_TRACE_NO_OUTCOME;
    __u32 *okey = &s->outcome_key;
#pragma unroll
    for (__u32 i = 0; i < LB_OUTCOME_MAX; i++) {
        *okey = i;
        struct lb_counters *c = stats_global.lookup(okey);
        if (c && c->packets != s->outcome_packets[i])
            ev->outcome = i;
    }
    if (action == XDP_TX || action == XDP_REDIRECT)
        lb_trace_tuple_of(ctx, &ev->out);
    else
        ev->out = ev->in;

    ev->backend_id = LB_NO_BACKEND;
    int reply = 0;
    if (action == XDP_DROP || action == XDP_ABORTED) {
        ev->kind = LB_TRACE_DROP;
    } else if (action == XDP_PASS) {
        ev->kind = LB_TRACE_PASS;
    } else if (ev->in.family == 6) {
        ev->kind = lb_trace_kind6(s, &reply);
    } else {
        struct flow_key *key = &s->flow_key4;
        __builtin_memset(key, 0, sizeof(*key));
        key->src = ev->in.src[0];
        key->dst = ev->in.dst[0];
        key->sport = ev->in.sport;
        key->dport = ev->in.dport;
        key->proto = ev->in.proto;
        struct nat_entry *e = flows.lookup(key);
        if (e && ev->out.dst[0] != ev->in.dst[0]) {
            __u32 vip_id = s->vip_id;
            struct lb_counters *c = stats_vip.lookup(&vip_id);
            ev->backend_id = e->backend_id;
            ev->kind = c && c->new_flows != s->vip_new_flows ? LB_TRACE_NEW_FLOW : LB_TRACE_FLOW_HIT;
        } else if (ev->out.src[0] != ev->in.src[0] && (e = rnat.lookup(key))) {
            ev->backend_id = e->backend_id;
            ev->kind = LB_TRACE_REVERSE_NAT;
            reply = 1;
        } else {
            /* full-NAT's own tables (lb_snat.h): a client's packet, or a backend's reply. */
            struct snat_entry *se = snat_flows.lookup(key);
            if (se && ev->out.dst[0] != ev->in.dst[0]) {
                __u32 vip_id = s->vip_id;
                struct lb_counters *c = stats_vip.lookup(&vip_id);
                ev->backend_id = se->nat.backend_id;
                ev->kind = c && c->new_flows != s->vip_new_flows ? LB_TRACE_NEW_FLOW : LB_TRACE_FLOW_HIT;
            } else if ((se = snat_rnat.lookup(key))) {
                ev->backend_id = se->nat.backend_id;
                ev->kind = LB_TRACE_REVERSE_NAT;
                reply = 1;
            } else {
                ev->kind = LB_TRACE_OTHER;
            }
        }
    }
    if (!lb_trace_match(tc, ev, reply))
        return;
    if (tc->flags & LB_TRACE_F_FRAMES)
        ev->after_len = action == XDP_TX || action == XDP_REDIRECT ? lb_trace_copy(ctx, ev->after) : 0;
    trace_events.ringbuf_output(ev, sizeof(*ev), 0);
}
