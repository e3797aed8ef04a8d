"""Unit tests for lbctl.maglev: ring fill, weighted shares, disruption, determinism, errors."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence

import pytest

from lbctl.maglev import (
    DEFAULT_RING_SIZE,
    MAX_WEIGHT,
    MaglevBackend,
    MaglevError,
    build_ring,
    is_prime,
    ring_fingerprint,
    slot_moves,
    unplaced_backends,
)

SMALL_PRIME_RING_SIZE = 251

# blake2b-128 of rings of random weighted sets, slot by slot by backend name, as the
# slot-by-slot walk of 2026-12-01 (commit 176a8d0) made them.
PINNED_RANDOM_SETS_DIGEST = "9d0809af68f5e972a80064accd2710c5"
PINNED_SMALL_RINGS_DIGEST = "843c068bd48294e9dc30ad5ca1dc0732"


def equal_backends(count: int) -> list[MaglevBackend]:
    return [MaglevBackend(f"10.0.1.{host}:8080") for host in range(1, count + 1)]


def weighted_backends(weights: Sequence[int]) -> list[MaglevBackend]:
    return [
        MaglevBackend(f"10.0.2.{host}:8080", weight) for host, weight in enumerate(weights, start=1)
    ]


def weighted_backends_many(weights: Sequence[int]) -> list[MaglevBackend]:
    return [MaglevBackend(f"10.0.{i // 250}.{i % 250 + 1}:8080", w) for i, w in enumerate(weights)]


def names_per_slot(ring: Sequence[int], backends: Sequence[MaglevBackend]) -> list[str]:
    return [backends[index].name for index in ring]


def moved_fraction(old: list[MaglevBackend], new: list[MaglevBackend]) -> float:
    old_ring = build_ring(old)
    new_ring = build_ring(new)
    moved_slots = slot_moves(old_ring, new_ring, [b.name for b in old], [b.name for b in new])
    return moved_slots / DEFAULT_RING_SIZE


@pytest.mark.parametrize("backend_count", [1, 2, 3, 10, 100])
def test_every_slot_holds_a_valid_backend_index(backend_count: int) -> None:
    backends = equal_backends(backend_count)
    ring = build_ring(backends)
    assert len(ring) == DEFAULT_RING_SIZE
    assert all(0 <= index < backend_count for index in ring)
    assert set(ring) == set(range(backend_count)), "some backend got no slots"


@pytest.mark.parametrize(
    "weights",
    [
        [1, 1, 1],
        [1, 2, 3],
        [3, 2, 1],
        [5, 5, 1],
        [7, 3],
        list(range(1, 11)),
        [100, 1, 50, 1000],
    ],
    ids=str,
)
def test_slot_shares_are_within_one_percent_of_weight_shares(weights: list[int]) -> None:
    backends = weighted_backends(weights)
    slot_counts = Counter(build_ring(backends))
    total_weight = sum(weights)
    for index, weight in enumerate(weights):
        ideal_slots = DEFAULT_RING_SIZE * weight / total_weight
        assert slot_counts[index] == pytest.approx(ideal_slots, rel=0.01), (
            f"backend with weight {weight} got {slot_counts[index]} slots, ideal {ideal_slots:.1f}"
        )


@pytest.mark.parametrize("backend_count", range(3, 11))
def test_removing_one_of_n_backends_moves_about_one_nth_of_slots(backend_count: int) -> None:
    backends = equal_backends(backend_count)
    for removed in range(backend_count):
        remaining = backends[:removed] + backends[removed + 1 :]
        fraction = moved_fraction(backends, remaining)
        # The removed backend's own ~1/N must move; Maglev's extra churn should stay small.
        assert 1 / backend_count - 0.01 <= fraction <= 1 / backend_count + 0.03, (
            f"removing {backends[removed].name} of {backend_count} moved {fraction:.3f}"
        )


@pytest.mark.parametrize("backend_count", range(3, 11))
def test_adding_a_backend_moves_about_its_new_share(backend_count: int) -> None:
    backends = equal_backends(backend_count)
    grown = backends + [MaglevBackend("10.0.9.9:8080")]
    fraction = moved_fraction(backends, grown)
    new_share = 1 / (backend_count + 1)
    assert new_share - 0.01 <= fraction <= new_share + 0.03


def test_raising_one_weight_moves_only_about_the_share_it_gains() -> None:
    backends = equal_backends(5)
    reweighted = backends[:4] + [MaglevBackend(backends[4].name, 2)]
    share_gained = 2 / 6 - 1 / 5
    assert moved_fraction(backends, reweighted) <= share_gained + 0.03


def test_same_input_gives_the_same_ring() -> None:
    backends = weighted_backends([1, 2, 3, 4])
    assert build_ring(backends) == build_ring(list(backends))


def test_input_order_does_not_change_which_backend_owns_a_slot() -> None:
    backends = weighted_backends([1, 2, 3, 4, 5, 1, 1])
    reference_names = names_per_slot(build_ring(backends, seed=7), backends)
    shuffler = random.Random(20240601)
    for _ in range(3):
        shuffled = list(backends)
        shuffler.shuffle(shuffled)
        assert names_per_slot(build_ring(shuffled, seed=7), shuffled) == reference_names


def test_ring_is_the_same_in_another_process_with_another_hash_seed() -> None:
    backends = weighted_backends([1, 2, 3])
    script = (
        "from lbctl.maglev import MaglevBackend, build_ring\n"
        f"print(build_ring({backends!r}, 251, seed=3))\n"
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # A different PYTHONHASHSEED changes hash(str); the ring must not notice.
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=repo_root)
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == str(build_ring(backends, 251, seed=3))


def test_ring_matches_the_pinned_layout() -> None:
    # Pinned so an accidental algorithm change, which would remap every flow on upgrade
    # and make mixed-version control planes disagree, fails here instead of in production.
    backends = [
        MaglevBackend("10.0.1.11:8080"),
        MaglevBackend("10.0.1.12:8080", 2),
        MaglevBackend("10.0.1.13:8080", 3),
    ]
    assert build_ring(backends, 13) == [2, 2, 2, 2, 1, 2, 0, 2, 0, 2, 1, 1, 1]
    assert build_ring(backends)[:16] == [2, 0, 2, 2, 2, 0, 2, 2, 0, 0, 2, 2, 1, 1, 1, 2]


def test_a_different_seed_gives_a_different_ring() -> None:
    backends = equal_backends(3)
    moved_slots = slot_moves(
        build_ring(backends, seed=0),
        build_ring(backends, seed=1),
        [b.name for b in backends],
        [b.name for b in backends],
    )
    # Independent rings over 3 equal backends disagree on about 2/3 of slots.
    assert moved_slots > DEFAULT_RING_SIZE / 2


def test_no_backends_gives_a_ring_of_empty_slots() -> None:
    assert build_ring([]) == [-1] * DEFAULT_RING_SIZE
    assert build_ring([], SMALL_PRIME_RING_SIZE) == [-1] * SMALL_PRIME_RING_SIZE


@pytest.mark.parametrize("ring_size", [0, 1, 4, 100, 65536, DEFAULT_RING_SIZE * 3])
def test_non_prime_ring_size_is_refused(ring_size: int) -> None:
    with pytest.raises(MaglevError, match="not prime"):
        build_ring(equal_backends(3), ring_size)


@pytest.mark.parametrize("weight", [0, -1, MAX_WEIGHT + 1])
def test_weight_outside_the_allowed_range_is_refused(weight: int) -> None:
    backends = [MaglevBackend("10.0.1.1:8080"), MaglevBackend("10.0.1.2:8080", weight)]
    with pytest.raises(MaglevError, match="10.0.1.2:8080"):
        build_ring(backends)


def test_max_weight_is_accepted() -> None:
    backends = [MaglevBackend("10.0.1.1:8080"), MaglevBackend("10.0.1.2:8080", MAX_WEIGHT)]
    assert Counter(build_ring(backends))[1] > Counter(build_ring(backends))[0]


def test_duplicate_backend_name_is_refused() -> None:
    backends = [MaglevBackend("10.0.1.1:8080"), MaglevBackend("10.0.1.1:8080", 2)]
    with pytest.raises(MaglevError, match="listed twice"):
        build_ring(backends)


def test_total_weight_above_ring_size_scales_the_weights_to_the_ring() -> None:
    # Weights are relative: 200 backends of weight 1000 share the ring like 200 of weight 1.
    backends = [MaglevBackend(f"10.0.{i // 250}.{i % 250 + 1}:80", MAX_WEIGHT) for i in range(200)]
    slot_counts = Counter(build_ring(backends))
    ideal_slots = DEFAULT_RING_SIZE / 200
    assert len(slot_counts) == 200
    assert all(abs(n - ideal_slots) <= 2 for n in slot_counts.values()), slot_counts


def test_total_weight_above_ring_size_keeps_weights_proportional() -> None:
    weights = [MAX_WEIGHT] * 150 + [500] * 49 + [1]
    backends = weighted_backends_many(weights)
    slot_counts = Counter(build_ring(backends))
    assert sum(slot_counts.values()) == DEFAULT_RING_SIZE
    for index, weight in enumerate(weights):
        ideal_slots = DEFAULT_RING_SIZE * weight / sum(weights)
        assert abs(slot_counts[index] - ideal_slots) <= 1.5, (index, weight, slot_counts[index])


def test_scaling_all_weights_by_a_common_factor_keeps_the_ring() -> None:
    small = weighted_backends([1, 2, 3])
    scaled = weighted_backends([100, 200, 300])
    assert build_ring(small, 13) == build_ring(scaled, 13)
    assert build_ring(small) == build_ring(scaled)


def test_tiny_ring_with_more_weight_than_slots_fills_every_slot() -> None:
    ring = build_ring(weighted_backends([7, 7]), 13)
    assert sorted(Counter(ring).values()) == [6, 7]


def test_backends_without_slots_are_named() -> None:
    backends = weighted_backends([MAX_WEIGHT, MAX_WEIGHT, 1])
    ring = build_ring(backends, 13)
    assert unplaced_backends(backends, ring) == ["10.0.2.3:8080"]
    assert unplaced_backends(backends[:2], build_ring(backends[:2], 13)) == []


def test_maglev_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        build_ring(equal_backends(3), 100)


def test_small_ring_gives_each_backend_its_share_within_one_slot() -> None:
    weights = [1, 2, 3]
    ring = build_ring(weighted_backends(weights), SMALL_PRIME_RING_SIZE)
    slot_counts = Counter(ring)
    assert sum(slot_counts.values()) == SMALL_PRIME_RING_SIZE
    for index, weight in enumerate(weights):
        ideal_slots = SMALL_PRIME_RING_SIZE * weight / sum(weights)
        assert abs(slot_counts[index] - ideal_slots) < 1


def test_tiny_ring_with_as_many_weight_units_as_slots_fills_exactly() -> None:
    ring = build_ring(weighted_backends([6, 4, 3]), 13)
    assert sorted(Counter(ring).values()) == [3, 4, 6]


def test_slot_moves_ignores_renumbering_of_the_same_backends() -> None:
    backends = equal_backends(4)
    reversed_backends = list(reversed(backends))
    assert (
        slot_moves(
            build_ring(backends, SMALL_PRIME_RING_SIZE),
            build_ring(reversed_backends, SMALL_PRIME_RING_SIZE),
            [b.name for b in backends],
            [b.name for b in reversed_backends],
        )
        == 0
    )


def test_slot_moves_counts_every_slot_that_changes_owner() -> None:
    assert slot_moves([0, 0, 1, 1], [0, 1, 1, 0], ["a", "b"], ["a", "b"]) == 2
    assert slot_moves([-1, -1, -1], [0, 0, -1], [], ["a"]) == 2


def test_slot_moves_refuses_rings_of_different_sizes() -> None:
    with pytest.raises(MaglevError):
        slot_moves([0] * 13, [0] * 251, ["a"], ["a"])


def test_is_prime_agrees_with_a_sieve() -> None:
    limit = 5000
    composite = [False] * limit
    for n in range(2, limit):
        if not composite[n]:
            for multiple in range(n * n, limit, n):
                composite[multiple] = True
    sieve_primes = [n for n in range(2, limit) if not composite[n]]
    assert [n for n in range(-5, limit) if is_prime(n)] == sieve_primes
    assert is_prime(DEFAULT_RING_SIZE)
    assert not is_prime(DEFAULT_RING_SIZE - 2)  # 65535 = 3 * 5 * 17 * 257


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_outside_64_bits_is_refused(seed: int) -> None:
    with pytest.raises(MaglevError, match="seed"):
        build_ring(equal_backends(3), seed=seed)


def _random_weighted_sets() -> list[tuple[list[MaglevBackend], int]]:
    """Weighted backend sets of every shape a VIP can have: 1 to 400 backends, weights 1 to
    MAX_WEIGHT (sums past the ring included), a few seeds; fixed by the RNG's own seed."""
    rng = random.Random(20261201)
    sets = []
    for case in range(24):
        count = rng.choice([1, 2, 3, 7, 10, 31, 100, 257, 400])
        top = rng.choice([1, 3, 10, MAX_WEIGHT])
        backends = [MaglevBackend(f"10.{case}.{i // 250}.{i % 250 + 1}:{rng.randint(1, 65535)}",
                                  rng.randint(1, top)) for i in range(count)]
        sets.append((backends, rng.randint(0, 3)))
    return sets


