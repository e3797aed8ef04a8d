"""Lock files under /run that go away with their holder: an exclusive flock on a named file,
removed on release, with the inode re-checked after each acquisition so no two processes ever
hold different files of the same name."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


def acquire(path: str, blocking: bool = True) -> int:
    """Takes the exclusive lock of `path` (creating the file and its directory) and returns the
    open descriptor. Non-blocking: raises BlockingIOError if someone holds it.

    A holder removes the file when it releases (still holding the flock). A process that
    opened the file before that and was waiting gets its flock on the removed inode, which
    nobody else can see any more: while a newcomer creates the file anew and locks that. So
    after every flock the lock is only ours if `path` still names the inode we locked;
    otherwise we open the live file and wait again.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            # Its directory was removed meanwhile (an agent's /run dir goes with it).
            os.makedirs(os.path.dirname(path), exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release(path: str, fd: int) -> None:
    """Removes `path` while still holding its lock, then lets go: waiters on the removed inode
    notice it and move to a new file, so nothing is left behind once the last holder is done."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def held(path: str) -> Iterator[None]:
    """`acquire` (blocking) for the body of a with-statement, `release` after it."""
    fd = acquire(path)
    try:
        yield
    finally:
        release(path, fd)
