"""Prometheus metrics of one balancer instance, read from the pinned maps at each scrape (the
maps are the truth; nothing is cached) plus the agent's health and change counters."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from lbctl import planner
from lbctl.errors import ConfigError
from xdp.limits import Limits
from xdp.maps import LbMaps

DEFAULT_METRICS_ADDR = "127.0.0.1:9810"
PREFIX = "lbctl"


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9810' -> ('127.0.0.1', 9810)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"bad --metrics-addr '{text}': expected ADDR:PORT; hint: e.g. {DEFAULT_METRICS_ADDR}")
    return host.strip("[]"), int(port)


@dataclass
class BackendHealthView:
    """What the agent knows of one backend beyond the maps."""

    health: str                        # up | down | unchecked
    operator_state: str                # the file's state
    check_duration_s: float | None = None
    last_error: str = ""
    checks: int = 0
    failures: int = 0


@dataclass
class AgentView:
    """A snapshot the collector reads; the agent replaces it whole under its lock."""

    config_path: str = ""
    started: float = field(default_factory=time.time)
    backends: dict[tuple[str, str, str], BackendHealthView] = field(default_factory=dict)  # (vip, proto, backend)
    all_failing: dict[tuple[str, str], bool] = field(default_factory=dict)
    plans_applied: int = 0
    ring_changes: int = 0
    slots_moved: int = 0
    reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    last_reload_ok: float = 0.0
    checks_inconclusive: int = 0
    checker_stalls: int = 0


def live_flows(maps: LbMaps, limits: Limits) -> dict[tuple[int, int], int]:
    """(vip_id, backend_id) -> tracked flows not past their state's timeout (one batch read)."""
    timeouts = {"syn": limits.tcp_syn_timeout_s, "established": limits.tcp_established_timeout_s,
                "closing": limits.tcp_closing_timeout_s, "udp": limits.udp_timeout_s}
    now = time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
    out: dict[tuple[int, int], int] = {}
    for rec in maps.flows():
        if now - rec.last_seen_ns <= timeouts.get(rec.state, limits.tcp_established_timeout_s) * 1_000_000_000:
            key = (rec.vip_id, rec.backend_id)
            out[key] = out.get(key, 0) + 1
    return out


