"""Network namespaces by name, switching only the network namespace (like `ip -n`), so the
host's /sys/fs/bpf and its pins stay visible."""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

NETNS_DIR = "/var/run/netns"     # where `ip netns add` names namespaces
_CLONE_NEWNET = 0x40000000


def enter(name: str) -> None:
    """Moves the calling process's thread into the named network namespace for good (what
    `lbctl -n` does first). setns(2) through libc: pyroute2's import cost a command 0.5 s."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Runs the block with the calling thread in the named network namespace, then returns."""
    from pyroute2 import netns

    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()
