"""The L7 proxy's optional response cache: bounded in bytes, least recently used out first,
for GET/HEAD answers a backend marks cacheable (200 with Cache-Control max-age, not no-store,
private or no-cache, no Set-Cookie, no Vary: *). One per worker; off unless l7.cache.max_bytes."""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass

_MAX_AGE = re.compile(rb"(?:^|,)\s*(?:s-maxage|max-age)\s*=\s*(\d+)")


@dataclass
class Entry:
    headers: list[tuple[bytes, bytes]]   # end-to-end headers, framing removed
    body: bytes
    stored: float
    expires: float

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(n) + len(v) for n, v in self.headers)


def request_may_use(method: str, headers: dict[bytes, list[bytes]]) -> bool:
    if method not in ("GET", "HEAD") or b"authorization" in headers:
        return False
    cc = b",".join(headers.get(b"cache-control", [])).lower()
    return b"no-store" not in cc and b"no-cache" not in cc


def freshness_s(status: int, headers: list[tuple[bytes, bytes]]) -> int:
    """Seconds the answer may be served from the cache; 0 when it must not be stored."""
    if status != 200:
        return 0
    cc = b",".join(v for n, v in headers if n.lower() == b"cache-control").lower()
    if any(word in cc for word in (b"no-store", b"private", b"no-cache")):
        return 0
    if any(n.lower() == b"set-cookie" for n, _ in headers):
        return 0
    if any(n.lower() == b"vary" and v.strip() == b"*" for n, v in headers):
        return 0
    m = _MAX_AGE.search(cc)
    return int(m.group(1)) if m else 0


class ResponseCache:
    def __init__(self, max_bytes: int, max_entry_bytes: int):
        self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
        self.entries: OrderedDict[tuple[str, bytes], Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[str, bytes]) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if time.monotonic() >= entry.expires:
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, bytes], headers: list[tuple[bytes, bytes]], body: bytes,
            fresh_s: int) -> None:
        now = time.monotonic()
        entry = Entry(headers, body, now, now + fresh_s)
        if entry.size > self.max_entry_bytes or entry.size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[str, bytes]) -> None:
        self.bytes -= self.entries.pop(key).size
