"""Network namespaces by name, switching only the network namespace (like `ip -n`), so the
host's /sys/fs/bpf and its pins stay visible."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Runs the block with the calling thread in the named network namespace, then returns."""
    from pyroute2 import netns  # noqa: PLC0415

    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()
