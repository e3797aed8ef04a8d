"""Weighted Maglev consistent hashing (Eisenbud et al., NSDI'16): backends -> lookup ring."""

from __future__ import annotations

import hashlib
import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from xdp.limits import DEFAULT_LIMITS

# The data plane's ring size (xdp/limits.py says why 65537): a ring built here must fill
# exactly the slots the program indexes.
DEFAULT_RING_SIZE = DEFAULT_LIMITS.ring_size

# Caps the weight so exact turn keys stay distinct as floats (see _turn_order). Weights are
# relative: when their sum exceeds the ring size the ring fills within one round of turns and
# each backend still gets its share within about one slot.
MAX_WEIGHT = 1000

# The fill's last _TAIL_SLOTS slots are found by a search over the free slots instead of by
# walking: there a walk tries hundreds of taken slots per turn, more than the search costs.
_TAIL_SLOTS = 128

# The slot value for "no backend", seen only when the ring is built from no backends.
EMPTY_SLOT = -1

# The seed goes into the blake2b key, which holds at most 64 bytes; 8 are plenty for an
# operator-chosen salt and keep the encoding fixed-width (so seeds 1 and 256 differ).
_SEED_BYTES = 8


class MaglevError(ValueError):
    """Inputs no ring can be built from: a non-prime size, a bad weight, a repeated name."""


@dataclass(frozen=True)
class MaglevBackend:
    """One ring member: `name` fixes its slot preferences, `weight` its share of slots."""

    name: str  # stable identity, e.g. "10.0.1.11:8080"; the permutation derives from it
    weight: int = 1


def is_prime(n: int) -> bool:
    """True if n is a prime number (trial division; ring sizes are small)."""
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0 or n % 3 == 0:
        return False
    # Every prime above 3 is 6k +/- 1, so only those divisors need trying.
    divisor = 5
    while divisor * divisor <= n:
        if n % divisor == 0 or n % (divisor + 2) == 0:
            return False
        divisor += 6
    return True


def _check_inputs(backends: Sequence[MaglevBackend], ring_size: int, seed: int) -> None:
    """Raise MaglevError naming the first input that cannot make a ring."""
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or not is_prime(ring_size):
        raise MaglevError(
            f"ring size {ring_size!r} is not prime; Maglev needs a prime size so every skip "
            f"walks all slots (try {DEFAULT_RING_SIZE})"
        )
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int)
        or not 0 <= seed < 2 ** (8 * _SEED_BYTES)
    ):
        raise MaglevError(f"seed {seed!r} must be an integer in [0, 2**{8 * _SEED_BYTES})")
    seen_names: set[str] = set()
    for backend in backends:
        weight = backend.weight
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise MaglevError(
                f"backend {backend.name!r} has weight {weight!r}; weights are integers "
                f"from 1 to {MAX_WEIGHT} (remove the backend instead of giving it weight 0)"
            )
        if backend.name in seen_names:
            raise MaglevError(f"backend {backend.name!r} is listed twice; names must be unique")
        seen_names.add(backend.name)


def _offset_and_skip(name: str, ring_size: int, seed_key: bytes) -> tuple[int, int]:
    """The backend's permutation, slot(j) = (offset + j * skip) % ring_size, from its name.

    blake2b rather than hash(): the ring must come out the same in every process and on
    every host, and hash() of a str is randomised per process.
    """
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed_key).digest()
    offset = int.from_bytes(digest[:8], "little") % ring_size
    # skip in [1, ring_size - 1]: with a prime ring size it is coprime to the size, so the
    # walk visits every slot before repeating.
    skip = int.from_bytes(digest[8:], "little") % (ring_size - 1) + 1
    return offset, skip


