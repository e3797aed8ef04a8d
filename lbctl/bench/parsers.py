"""Reading what the tools print (wrk, iperf3, the generator's counters) into figures, and
the median and spread of repeated figures. Pure: fed the tools' real output in the unit tests."""
from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lbctl.bench.errors import BenchError
from lbctl.bench.spec import GENERATOR_BOUND_SHARE

# wrk calls done() once at the end; the JSON line it prints is what the harness reads.
# With BENCH_WRK_ADDRS="a:p,b:p,..." each wrk thread connects to the next address in turn:
# the direct runs spread one wrk (same threads, same connections) over the backends.
WRK_LUA = r"""
local addrs = nil
local threads = 0
setup = function(thread)
  local spec = os.getenv("BENCH_WRK_ADDRS")
  if spec == nil or spec == "" then return end
  if addrs == nil then
    addrs = {}
    for host, port in string.gmatch(spec, "([^,:]+):(%d+)") do
      table.insert(addrs, wrk.lookup(host, port)[1])
    end
  end
  thread.addr = addrs[(threads % #addrs) + 1]
  threads = threads + 1
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, " ..
    "\"errors\": {\"connect\": %d, \"read\": %d, \"write\": %d, \"status\": %d, " ..
    "\"timeout\": %d}, \"p50_us\": %d, \"p99_us\": %d, \"mean_us\": %.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: requests completed over duration_s, latency percentiles, error counts."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_share(self) -> float:
        total = self.requests + self.errors
        return self.errors / total if total else 1.0


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_WRK_TEXT_RE = {
    "requests": re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.MULTILINE),
    "p50": re.compile(r"^\s*50%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE),
    "p99": re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE),
    "socket": re.compile(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
    "non2xx": re.compile(r"Non-2xx or 3xx responses: (\d+)"),
}


def parse_wrk(text: str) -> WrkResult:
    """Read wrk's output: the WRKJSON line of WRK_LUA if present, else wrk's own text
    (which needs --latency for the percentiles). Raises BenchError if neither is there."""
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1e3,
                p99_ms=data["p99_us"] / 1e3,
                errors=sum(int(v) for v in data["errors"].values()),
            )
    found = {k: r.search(text) for k, r in _WRK_TEXT_RE.items()}
    if not (found["requests"] and found["p50"] and found["p99"]):
        raise BenchError(f"cannot read wrk's output: {text.strip()[-300:]!r}")
    req = found["requests"]
    errors = 0
    if found["socket"]:
        errors += sum(int(g) for g in found["socket"].groups())
    if found["non2xx"]:
        errors += int(found["non2xx"].group(1))
    return WrkResult(
        requests=int(req.group(1)),
        duration_s=float(req.group(2)) * _UNIT_MS[req.group(3)] / 1e3,
        p50_ms=float(found["p50"].group(1)) * _UNIT_MS[found["p50"].group(2)],
        p99_ms=float(found["p99"].group(1)) * _UNIT_MS[found["p99"].group(2)],
        errors=errors,
    )


def parse_iperf3(text: str) -> dict[str, float]:
    """iperf3 -J output -> the receiver's bits/s and the sender's retransmits."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"cannot read iperf3's JSON output: {exc}: {text.strip()[-300:]!r}") \
            from exc
    if data.get("error"):
        raise BenchError(f"iperf3 failed: {data['error']}")
    try:
        end = data["end"]
        received = end["sum_received"]
        return {
            "bits_per_second": float(received["bits_per_second"]),
            "seconds": float(received["seconds"]),
            "retransmits": float(end.get("sum_sent", {}).get("retransmits", 0)),
        }
    except (KeyError, TypeError) as exc:
        raise BenchError(f"iperf3's JSON output lacks end.sum_received: {exc}") from exc


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements: spread_pct is (max - min) / median."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "spread_pct": None,
                "values": []}
    med = statistics.median(vals)
    return {
        "n": len(vals),
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "spread_pct": (max(vals) - min(vals)) / med * 100 if med else None,
        "values": vals,
    }


@dataclass(frozen=True)
class PpsVerdict:
    """One packet-rate run: what the generator offered and what got past the balancer."""

    sent: int
    forwarded: int
    seconds: float
    balancer_cpu_s: float | None = None

    @property
    def sent_pps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def forwarded_pps(self) -> float:
        return self.forwarded / self.seconds if self.seconds > 0 else 0.0

    @property
    def drop_share(self) -> float:
        return 1.0 - self.forwarded / self.sent if self.sent else 0.0

    @property
    def generator_bound(self) -> bool:
        """The balancer forwarded (nearly) all it was offered: it may do more than this."""
        return self.sent > 0 and self.forwarded >= GENERATOR_BOUND_SHARE * self.sent

    @property
    def cpu_s_per_mpkt(self) -> float | None:
        if self.balancer_cpu_s is None or self.forwarded <= 0:
            return None
        return self.balancer_cpu_s / (self.forwarded / 1e6)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "sent_pps": self.sent_pps,
            "forwarded_pps": self.forwarded_pps,
            "drop_share": self.drop_share,
            "generator_bound": self.generator_bound,
            "cpu_s_per_mpkt": self.cpu_s_per_mpkt,
        }


# The client's TCP counters a short-connection run must leave (almost) alone: a SYN resent
# is a connection that waited a second (the first retransmission timeout), a reset one the
# client refused. Both pointed at the bench's own faults twice (PAWS on reused 4-tuples,
# conntrack on ports shared by two VIP ports: runner.PeerBench._client_ports).
TCP_COUNTERS = {"syn_resent": ("TcpExt", "TCPSynRetrans"), "client_resets": ("Tcp", "OutRsts")}


def parse_tcp_counters(text: str) -> dict[str, int]:
    """The TCP_COUNTERS from /proc/net/netstat and /proc/net/snmp read together: each group is
    a line of names and a line of values, both starting with the group ('TcpExt:')."""
    rows: dict[str, dict[str, str]] = {}
    pending: dict[str, list[str]] = {}
    for line in text.splitlines():
        group, _, rest = line.partition(":")
        fields = rest.split()
        if not group or not fields:
            continue
        if group in pending:
            rows[group] = dict(zip(pending.pop(group), fields))
        else:
            pending[group] = fields
    out = {}
    for name, (group, field) in TCP_COUNTERS.items():
        try:
            out[name] = int(rows[group][field])
        except (KeyError, ValueError):
            raise BenchError(f"no {group} {field} counter in /proc/net/netstat or snmp; "
                             "hint: the kernel must have TCP's MIB counters") from None
    return out
