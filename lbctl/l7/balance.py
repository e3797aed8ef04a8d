"""Per-request backend choice for the L7 proxy: smooth weighted round robin, least outstanding
requests, weighted rendezvous hashing on a header or cookie, and the route table that maps a
request's host and path to a set of backends (with weighted canary splits between groups)."""
from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Longest cycle Rotation.next keeps (the sum of the live members' weights); past it, each
# request walks the members.
MAX_CYCLE = 4096


class Candidate(Protocol):
    name: str
    weight: int
    outstanding: int

    def available(self, now: float) -> bool: ...


@dataclass
class Rotation:
    """Smooth weighted round robin (the interleaving nginx uses): weights 5,1,1 give
    a a b a c a a, not a a a a a b c, so a burst never lands on one backend. Members that are
    unavailable are skipped without disturbing the others' order."""

    current: dict[str, int] = field(default_factory=dict)
    # One whole cycle of picks, made while the set of available members and their weights
    # hold (the proxy bumps `generation` when they may have changed; `until` is the first
    # moment an ejection ends): a request then takes the next entry instead of a pass over
    # every member. A smooth cycle ends where it started, so the order is the same.
    cycle: Any = None               # an itertools.cycle over the picks, or None
    cycle_generation: int = -1
    cycle_until: float = 0.0

    def next(self, members: Sequence[Candidate], now: float, generation: int) -> Candidate | None:
        cycle = self.cycle
        if cycle is not None and generation == self.cycle_generation and now < self.cycle_until:
            return next(cycle)
        live = [m for m in members if m.available(now)]
        total = sum(m.weight for m in live)
        if not live or total > MAX_CYCLE:
            self.cycle = None
            return self.pick(members, now)
        self.cycle = itertools.cycle([self.pick(live, now) for _ in range(total)])
        self.cycle_generation = generation
        self.cycle_until = min((u for m in members if (u := getattr(m, "ejected_until", 0.0)) > now),
                               default=math.inf)
        return next(self.cycle)

    def pick(self, members: Sequence[Candidate], now: float) -> Candidate | None:
        best: Candidate | None = None
        total = 0
        for m in members:
            if not m.available(now):
                continue
            cur = self.current.get(m.name, 0) + m.weight
            self.current[m.name] = cur
            total += m.weight
            if best is None or cur > self.current[best.name]:
                best = m
        if best is not None:
            self.current[best.name] -= total
        return best


def least_outstanding(members: Sequence[Candidate], now: float, rotation: Rotation) -> Candidate | None:
    """Fewest requests in flight per unit of weight; ties go round robin, so an idle pool does
    not send everything to the first backend."""
    live = [m for m in members if m.available(now)]
    if not live:
        return None
    low = min(m.outstanding / m.weight for m in live)
    return rotation.pick([m for m in live if m.outstanding / m.weight == low], now)


def _unit_hash(key: bytes, name: str) -> float:
    digest = hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest()
    # (0, 1], never 0: log(0) below would be -inf.
    return (int.from_bytes(digest, "big") + 1) / 2.0**64


def rendezvous(members: Sequence[Candidate], now: float, key: bytes) -> Candidate | None:
    """Weighted rendezvous hashing: each key goes to the member with the highest
    -weight/ln(u(key, member)); removing a member moves only the keys it held, and shares
    follow the weights."""
    best, best_score = None, -math.inf
    for m in members:
        if not m.available(now):
            continue
        score = -m.weight / math.log(_unit_hash(key, m.name))
        if score > best_score:
            best, best_score = m, score
    return best


@dataclass
class Route:
    host: str | None
    path_prefix: str
    split: list[tuple[str, int]]                # (group, weight)
    rotation: Rotation = field(default_factory=Rotation)

    def matches(self, host: str, path: str) -> bool:
        if self.host is not None:
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]):
                    return False
            elif host != self.host:
                return False
        return path.startswith(self.path_prefix)


@dataclass
class _Group:
    """A split entry as a Candidate, so a canary split is a weighted rotation like any other."""

    name: str
    weight: int
    outstanding: int = 0

    def available(self, now: float) -> bool:
        return self.weight > 0


def choose_group(route: Route) -> str:
    if len(route.split) == 1:
        return route.split[0][0]
    groups = [_Group(n, w) for n, w in route.split]
    picked = route.rotation.pick(groups, time.monotonic())
    assert picked is not None   # the config refuses a split whose weights add up to 0
    return picked.name


def host_of(host_header: bytes | None) -> str:
    """The Host header without its port, lower case (routes compare host names)."""
    if not host_header:
        return ""
    text = host_header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.split("]")[0] + "]"
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def cookie_value(cookie_headers: list[bytes], name: str) -> bytes | None:
    want = name.encode()
    for header in cookie_headers:
        for part in header.split(b";"):
            k, sep, v = part.strip().partition(b"=")
            if sep and k == want:
                return v
    return None
