"""Per-request backend choice: smooth weighted round robin interleaves, least outstanding
follows load, rendezvous hashing moves only a removed backend's keys, splits hold their ratio."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lbctl.l7.balance import (
    Rotation,
    Route,
    choose_group,
    cookie_value,
    host_of,
    least_outstanding,
    rendezvous,
)


@dataclass
class M:
    name: str
    weight: int = 1
    outstanding: int = 0
    up: bool = True

    def available(self, now: float) -> bool:
        return self.up


def test_round_robin_interleaves_by_weight_and_skips_the_unavailable():
    ms = [M("a", 3), M("b", 2), M("c", 1)]
    r = Rotation()
    assert "".join(r.pick(ms, 0).name for _ in range(6)) == "abacba"   # type: ignore[union-attr]
    ms[0].up = False
    assert Counter(r.pick(ms, 0).name for _ in range(30)) == {"b": 20, "c": 10}  # type: ignore[union-attr]


def test_least_outstanding_prefers_the_least_loaded_per_weight():
    ms = [M("a", 1, outstanding=3), M("b", 2, outstanding=4), M("c", 1, outstanding=1)]
    assert least_outstanding(ms, 0, Rotation()).name == "c"   # type: ignore[union-attr]
    ms[2].outstanding = 5
    assert least_outstanding(ms, 0, Rotation()).name == "b"   # type: ignore[union-attr]


def test_rendezvous_moves_only_the_removed_backends_keys_and_follows_weights():
    ms = [M("a"), M("b"), M("c", 2)]
    keys = [f"user{i}".encode() for i in range(4000)]
    before = {k: rendezvous(ms, 0, k).name for k in keys}   # type: ignore[union-attr]
    share = Counter(before.values())
    assert 0.45 < share["c"] / len(keys) < 0.55
    ms[0].up = False
    after = {k: rendezvous(ms, 0, k).name for k in keys}    # type: ignore[union-attr]
    assert all(after[k] == before[k] for k in keys if before[k] != "a")


def test_split_ratio_is_exact_over_a_cycle():
    route = Route(None, "/", [("stable", 90), ("canary", 10)])
    assert Counter(choose_group(route) for _ in range(1000)) == {"stable": 900, "canary": 100}


def test_route_matching_and_header_helpers():
    r = Route("*.example.com", "/api/", [("g", 1)])
    assert r.matches("shop.example.com", "/api/x") and not r.matches("example.org", "/api/x")
    assert not r.matches("shop.example.com", "/web")
    assert host_of(b"Shop.Example.com:8080") == "shop.example.com" and host_of(b"[::1]:80") == "[::1]"
    assert cookie_value([b"a=1; session=xyz", b"b=2"], "session") == b"xyz"
    assert cookie_value([b"a=1"], "session") is None


@dataclass
class E(M):
    ejected_until: float = 0.0

    def available(self, now: float) -> bool:
        return self.up and now >= self.ejected_until


def test_the_fast_paths_cached_cycle_picks_as_round_robin_does_and_follows_changes():
    ms = [E("a", 3), E("b", 2), E("c", 1)]
    cached, walked = Rotation(), Rotation()
    # The same interleaving as a pass over the members for every request, cycle after cycle.
    assert [cached.next(ms, 0, 0).name for _ in range(18)] == \
        [walked.pick(ms, 0).name for _ in range(18)]  # type: ignore[union-attr]
    # A change the proxy announces (a new generation) is seen at the very next request.
    ms[0].up = False
    assert Counter(cached.next(ms, 0, 1).name for _ in range(30)) == {"b": 20, "c": 10}  # type: ignore[union-attr]
    # An ejection that ends by itself ends the cycle made without that backend.
    ms[0].up = True
    ms[1].ejected_until = 5.0
    assert {cached.next(ms, 1, 2).name for _ in range(8)} == {"a", "c"}  # type: ignore[union-attr]
    assert Counter(cached.next(ms, 6, 2).name for _ in range(60)) == {"a": 30, "b": 20, "c": 10}  # type: ignore[union-attr]
