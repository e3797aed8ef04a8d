"""L7 proxy metrics: each worker process counts in memory and writes its totals to one JSON
file per worker (atomically, once a second and at exit); the agent's Prometheus endpoint sums
the files. Files rather than prometheus_client's multiprocess mode: that mode needs its
environment set before the agent imports prometheus_client and a directory wiped between runs,
while a worker's file is self-describing and removed by the supervisor that started it."""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lbctl.l7.ejection import EjectionTable

# Request latency (head in to response head out), seconds.
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNTERS = {
    "requests": ("lbctl_l7_requests_total", "Requests received by the L7 proxy", ("vip",)),
    "upstream_connects": ("lbctl_l7_upstream_connects_total",
                          "New TCP connections opened to a backend", ("vip", "backend")),
    "upstream_reuses": ("lbctl_l7_upstream_reuses_total",
                        "Requests sent on a pooled keep-alive connection", ("vip", "backend")),
    "ejections": ("lbctl_l7_ejections_total", "Passive ejections of a backend", ("vip", "backend")),
    "cache_hits": ("lbctl_l7_cache_hits_total", "GET/HEAD requests answered from the cache", ("vip",)),
    "cache_misses": ("lbctl_l7_cache_misses_total", "Cacheable requests the cache could not answer",
                     ("vip",)),
    "http2_connections": ("lbctl_l7_http2_connections_total",
                          "Client connections that spoke HTTP/2 (each stream counts as a request)",
                          ("vip",)),
    "retries": ("lbctl_l7_retries_total", "Requests retried on another backend after this one failed",
                ("vip", "backend")),
}


