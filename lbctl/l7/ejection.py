"""Passive ejection shared by the L7 proxy's worker processes: one small file, mapped by every
worker (and read by `lbctl status` and the metrics), holds per (VIP, backend) slot the
consecutive failures and the time its ejection ends. N consecutive failures then eject a
backend for every worker, whichever workers saw them, and an ejection is counted once."""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time

# Consecutive connect failures or 5xx; ejected until (CLOCK_MONOTONIC seconds: one clock for
# every process on the host). 16 bytes, 8-byte aligned fields: a reader never sees half a field.
SLOT = struct.Struct("=qd")
FAILURES = struct.Struct("=q")
SLOTS = 4096                    # backends across all L7 VIPs; past this a backend ejects per worker
# Slot 0 holds no backend: its first field is a generation that every ejection changes, so a
# worker re-reads the backends' ejection times only after one happened (one read a request).
FIRST_SLOT = 1
TABLE_BYTES = SLOTS * SLOT.size


def create(path: str) -> None:
    """A zeroed table (written whole, then renamed into place: a worker never maps half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(bytes(TABLE_BYTES))
    os.replace(tmp, path)


class EjectionTable:
    def __init__(self, path: str, writable: bool = True):
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.map = mmap.mmap(self.fd, TABLE_BYTES,
                             access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        # The same bytes as 8-byte fields: an index is a fraction of struct's unpack on the
        # path every request takes (slot i: failures at [2i], ejected-until at [2i + 1]).
        self.failures = memoryview(self.map).cast("q")
        self.until = memoryview(self.map).cast("d")

    def generation(self) -> int:
        return self.failures[0]

    def ejected_until(self, slot: int) -> float:
        return self.until[2 * slot + 1]

    def read(self, slot: int) -> tuple[int, float]:
        failures, until = SLOT.unpack_from(self.map, slot * SLOT.size)
        return failures, until

    def succeeded(self, slot: int) -> None:
        # Without the lock: a success racing another worker's failure may drop that one count,
        # which only delays an ejection by a failure; the answer path stays one read.
        if self.failures[2 * slot]:
            self.failures[2 * slot] = 0

    def failed(self, slot: int, threshold: int, cooldown_s: float) -> bool:
        """Counts a failure; True in the one worker whose failure ejects the backend."""
        off = slot * SLOT.size
        # A record lock on this slot's bytes: increments from several workers never get lost.
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SLOT.size, off)
        try:
            failures, until = SLOT.unpack_from(self.map, off)
            now = time.monotonic()
            if failures + 1 >= threshold and now >= until:
                SLOT.pack_into(self.map, off, 0, now + cooldown_s)
                # Unlocked: two ejections at once may write the same next value, which still
                # differs from what every reader last saw.
                self.failures[0] += 1
                return True
            FAILURES.pack_into(self.map, off, failures + 1)
            return False
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT.size, off)

    def reset(self, slot: int) -> None:
        SLOT.pack_into(self.map, slot * SLOT.size, 0, 0.0)

    def close(self) -> None:
        self.failures.release()
        self.until.release()
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