def _ring_digest(sets: list[tuple[list[MaglevBackend], int, int]]) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for backends, ring_size, seed in sets:
        names = [b.name for b in backends]
        digest.update("\n".join(names[i] for i in build_ring(backends, ring_size, seed)).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def test_small_rings_of_random_weighted_sets_match_their_pinned_fingerprint() -> None:
    # Small prime rings, often with more weight than slots: the end of the fill, where the
    # builder searches the free slots instead of walking, is all of such a ring.
    rng = random.Random(1201)
    sets = []
    for case in range(60):
        ring_size = rng.choice([2, 3, 7, 13, 127, 131, 251, 1009])
        backends = [MaglevBackend(f"b{case}-{i}", rng.randint(1, rng.choice([1, 4, MAX_WEIGHT])))
                    for i in range(rng.randint(1, 40))]
        sets.append((backends, ring_size, rng.randint(0, 3)))
    assert _ring_digest(sets) == PINNED_SMALL_RINGS_DIGEST


def test_rings_of_random_weighted_sets_match_their_pinned_fingerprint() -> None:
    # Every node, and every lbctl version, must compute the same ring for the same backends:
    # a faster builder has to reproduce these rings slot for slot (a changed slot remaps
    # flows on upgrade and makes mixed-version nodes disagree). The digest covers each slot's
    # backend NAME, so it also pins the independence from list order.
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for backends, seed in _random_weighted_sets():
        ring = build_ring(backends, DEFAULT_RING_SIZE, seed)
        names = [b.name for b in backends]
        digest.update("\n".join(names[i] for i in ring).encode())
        digest.update(b"\0")
    assert digest.hexdigest() == PINNED_RANDOM_SETS_DIGEST


def test_ring_fingerprint_names_the_backend_per_slot_not_the_order_given():
    names = ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]
    ring = build_ring([MaglevBackend(n) for n in names], SMALL_PRIME_RING_SIZE)
    shuffled = [names[2], names[0], names[1]]
    ring2 = build_ring([MaglevBackend(n) for n in shuffled], SMALL_PRIME_RING_SIZE)
    assert ring != ring2   # other indices ...
    assert ring_fingerprint(ring, names) == ring_fingerprint(ring2, shuffled)   # ... same ring
    moved = list(ring)
    moved[0] = (moved[0] + 1) % 3
    assert ring_fingerprint(moved, names) != ring_fingerprint(ring, names)
    assert len(ring_fingerprint(ring, names)) == 16
    empty = build_ring([], SMALL_PRIME_RING_SIZE)
    assert ring_fingerprint(empty, []) != ring_fingerprint(ring, names)
