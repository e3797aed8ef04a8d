"""One desired state for many nodes, in etcd: `cluster push` stores a validated document as a
new revision, each agent follows the key and publishes a record of itself under a lease, and
`cluster status` reads every record. Keys: PREFIX/config (the YAML document, as a file holds
it) and PREFIX/nodes/<name> (JSON)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbctl.config import DesiredState, interface_here, load_text
from lbctl.errors import ConfigError
from lbctl.etcd import EtcdClient, EtcdError, EtcdUnavailableError, EtcdUrl, KeyValue

log = logging.getLogger("lbctl.agent")

# A node's record lives as long as its lease: a node that stops renewing (killed, cut off from
# etcd) drops out of `cluster status` this long after its last renewal.
NODE_TTL_S = 10
PUBLISH_INTERVAL_S = 2.0
# Retrying an unreachable etcd: the wait doubles from the first to the last value.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_node_name(name: str) -> str:
    """A node's name is a key segment: letters, digits, '.', '_' and '-'."""
    if not _NODE_NAME.match(name):
        raise ConfigError(f"bad node name '{name}': use up to 63 letters, digits, '.', '_' or '-'; hint: "
                          "--node-name lb1")
    return name


def revision_source(url: EtcdUrl, revision: int) -> str:
    """How a stored document names itself in errors, in place of a file name."""
    return f"{url.config_key}@{revision}"


# -- pushing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushResult:
    url: str
    revision: int            # the revision that holds the document now
    previous: int            # the one it replaced (0: none)
    vips: int
    unchanged: bool          # the same text was stored already: nothing written


def push(url: EtcdUrl, path: str) -> PushResult:
    """Validates FILE as the agent will (interfaces are checked by each node, where they
    exist) and stores it as the next revision. A broken file raises ConfigError before
    etcd is even asked."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}; hint: check the path "
                          "and its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); hint: a YAML config file is text") from None
    state = load_text(text, path)
    client = EtcdClient(url)
    current, _ = client.get(url.config_key)
    if current is not None and current.value == text.encode():
        return PushResult(str(url), current.mod_revision, current.mod_revision, len(state.vips), True)
    previous = current.mod_revision if current is not None else 0
    revision = client.put_if_unchanged(url.config_key, text, previous)
    if revision is None:
        raise EtcdError(f"{url.config_key} changed while this push was validating (someone else pushed); "
                        "hint: run 'lbctl cluster status' and push again")
    return PushResult(str(url), revision, previous, len(state.vips), False)


# -- status ----------------------------------------------------------------------------------
def status(url: EtcdUrl) -> dict[str, Any]:
    """The latest revision and every node's record, with what a reader compares: is it on
    the latest revision, do its rings match the others'."""
    client = EtcdClient(url)
    doc, _ = client.get(url.config_key)
    records, _ = client.get_prefix(url.nodes_prefix)
    latest = doc.mod_revision if doc is not None else 0
    nodes = []
    now = time.time()
    for kv in records:
        try:
            rec = json.loads(kv.value)
        except ValueError:
            rec = {"error": "the record is not JSON"}
        name = kv.key[len(url.nodes_prefix):]
        rec["name"] = name
        rec["current"] = rec.get("applied_revision") == latest and latest > 0
        updated = rec.get("updated")
        rec["last_seen_s"] = round(max(0.0, now - updated), 1) if isinstance(updated, (int, float)) else None
        nodes.append(rec)
    # Per VIP, the fingerprint most nodes show; a node showing another one is flagged.
    by_vip: dict[str, dict[str, int]] = {}
    for rec in nodes:
        for vip, fp in (rec.get("rings") or {}).items():
            by_vip.setdefault(vip, {}).setdefault(fp, 0)
            by_vip[vip][fp] += 1
    common = {vip: max(counts, key=lambda fp: (counts[fp], fp)) for vip, counts in by_vip.items()}
    for rec in nodes:
        rec["ring_mismatch"] = sorted(vip for vip, fp in (rec.get("rings") or {}).items() if fp != common[vip])
    return {"url": str(url), "latest_revision": latest, "nodes": nodes}


def health_summary(rec: dict[str, Any]) -> str:
    """'5/6 up' over every VIP's backends; 'ALL FAILING' named when a VIP has none up."""
    health = rec.get("health") or {}
    up = sum(v.get("up", 0) for v in health.values())
    total = sum(v.get("total", 0) for v in health.values())
    failing = [vip for vip, v in health.items() if v.get("all_failing")]
    text = f"{up}/{total} up"
    return text + (f", ALL FAILING: {', '.join(failing)}" if failing else "")


# -- one node: follow the document, publish the record ---------------------------------------
class Backoff:
    def __init__(self) -> None:
        self.next_s = BACKOFF_FIRST_S

    def take(self) -> float:
        wait = self.next_s
        self.next_s = min(BACKOFF_MAX_S, self.next_s * 2)
        return wait

    def reset(self) -> None:
        self.next_s = BACKOFF_FIRST_S


