/* lb_maps.h: the maps, pinned under LB_PIN_DIR so separate lbctl commands change a running balancer. */
#pragma once

#include "lb_consts.h"
#include "lb_structs.h"

BPF_TABLE_PINNED("hash", struct vip_key, struct vip_meta, vips, LB_MAX_VIPS, LB_PIN_DIR "vips");
BPF_TABLE_PINNED("array", u32, struct backend, backends, LB_MAX_BACKENDS, LB_PIN_DIR "backends");
/* Value: backend id or LB_NO_BACKEND. */
BPF_TABLE_PINNED("array", u32, u32, rings, LB_RING_ENTRIES, LB_PIN_DIR "rings");
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct nat_entry, flows, LB_FLOW_TABLE_SIZE, LB_PIN_DIR "flows");
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct nat_entry, rnat, LB_FLOW_TABLE_SIZE, LB_PIN_DIR "rnat");
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_entry, frags, LB_FRAG_TABLE_SIZE, LB_PIN_DIR "frags");
BPF_TABLE_PINNED("array", u32, struct lb_dp_config, dp_config, 1, LB_PIN_DIR "dp_config");
BPF_TABLE_PINNED("percpu_array", u32, struct lb_counters, stats_vip, LB_MAX_VIPS, LB_PIN_DIR "stats_vip");
BPF_TABLE_PINNED("percpu_array", u32, struct lb_counters, stats_backend, LB_MAX_BACKENDS, LB_PIN_DIR "stats_backend");
BPF_TABLE_PINNED("percpu_array", u32, struct lb_counters, stats_global, LB_OUTCOME_MAX, LB_PIN_DIR "stats_global");