class LbCollector(Collector):
    def __init__(self, instance: str, pin_dir: str, limits: Limits, view: Callable[[], AgentView],
                 version: str):
        self.instance = instance
        self.pin_dir = pin_dir
        self.limits = limits
        self.view = view
        self.version = version

    def collect(self) -> Iterator[Any]:
        view = self.view()
        info = InfoMetricFamily(f"{PREFIX}_agent", "The lbctl agent: version, instance, config file")
        info.add_metric([], {"version": self.version, "instance": self.instance, "config": view.config_path})
        yield info
        yield GaugeMetricFamily(f"{PREFIX}_agent_start_time_seconds", "When the agent started (unix time)",
                                value=view.started)
        plans = CounterMetricFamily(f"{PREFIX}_plans_applied", "Plans the agent wrote to the maps")
        plans.add_metric([], view.plans_applied)
        yield plans
        rings = CounterMetricFamily(f"{PREFIX}_ring_changes", "VIP rings replaced (one generation flip each)")
        rings.add_metric([], view.ring_changes)
        yield rings
        slots = CounterMetricFamily(f"{PREFIX}_ring_slots_moved", "Ring slots that changed backend, summed")
        slots.add_metric([], view.slots_moved)
        yield slots
        reloads = CounterMetricFamily(f"{PREFIX}_config_reloads", "Config re-reads (SIGHUP) by result",
                                      labels=["result"])
        for result, n in sorted(view.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads
        inconclusive = CounterMetricFamily(
            f"{PREFIX}_health_checks_inconclusive",
            "Check timeouts not counted because the agent itself ran late (a starved process)")
        inconclusive.add_metric([], view.checks_inconclusive)
        yield inconclusive
        stalls = CounterMetricFamily(f"{PREFIX}_health_checker_stalls",
                                     "Times the checker's event loop ran 100 ms or more late")
        stalls.add_metric([], view.checker_stalls)
        yield stalls
        yield GaugeMetricFamily(f"{PREFIX}_config_last_reload_success_timestamp_seconds",
                                "When the config file was last loaded and applied (unix time)",
                                value=view.last_reload_ok)
        yield from self._maps(view)

    def _maps(self, view: AgentView) -> Iterator[Any]:
        if not os.path.exists(os.path.join(self.pin_dir, "vips")):
            return
        with LbMaps(self.pin_dir, self.limits) as maps:
            live = planner.read_live(maps)
            outcomes = maps.global_counters()
            flows = live_flows(maps, self.limits)
            vip_c = {vip: maps.vip_counters(lv.vip_id) for vip, lv in live.items()}
            be_c = {(vip, name): maps.backend_counters(bid)
                    for vip, lv in live.items() for name, bid in lv.backend_ids.items()}
        g_packets = CounterMetricFamily(f"{PREFIX}_packets", "Packets by outcome", labels=["outcome"])
        g_bytes = CounterMetricFamily(f"{PREFIX}_bytes", "Bytes by outcome", labels=["outcome"])
        for outcome, c in outcomes.items():
            g_packets.add_metric([outcome], c["packets"])
            g_bytes.add_metric([outcome], c["bytes"])
        yield g_packets
        yield g_bytes

        vl = ["vip", "proto"]
        # How each VIP forwards: a DSR VIP's packet and byte counters cover only the client's
        # direction (its replies never reach the balancer), so dashboards must tell them apart.
        v_info = InfoMetricFamily(f"{PREFIX}_vip", "Per VIP: forwarding mode and affinity", labels=vl)
        for vip, lv in sorted(live.items()):
            v_info.add_metric([f"{vip.addr}:{vip.port}", vip.proto],
                              {"forwarding": lv.spec.forwarding, "affinity": lv.spec.affinity})
        yield v_info
        v_fams = {k: CounterMetricFamily(f"{PREFIX}_vip_{k}", f"Per VIP: {k.replace('_', ' ')}", labels=vl)
                  for k in ("packets", "bytes", "new_flows", "drops")}
        v_live = GaugeMetricFamily(f"{PREFIX}_vip_live_flows", "Per VIP: tracked flows not timed out", labels=vl)
        v_backends = GaugeMetricFamily(f"{PREFIX}_vip_backends_in_ring", "Per VIP: backends that take new flows",
                                       labels=vl)
        v_failing = GaugeMetricFamily(f"{PREFIX}_vip_all_backends_failing",
                                      "1 while every checked backend fails and the last healthy set is kept",
                                      labels=vl)
        bl = ["vip", "proto", "backend"]
        b_fams = {k: CounterMetricFamily(f"{PREFIX}_backend_{k}", f"Per backend: {k.replace('_', ' ')}", labels=bl)
                  for k in ("packets", "bytes", "new_flows")}
        b_live = GaugeMetricFamily(f"{PREFIX}_backend_live_flows", "Per backend: tracked flows not timed out",
                                   labels=bl)
        b_weight = GaugeMetricFamily(f"{PREFIX}_backend_weight", "Per backend: weight", labels=bl)
        b_state = GaugeMetricFamily(f"{PREFIX}_backend_state", "Per backend: 1 for its state in the maps",
                                    labels=[*bl, "state"])
        b_up = GaugeMetricFamily(f"{PREFIX}_backend_health_up",
                                 "Per checked backend: 1 when its checks pass (rise/fall applied), else 0",
                                 labels=bl)
        b_lat = GaugeMetricFamily(f"{PREFIX}_backend_check_duration_seconds",
                                  "Per checked backend: duration of the last check", labels=bl)
        b_err = GaugeMetricFamily(f"{PREFIX}_backend_check_last_error",
                                  "Per checked backend: 1 with the last check's error ('' when it passed)",
                                  labels=[*bl, "error"])
        b_fail = CounterMetricFamily(f"{PREFIX}_backend_check_failures", "Per checked backend: failed checks",
                                     labels=bl)
        for vip, lv in sorted(live.items()):
            labels = [str(vip), vip.proto]
            for k, fam in v_fams.items():
                fam.add_metric(labels, vip_c[vip][k])
            v_live.add_metric(labels, sum(n for (vid, _), n in flows.items() if vid == lv.vip_id))
            v_backends.add_metric(labels, sum(1 for b in lv.spec.backends if b.in_ring))
            v_failing.add_metric(labels, 1 if view.all_failing.get((labels[0], vip.proto)) else 0)
            for b in lv.spec.backends:
                bid = lv.backend_ids[b.name]
                bls = [*labels, b.name]
                for k, fam in b_fams.items():
                    fam.add_metric(bls, be_c[(vip, b.name)][k])
                b_live.add_metric(bls, flows.get((lv.vip_id, bid), 0))
                b_weight.add_metric(bls, b.weight)
                for state in ("active", "drain", "down"):
                    b_state.add_metric([*bls, state], 1 if b.state == state else 0)
                hv = view.backends.get((labels[0], vip.proto, b.name))
                if hv is None or hv.health == "unchecked":
                    continue
                b_up.add_metric(bls, 1 if hv.health == "up" else 0)
                if hv.check_duration_s is not None:
                    b_lat.add_metric(bls, hv.check_duration_s)
                b_err.add_metric([*bls, hv.last_error], 1)
                b_fail.add_metric(bls, hv.failures)
        yield from v_fams.values()
        yield from (v_live, v_backends, v_failing)
        yield from b_fams.values()
        yield from (b_live, b_weight, b_state, b_up, b_lat, b_err, b_fail)


class MetricsServer:
    """/metrics on addr:port in a thread of the calling network namespace."""

    def __init__(self, addr: str, collector: LbCollector):
        self.host, self.port = parse_listen(addr)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}; "
                              "hint: choose another --metrics-addr, or stop what listens there") from exc

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