@dataclass
class NodeView:
    """What this node knows of its place in the cluster (published in its record and its state file)."""

    applied_revision: int = 0
    latest_revision: int = 0
    rejected_revision: int = 0
    rejected_error: str | None = None
    reachable: bool = False
    unreachable_since: float | None = None
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"applied_revision": self.applied_revision, "latest_revision": self.latest_revision,
                "rejected_revision": self.rejected_revision or None, "rejected_error": self.rejected_error,
                "etcd_reachable": self.reachable, "unreachable_since": self.unreachable_since,
                "last_error": self.last_error}


Adopt = Callable[[DesiredState, int], Awaitable[bool]]


class ClusterNode:
    """The etcd side of one agent. `first_state` blocks until a valid document is read; then
    `follow` applies each new revision through the agent's `adopt`, and `publish` keeps the
    node's record under its lease. While etcd cannot be reached the node keeps what it
    applied last, says so, and retries with backoff; when etcd answers again it reads the key
    and catches up before watching."""

    def __init__(self, url: EtcdUrl, name: str, check_interfaces: bool = True):
        self.url = url
        self.name = name
        self.client = EtcdClient(url)
        self.check_interfaces = check_interfaces
        self.view = NodeView()
        self._lock = threading.Lock()
        self._watch: Any = None
        self._lease = 0
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _nudge(self) -> None:
        """A revision applied or refused: the record goes out now, not at the next interval."""
        if self._changed is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._changed.set)

    # -- reachability, said once per change -------------------------------------------------
    def _reached(self) -> None:
        with self._lock:
            was = self.view.reachable
            since = self.view.unreachable_since
            self.view.reachable, self.view.unreachable_since, self.view.last_error = True, None, None
        if not was:
            if since is not None:
                log.warning("etcd at %s answers again after %.1fs; catching up from revision %d",
                            self.client.where, time.time() - since, self.view.applied_revision)
            else:
                log.info("etcd at %s reached; following %s", self.client.where, self.url.config_key)

    def _lost(self, exc: EtcdError, retry_s: float) -> None:
        with self._lock:
            was = self.view.reachable or self.view.unreachable_since is None
            self.view.reachable = False
            if self.view.unreachable_since is None:
                self.view.unreachable_since = time.time()
            self.view.last_error = str(exc)
        serving = (f"serving revision {self.view.applied_revision}" if self.view.applied_revision
                   else "nothing applied yet")
        (log.error if was else log.info)("etcd unreachable (%s); %s; retrying in %.1fs", exc, serving, retry_s)
        watch = self._watch
        if watch is not None:
            watch.close()

    # -- the document -----------------------------------------------------------------------
    def _validate(self, kv: KeyValue) -> DesiredState:
        try:
            text = kv.value.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"{revision_source(self.url, kv.mod_revision)}: not UTF-8 text; hint: push a "
                              "YAML file with lbctl cluster push") from None
        return load_text(text, revision_source(self.url, kv.mod_revision),
                         interface_here if self.check_interfaces else None)

    def _reject(self, revision: int, why: str) -> None:
        with self._lock:
            self.view.rejected_revision, self.view.rejected_error = revision, why
        log.error("revision %d refused, the node keeps revision %d: %s", revision,
                  self.view.applied_revision, why)
        self._nudge()

    def first_state(self, stop: threading.Event | None = None) -> tuple[DesiredState, int]:
        """Blocks until the key holds a document that validates here; returns it and its revision."""
        backoff = Backoff()
        waited_for_doc = False
        while stop is None or not stop.is_set():
            try:
                kv, _ = self.client.get(self.url.config_key)
            except EtcdError as exc:
                wait = backoff.take()
                self._lost(exc, wait)
                time.sleep(wait)
                continue
            self._reached()
            backoff.reset()
            if kv is None:
                if not waited_for_doc:
                    log.warning("no document at %s yet; waiting for 'lbctl cluster push -f FILE --etcd %s'",
                                self.url.config_key, self.url)
                    waited_for_doc = True
            elif kv.mod_revision != self.view.rejected_revision:
                try:
                    state = self._validate(kv)
                except ConfigError as exc:
                    self._reject(kv.mod_revision, str(exc))
                else:
                    with self._lock:
                        self.view.latest_revision = kv.mod_revision
                    return state, kv.mod_revision
            time.sleep(PUBLISH_INTERVAL_S)
        raise EtcdUnavailableError("stopped before a document was read")

    def applied(self, revision: int) -> None:
        with self._lock:
            self.view.applied_revision = revision
            self.view.latest_revision = max(self.view.latest_revision, revision)
            if self.view.rejected_revision and self.view.rejected_revision < revision:
                self.view.rejected_revision, self.view.rejected_error = 0, None
        self._nudge()

    def confirm_current(self) -> str | None:
        """A fresh read of the key: None when the revision etcd holds now is the one this node
        applied (or refused, as every node does), else why the node is not current. A node
        coming back into service announces only after this (agent._recovery_gate)."""
        try:
            kv, _ = self.client.get(self.url.config_key)
        except EtcdError as exc:
            return f"etcd cannot confirm that revision {self.view.applied_revision} is current ({exc})"
        with self._lock:
            applied, rejected = self.view.applied_revision, self.view.rejected_revision
            if kv is not None:
                self.view.latest_revision = max(self.view.latest_revision, kv.mod_revision)
        if kv is None or kv.mod_revision in (applied, rejected):
            return None
        return f"etcd holds revision {kv.mod_revision}, this node applied {applied}"

    async def _offer(self, kv: KeyValue | None, adopt: Adopt) -> None:
        if kv is None:
            log.error("%s was deleted; the node keeps revision %d (push a document to change it)",
                      self.url.config_key, self.view.applied_revision)
            return
        with self._lock:
            self.view.latest_revision = max(self.view.latest_revision, kv.mod_revision)
        if kv.mod_revision in (self.view.applied_revision, self.view.rejected_revision):
            return
        try:
            state = await asyncio.to_thread(self._validate, kv)
        except ConfigError as exc:
            self._reject(kv.mod_revision, str(exc))
            return
        if await adopt(state, kv.mod_revision):
            self.applied(kv.mod_revision)
            log.info("revision %d applied", kv.mod_revision)
        else:
            self._reject(kv.mod_revision, "its changes could not be applied (see the line above)")

    async def follow(self, adopt: Adopt) -> None:
        """Forever: read the key (catching up), then watch it from the next revision."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            try:
                kv, store_rev = await asyncio.to_thread(self.client.get, self.url.config_key)
                self._reached()
                backoff.reset()
                if kv is not None:
                    await self._offer(kv, adopt)
                queue: asyncio.Queue[Any] = asyncio.Queue()
                watch = self.client.watch(self.url.config_key, store_rev + 1)
                self._watch = watch

                def read(w: Any = watch, q: asyncio.Queue[Any] = queue) -> None:
                    def send(kind: str, value: Any) -> None:
                        try:
                            loop.call_soon_threadsafe(q.put_nowait, (kind, value))
                        except RuntimeError:
                            pass    # the agent's loop ended first: nobody is listening
                    try:
                        for kv in w:
                            send("kv", kv)
                        send("end", None)
                    except EtcdError as exc:
                        send("error", exc)

                reader = threading.Thread(target=read, name="etcd-watch", daemon=True)
                reader.start()
                try:
                    while True:
                        what, item = await queue.get()
                        if what == "kv":
                            await self._offer(item, adopt)
                        elif what == "error":
                            raise item
                        else:
                            raise EtcdUnavailableError(f"the watch on {self.url.config_key} ended")
                finally:
                    watch.close()
                    self._watch = None
            except EtcdError as exc:
                wait = backoff.take()
                self._lost(exc, wait)
                await asyncio.sleep(wait)

    # -- the record -------------------------------------------------------------------------
    def record(self, extra: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {"name": self.name, "pid": os.getpid(), "updated": time.time(), **self.view.as_dict(), **extra}

    def _put_record(self, rec: dict[str, Any]) -> None:
        if self._lease and self.client.lease_keepalive(self._lease) <= 0:
            self._lease = 0     # expired (etcd was away longer than the TTL): the record went with it
        if not self._lease:
            self._lease = self.client.lease_grant(NODE_TTL_S)
        self.client.put(self.url.node_key(self.name), json.dumps(rec, sort_keys=True), self._lease)

    async def publish(self, extra: Callable[[], dict[str, Any]],
                      complete: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Forever: renew the lease and write the record, every PUBLISH_INTERVAL_S while etcd
        answers, with backoff while it does not. `extra()` adds the agent's part (in the event
        loop, where that state lives); `complete(record)` what takes blocking calls (in a thread)."""
        backoff = Backoff()
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        while True:
            self._changed.clear()
            try:
                rec = self.record(extra())
                if complete is not None:
                    await asyncio.to_thread(complete, rec)
                await asyncio.to_thread(self._put_record, rec)
                self._reached()
                backoff.reset()
                wait = PUBLISH_INTERVAL_S
            except EtcdError as exc:
                wait = backoff.take()
                self._lost(exc, wait)
                await asyncio.sleep(wait)    # no nudge hurries a retry
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def withdraw(self) -> None:
        """On a clean stop: the record goes at once (revoking the lease) instead of at its TTL."""
        if self._lease:
            try:
                EtcdClient(self.url, timeout_s=2.0).lease_revoke(self._lease)
            except EtcdError:
                pass   # unreachable: the lease expires by itself
            self._lease = 0
