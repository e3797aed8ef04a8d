/* lb_maps6.h: the IPv6 maps, pinned beside the IPv4 ones; backends, rings and stats are
 * shared (one id space for VIPs and backends of both families). */
#pragma once

#include "lb_consts.h"
#include "lb_structs.h"
#include "lb_maps.h"

BPF_TABLE_PINNED("hash", struct vip_key6, struct vip_meta, vips6, LB_MAX_VIPS, LB_PIN_DIR "vips6");
BPF_TABLE_PINNED("lru_hash", struct flow_key6, struct nat_entry6, flows6, LB_FLOW_TABLE_SIZE, LB_PIN_DIR "flows6");
BPF_TABLE_PINNED("lru_hash", struct flow_key6, struct nat_entry6, rnat6, LB_FLOW_TABLE_SIZE, LB_PIN_DIR "rnat6");
BPF_TABLE_PINNED("lru_hash", struct frag_key6, struct frag_entry6, frags6, LB_FRAG_TABLE_SIZE, LB_PIN_DIR "frags6");
