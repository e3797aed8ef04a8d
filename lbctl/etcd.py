"""etcd v3 through etcd's own JSON gateway (/v3/kv/range, /v3/kv/put, /v3/watch, /v3/lease/*
over HTTP): the few calls the cluster needs, with the standard library alone, and the
etcd://HOST:PORT/PREFIX addresses that name one cluster's keys."""
from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lbctl.errors import ConfigError, LbctlError

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/lbctl"
# One call's bound; a watch has none (it waits for the next revision) and is ended by close().
CALL_TIMEOUT_S = 5.0


class EtcdError(LbctlError):
    """etcd answered, with an error (a lease gone, a compacted revision, a refused request)."""

    exit_code = 9


class EtcdUnavailableError(EtcdError):
    """No answer from etcd: refused, timed out, or the connection broke."""

    exit_code = 10


_URL = re.compile(r"^etcd://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?(?P<prefix>/[^\s]*)?$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9._-]+)+$")


@dataclass(frozen=True)
class EtcdUrl:
    """Where one cluster's desired state lives: PREFIX/config holds the document and
    PREFIX/nodes/<name> each node's record."""

    host: str
    port: int
    prefix: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"etcd://{host}:{self.port}{self.prefix}"

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}/nodes/"

    def node_key(self, name: str) -> str:
        return f"{self.nodes_prefix}{name}"


def parse_etcd_url(text: str) -> EtcdUrl:
    """etcd://HOST[:PORT][/PREFIX]; the port defaults to 2379 and the prefix to /lbctl."""
    m = _URL.match(text.strip())
    hint = "e.g. etcd://127.0.0.1:2379/lbctl"
    if not m:
        raise ConfigError(f"malformed etcd address '{text}': expected etcd://HOST:PORT/PREFIX; hint: {hint}")
    port = int(m["port"] or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(f"malformed etcd address '{text}': port {port} is out of range; hint: {hint}")
    prefix = (m["prefix"] or DEFAULT_PREFIX).rstrip("/") or DEFAULT_PREFIX
    if not _PREFIX.match(prefix):
        raise ConfigError(f"malformed etcd address '{text}': prefix '{prefix}' may hold only letters, "
                          f"digits, '.', '_' and '-' between slashes; hint: {hint}")
    return EtcdUrl(m["host"].strip("[]"), port, prefix)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's 'prefix + 1')."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1    # prefixes here end in '/', never 0xff
    return _b64(bytes(raw))


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(base64.b64decode(d["key"]).decode(), base64.b64decode(d.get("value", "")),
                    int(d.get("mod_revision", 0)), int(d.get("create_revision", 0)), int(d.get("lease", 0)))


class EtcdClient:
    """One etcd endpoint. Every call opens its own connection: calls are rare (a push, a
    record every few seconds) and a fresh connection never carries a half-read answer."""

    def __init__(self, url: EtcdUrl, timeout_s: float = CALL_TIMEOUT_S):
        self.url = url
        self.timeout_s = timeout_s

    @property
    def where(self) -> str:
        return f"{self.url.host}:{self.url.port}"

    def _unavailable(self, exc: BaseException) -> EtcdUnavailableError:
        what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return EtcdUnavailableError(f"cannot reach etcd at {self.where}: {what}; hint: is etcd running "
                                    "and listening there (etcd --listen-client-urls)?")

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.url.host, self.url.port, timeout=self.timeout_s)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unavailable(exc) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise EtcdError(f"etcd at {self.where} answered {path} with HTTP {resp.status} and no JSON; "
                            "hint: is that an etcd 3.4+ client URL (not a peer URL)?") from None
        if resp.status != 200 or "error" in data:
            msg = data.get("message") or data.get("error") or f"HTTP {resp.status}"
            raise EtcdError(f"etcd at {self.where} refused {path}: {msg}")
        return data

    # -- keys -------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[KeyValue | None, int]:
        """The key (or None) and the store's revision at the time of the read."""
        data = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return (_kv(kvs[0]) if kvs else None), int(data["header"]["revision"])

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        data = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_kv(d) for d in data.get("kvs") or []], int(data["header"]["revision"])

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Stores the value; returns the revision that holds it."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def put_if_unchanged(self, key: str, value: str | bytes, mod_revision: int) -> int | None:
        """Stores the value only if the key still has `mod_revision` (0: does not exist yet);
        the new revision, or None when someone else wrote it meanwhile."""
        cmp = {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}
        data = self.call("/v3/kv/txn", {"compare": [cmp],
                                        "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}]})
        return int(data["header"]["revision"]) if data.get("succeeded") else None

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)})

    # -- leases -----------------------------------------------------------------------------
    def lease_grant(self, ttl_s: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": str(ttl_s)})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Renews the lease; returns its new TTL in seconds, 0 when it has expired (its keys
        are gone and a new lease must be granted)."""
        data = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", data).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    # -- watching ---------------------------------------------------------------------------
    def watch(self, key: str, start_revision: int) -> Watch:
        return Watch(self, key, start_revision)


class Watch:
    """The stream of changes to one key from a revision on. Iterate it in one thread; close()
    from any thread ends the iteration (the stream itself has no end while etcd runs)."""

    def __init__(self, client: EtcdClient, key: str, start_revision: int):
        self.client = client
        self.key = key
        self.start_revision = start_revision
        self._conn: http.client.HTTPConnection | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> Iterator[KeyValue | None]:
        """Yields the key's new value for each change (None: the key was deleted). Raises
        EtcdUnavailableError when the stream breaks, EtcdError when etcd cancels it (a start
        revision already compacted away: read the key again and watch from there)."""
        c = self.client
        conn = http.client.HTTPConnection(c.url.host, c.url.port, timeout=c.timeout_s)
        self._conn = conn
        body = {"create_request": {"key": _b64(self.key), "start_revision": str(self.start_revision)}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"etcd at {c.where} refused a watch on {self.key}: HTTP {resp.status}")
            assert conn.sock is not None
            conn.sock.settimeout(None)   # a watch waits as long as nothing changes
            while not self._closed.is_set():
                line = resp.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "error" in msg:
                    raise EtcdError(f"etcd at {c.where} ended the watch on {self.key}: "
                                    f"{msg['error'].get('message', msg['error'])}")
                result = msg.get("result", {})
                if result.get("canceled") or int(result.get("compact_revision", 0) or 0):
                    raise EtcdError(f"etcd at {c.where} cancelled the watch on {self.key} from revision "
                                    f"{self.start_revision} (compacted to {result.get('compact_revision')}); "
                                    "hint: read the key again")
                for ev in result.get("events") or []:
                    if ev.get("type") == "DELETE":
                        yield None
                    else:
                        yield _kv(ev["kv"])
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if not self._closed.is_set():
                raise c._unavailable(exc) from None
        finally:
            conn.close()
            self._conn = None
        if not self._closed.is_set():
            raise EtcdUnavailableError(f"etcd at {c.where} closed the watch on {self.key}; hint: it "
                                       "stopped or restarted; the watch is made again")