def _turn_order(backends: Sequence[MaglevBackend], ring_size: int) -> list[int]:
    """One round of turns: backend i appears weight_i times, its turns spread evenly.

    Each turn claims exactly one slot, so a backend's slot count equals its turn count.
    Whole rounds give exact weight proportions; only the last, partial round is uneven.
    Spreading each backend's turns over the round (turn k of a weight-w backend sits at
    (k + 1/2) / w) makes any prefix of a round hold about its fair part of every backend's
    turns, so the partial round costs each backend at most about one slot, not `weight`.
    That is also what scales weights to the ring: when the weights sum to more than the
    ring has slots, the ring fills within the first round, and each backend's turns in that
    prefix are its weight times the fraction of the round used, rounded.
    Ordering by name, not by list position, is what makes the ring independent of the
    order the caller lists backends in.
    """
    # Weights sharing a factor give the same sequence (each round of the divided weights is
    # a stretch of the undivided round), so divide it out: 200 backends of weight 1000 cost
    # 200 turns, not 200,000.
    divisor = math.gcd(*(backend.weight for backend in backends))
    weights = [backend.weight // divisor for backend in backends]
    total_weight = sum(weights)
    # A round longer than the ring is only walked up to slot ring_size. Keys up to
    # (ring_size + n/2) / total_weight are enough: at that point every backend has at least
    # weight * x - 1/2 turns, ring_size in all. Integers keep the bound exact.
    bound_numerator = 2 * ring_size + len(backends)
    turn_keys: list[tuple[float, str, int]] = []
    for index, (backend, weight) in enumerate(zip(backends, weights)):
        turns = weight
        if total_weight > ring_size:
            # (2k + 1) / (2 weight) <= bound_numerator / (2 total_weight)
            turns = min(weight, (weight * bound_numerator // total_weight + 1) // 2)
        for turn in range(turns):
            # Exact rationals with denominators <= 2 * MAX_WEIGHT are distinct by more than
            # float rounding, and IEEE division is correctly rounded, so these floats order
            # identically on every machine; equal fractions tie-break on the name.
            turn_keys.append(((2 * turn + 1) / (2 * weight), backend.name, index))
    turn_keys.sort()
    return [index for _, _, index in turn_keys]


def build_ring(
    backends: Sequence[MaglevBackend], ring_size: int = DEFAULT_RING_SIZE, seed: int = 0
) -> list[int]:
    """Build the Maglev lookup ring: each slot holds an index into `backends`.

    The backend NAME in each slot depends only on the set of (name, weight) pairs, the
    ring size and the seed, never on the order of `backends`. With no backends every slot
    is EMPTY_SLOT (-1). Weights are relative, whatever their sum; a backend whose share
    rounds to no slot gets none (see unplaced_backends). Raises MaglevError on a non-prime
    ring size, a weight outside 1..MAX_WEIGHT, or a repeated name.
    """
    _check_inputs(backends, ring_size, seed)
    ring: list[int] = [EMPTY_SLOT] * ring_size
    if not backends:
        return ring

    seed_key = seed.to_bytes(_SEED_BYTES, "little")
    # next_slot[i] is the next slot backend i would try: its permutation entry for the
    # current j, kept as a running position so the hot loop adds instead of multiplying.
    # Every slot backend i's walk passed before next_slot[i] is taken, and stays taken.
    next_slot: list[int] = []
    skips: list[int] = []
    for backend in backends:
        offset, skip = _offset_and_skip(backend.name, ring_size, seed_key)
        next_slot.append(offset)
        skips.append(skip)

    turns = itertools.cycle(_turn_order(backends, ring_size))
    taken = bytearray(ring_size)
    slots_left = ring_size
    # The walk tries about ring_size / slots_left slots per turn, so most of its probes fall
    # at the very end (100 backends, 65537 slots: 348,000 of 576,000 in the last 1%). Until then, slot by slot: locals only, and a conditional subtract instead of %.
    tail_from = min(_TAIL_SLOTS, ring_size)
    if slots_left > tail_from:
        for index in turns:
            slot = next_slot[index]
            skip = skips[index]
            while taken[slot]:
                slot += skip
                if slot >= ring_size:
                    slot -= ring_size
            taken[slot] = 1
            ring[slot] = index
            slot += skip
            next_slot[index] = slot - ring_size if slot >= ring_size else slot
            slots_left -= 1
            if slots_left == tail_from:
                break

    # The tail: backend i's walk reaches slot s after (s - next_slot[i]) / skip_i steps
    # (mod ring_size; skip_i is invertible as ring_size is prime), so the first free slot it
    # would find is the free slot with the fewest steps: one pass over the few free slots
    # instead of hundreds of probes. Same slot as the walk, so the same ring.
    free: list[int] = []
    slot = taken.find(0)
    while slot != -1:
        free.append(slot)
        slot = taken.find(0, slot + 1)
    inverse_skips: dict[int, int] = {}
    for index in turns:
        inverse = inverse_skips.get(index)
        if inverse is None:
            inverse = inverse_skips[index] = pow(skips[index], -1, ring_size)
        start = next_slot[index]
        slot = min(free, key=lambda s, start=start, inverse=inverse: (s - start) * inverse % ring_size)
        free.remove(slot)
        ring[slot] = index
        slot += skips[index]
        next_slot[index] = slot - ring_size if slot >= ring_size else slot
        slots_left -= 1
        if not slots_left:
            return ring
    raise AssertionError("unreachable: the turns cycle forever")


def slot_moves(
    old: Sequence[int], new: Sequence[int], old_names: Sequence[str], new_names: Sequence[str]
) -> int:
    """How many slots point at a different backend NAME after a change.

    `old` indexes `old_names` and `new` indexes `new_names`; indices alone cannot be
    compared because adding or removing a backend renumbers the list. An empty slot (-1)
    counts as a move when the other ring has a backend there.
    """
    if len(old) != len(new):
        raise MaglevError(
            f"cannot compare rings of different sizes ({len(old)} and {len(new)} slots)"
        )

    def slot_names(ring: Sequence[int], names: Sequence[str]) -> list[str | None]:
        return [names[index] if index != EMPTY_SLOT else None for index in ring]

    return sum(
        1
        for old_name, new_name in zip(slot_names(old, old_names), slot_names(new, new_names))
        if old_name != new_name
    )


def unplaced_backends(backends: Sequence[MaglevBackend], ring: Sequence[int]) -> list[str]:
    """Names of backends that own no slot of `ring`: their share of the total weight rounds
    to zero slots, so they receive no new connections."""
    placed = set(ring)
    return [b.name for index, b in enumerate(backends) if index not in placed]


def ring_fingerprint(slots: Sequence[int], names: Sequence[str]) -> str:
    """A short digest of a ring as backend NAMES per slot: `slots[i]` indexes `names` (EMPTY_SLOT:
    no backend). Two nodes whose rings send every slot to the same backend show the same
    fingerprint whatever order or ids they hold their backends by, so a mismatch between
    nodes (another weight, a backend missing, another seed) is visible at a glance.

    The one function for it: `lbctl status`, `lbctl cluster status` and the node records in
    etcd all show this value."""
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        raise MaglevError("cannot fingerprint a ring whose backend names repeat")
    rank_of = {name: rank for rank, name in enumerate(ordered)}
    # Index -1 (EMPTY_SLOT) lands on the last entry: a value no rank can take.
    ranks = [rank_of[name] for name in names] + [0xFFFFFFFF]
    digest = hashlib.blake2b(digest_size=8)
    digest.update("\n".join(ordered).encode())
    digest.update(b"\0")
    digest.update(array("I", map(ranks.__getitem__, slots)).tobytes())
    return digest.hexdigest()