class VipCounts:
    """One VIP's per-request figures as plain numbers the data path adds to directly (a
    counter a request is an attribute increment); Stats.snapshot turns them into rows."""

    __slots__ = ("latency", "latency_sum", "requests", "responses")

    def __init__(self) -> None:
        self.requests = 0
        self.responses: dict[int, int] = {}
        self.latency = [0] * (len(BUCKETS_S) + 1)
        self.latency_sum = 0.0

    def response(self, status: int, seconds: float) -> None:
        r = self.responses
        r[status] = r.get(status, 0) + 1
        self.latency[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.latency_sum += seconds


class BackendCounts:
    __slots__ = ("upstream_reuses",)

    def __init__(self) -> None:
        self.upstream_reuses = 0


class Stats:
    def __init__(self, path: str | None = None):
        self.path = path
        self.counters: dict[str, dict[tuple[str, ...], int]] = defaultdict(lambda: defaultdict(int))
        self.gauges: dict[tuple[str, str], int] = defaultdict(int)
        # Kept for the worker's life (a VIP reloaded away keeps its totals: counters never go back).
        self.vips: dict[str, VipCounts] = {}
        self.backends: dict[tuple[str, str], BackendCounts] = {}

    def vip(self, vip: str) -> VipCounts:
        counts = self.vips.get(vip)
        if counts is None:
            counts = self.vips[vip] = VipCounts()
        return counts

    def backend(self, vip: str, backend: str) -> BackendCounts:
        counts = self.backends.get((vip, backend))
        if counts is None:
            counts = self.backends[(vip, backend)] = BackendCounts()
        return counts

    def count(self, what: str, *labels: str) -> None:
        if what == "requests":
            self.vip(labels[0]).requests += 1
        elif what == "upstream_reuses":
            self.backend(labels[0], labels[1]).upstream_reuses += 1
        else:
            self.counters[what][labels] += 1

    def count_response(self, vip: str, status: int) -> None:
        r = self.vip(vip).responses
        r[status] = r.get(status, 0) + 1

    def gauge_add(self, what: str, vip: str, delta: int) -> None:
        self.gauges[(what, vip)] += delta

    def observe_latency(self, vip: str, seconds: float) -> None:
        counts = self.vip(vip)
        counts.latency[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        counts.latency_sum += seconds

    def snapshot(self) -> dict[str, Any]:
        counters = {k: [[list(lab), n] for lab, n in v.items()] for k, v in self.counters.items()}
        counters["requests"] = [[[vip], c.requests] for vip, c in self.vips.items() if c.requests]
        counters["upstream_reuses"] = [[[vip, b], c.upstream_reuses]
                                       for (vip, b), c in self.backends.items() if c.upstream_reuses]
        return {
            "pid": os.getpid(), "written": time.time(),
            "counters": counters,
            "responses": [[vip, str(code), n] for vip, c in self.vips.items()
                          for code, n in c.responses.items()],
            "gauges": [[what, vip, n] for (what, vip), n in self.gauges.items()],
            "latency": {vip: [c.latency, c.latency_sum] for vip, c in self.vips.items()
                        if c.latency_sum or any(c.latency)},
        }

    def write(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, self.path)


def read_all(stats_dir: str) -> list[dict[str, Any]]:
    out = []
    try:
        names = sorted(os.listdir(stats_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("worker-") and name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError), open(os.path.join(stats_dir, name)) as f:
                out.append(json.load(f))
    return out


def totals(stats_dir: str) -> dict[str, Any]:
    """All workers' figures summed: {'requests': {(vip,): n}, 'responses': {(vip, code): n}, ...}."""
    summed: dict[str, Any] = defaultdict(lambda: defaultdict(int))
    latency: dict[str, list[float]] = {}
    for snap in read_all(stats_dir):
        for what, rows in snap.get("counters", {}).items():
            for labels, n in rows:
                summed[what][tuple(labels)] += n
        for vip, code, n in snap.get("responses", []):
            summed["responses"][(vip, code)] += n
        for what, vip, n in snap.get("gauges", []):
            summed[what][(vip,)] += n
        for vip, (buckets, total) in snap.get("latency", {}).items():
            acc = latency.setdefault(vip, [0.0] * (len(BUCKETS_S) + 2))
            for i, n in enumerate(buckets):
                acc[i] += n
            acc[-1] += total
    summed["latency"] = latency
    return summed


def backend_rows(run_dir: str) -> list[dict[str, Any]]:
    """Each L7 backend as the proxy sees it, for `lbctl status` and the metrics: the file's
    weight and state, the agent's health, the ejection shared by the workers (seconds left,
    consecutive failures) and the workers' counters summed. [] when no proxy runs here."""
    try:
        with open(os.path.join(run_dir, "l7-spec.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return []
    t = totals(os.path.join(run_dir, "l7-stats"))
    table = None
    with contextlib.suppress(OSError, ValueError):
        table = EjectionTable(spec.get("ejection_table", ""), writable=False)
    now = time.monotonic()
    rows = []
    try:
        for v in spec.get("vips", []):
            for b in v["backends"]:
                slot = b.get("eject_slot")
                failures, until = table.read(slot) if table is not None and slot is not None else (0, 0.0)
                key = (v["vip"], b["name"])
                rows.append({
                    "vip": v["vip"], "backend": b["name"], "weight": b["weight"], "state": b["state"],
                    "health": "up" if b["up"] else "down",
                    "ejected_s": round(max(0.0, until - now), 1), "failures": failures,
                    "ejections": t.get("ejections", {}).get(key, 0),
                    "retries": t.get("retries", {}).get(key, 0),
                    "upstream_connects": t.get("upstream_connects", {}).get(key, 0),
                    "upstream_reuses": t.get("upstream_reuses", {}).get(key, 0)})
    finally:
        if table is not None:
            table.close()
    return rows


class L7Collector:
    """A prometheus_client collector over the workers' files (registered by the agent)."""

    def __init__(self, stats_dir: str):
        self.stats_dir = stats_dir

    def collect(self) -> Iterator[Any]:
        t = totals(self.stats_dir)
        for key, (name, doc, labels) in COUNTERS.items():
            fam = CounterMetricFamily(name, doc, labels=list(labels))
            for lab, n in sorted(t.get(key, {}).items()):
                fam.add_metric(list(lab), n)
            yield fam
        fam = CounterMetricFamily("lbctl_l7_responses_total", "Responses sent, by status code",
                                  labels=["vip", "code"])
        for lab, n in sorted(t.get("responses", {}).items()):
            fam.add_metric(list(lab), n)
        yield fam
        gauge = GaugeMetricFamily("lbctl_l7_client_connections", "Open client connections",
                                  labels=["vip"])
        for lab, n in sorted(t.get("client_connections", {}).items()):
            gauge.add_metric(list(lab), n)
        yield gauge
        ejected = GaugeMetricFamily("lbctl_l7_backend_ejected",
                                    "1 while passive ejection keeps a backend out (for every worker)",
                                    labels=["vip", "backend"])
        for row in backend_rows(os.path.dirname(self.stats_dir)):
            ejected.add_metric([row["vip"], row["backend"]], 1 if row["ejected_s"] > 0 else 0)
        yield ejected
        hist = HistogramMetricFamily("lbctl_l7_request_duration_seconds",
                                     "From a request's head in to its response head out",
                                     labels=["vip"])
        for vip, acc in sorted(t["latency"].items()):
            cumulative, buckets = 0.0, []
            for bound, n in zip((*BUCKETS_S, float("inf")), acc[:-1]):
                cumulative += n
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            hist.add_metric([vip], buckets, acc[-1])
        yield hist
