"""Active health checks for the agent: TCP connect and HTTP status probes on asyncio, one task
per backend with jitter, and HAProxy-style rise/fall state with each transition's reason."""
from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lbctl.config import HealthSpec

# Each wait is the interval +/- this share, so checks of many backends do not fire in step.
JITTER = 0.1
MAX_STATUS_LINE = 4096


def _os_text(exc: OSError) -> str:
    # asyncio wraps connect errors as "Connect call failed (...)": name the errno instead.
    return os.strerror(exc.errno) if exc.errno else str(exc)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str           # HAProxy-like: "Layer4 connection problem (Connection refused)"
    duration_s: float


async def check_tcp(addr: str, port: int, timeout_s: float) -> CheckResult:
    """Passes when a TCP connection to addr:port completes within the timeout."""
    start = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), timeout_s)
    except asyncio.TimeoutError:
        return CheckResult(False, "Layer4 timeout", time.monotonic() - start)
    except OSError as exc:
        return CheckResult(False, f"Layer4 connection problem ({_os_text(exc)})",
                           time.monotonic() - start)
    took = time.monotonic() - start
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return CheckResult(True, "Layer4 check passed", took)


async def check_http(addr: str, port: int, path: str, expect: tuple[int, int], timeout_s: float) -> CheckResult:
    """Passes when GET path answers with a status in `expect` within the timeout (one request,
    Connection: close; only the status line is read)."""
    start = time.monotonic()
    connected = False

    async def probe() -> CheckResult:
        nonlocal connected
        try:
            reader, writer = await asyncio.open_connection(addr, port)
        except OSError as exc:
            return CheckResult(False, f"Layer4 connection problem ({_os_text(exc)})",
                               time.monotonic() - start)
        connected = True
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {addr}:{port}\r\nUser-Agent: lbctl-health\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
        except OSError as exc:
            return CheckResult(False, f"Layer7 connection problem ({_os_text(exc)})",
                               time.monotonic() - start)
        finally:
            writer.close()
        took = time.monotonic() - start
        parts = line[:MAX_STATUS_LINE].decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            what = "empty response" if not line else f"not an HTTP status line: {line[:40]!r}"
            return CheckResult(False, f"Layer7 invalid response ({what})", took)
        status = int(parts[1])
        if expect[0] <= status <= expect[1]:
            return CheckResult(True, f"Layer7 check passed (status {status})", took)
        return CheckResult(False, f"Layer7 wrong status ({status})", took)

    try:
        return await asyncio.wait_for(probe(), timeout_s)
    except asyncio.TimeoutError:
        return CheckResult(False, "Layer7 timeout" if connected else "Layer4 timeout", time.monotonic() - start)


async def run_check(spec: HealthSpec, addr: str, port: int) -> CheckResult:
    target_port = spec.port or port
    timeout_s = spec.timeout_ms / 1000
    if spec.check == "http":
        return await check_http(addr, target_port, spec.path, spec.expect, timeout_s)
    return await check_tcp(addr, target_port, timeout_s)


@dataclass
class BackendHealth:
    """Rise/fall state of one checked backend. `up` starts True (as HAProxy's servers do),
    or False for a backend the maps show taken out by a previous agent's checks."""

    up: bool = True
    streak: int = 0                    # consecutive results that disagree with `up`
    since: float = field(default_factory=time.time)
    checks: int = 0
    failures: int = 0
    last: CheckResult | None = None
    previous_state_s: float = 0.0      # how long the state before the last flip lasted

    def record(self, result: CheckResult, rise: int, fall: int) -> bool:
        """Counts one result; True when the state flips."""
        self.checks += 1
        self.failures += 0 if result.ok else 1
        self.last = result
        if result.ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (rise if not self.up else fall):
            self.up = result.ok
            self.streak = 0
            now = time.time()
            self.previous_state_s, self.since = now - self.since, now
            return True
        return False


Transition = Callable[[tuple, BackendHealth, CheckResult], None]


class HealthChecker:
    """One asyncio task per checked backend, keyed by (vip, backend name). `sync` starts and
    stops tasks to match a new set of targets, keeping the state of those that stay."""

    def __init__(self, on_transition: Transition, on_result: Callable[[tuple, BackendHealth], None]):
        self.on_transition = on_transition
        self.on_result = on_result
        self.states: dict[tuple, BackendHealth] = {}
        self._tasks: dict[tuple, asyncio.Task] = {}
        self._specs: dict[tuple, tuple[HealthSpec, str, int]] = {}

    def sync(self, targets: dict[tuple, tuple[HealthSpec, str, int]], initially_down: set[tuple]) -> None:
        for key in list(self._tasks):
            if key not in targets or self._specs[key] != targets[key]:
                self._tasks.pop(key).cancel()
                if key not in targets:
                    self.states.pop(key, None)
        for key, target in targets.items():
            if key in self._tasks:
                continue
            self._specs[key] = target
            if key not in self.states:
                self.states[key] = BackendHealth(up=key not in initially_down)
            self._tasks[key] = asyncio.get_running_loop().create_task(self._loop(key, *target))

    async def _loop(self, key: tuple, spec: HealthSpec, addr: str, port: int) -> None:
        interval_s = spec.interval_ms / 1000
        # The first check comes soon, spread over a tenth of the interval.
        await asyncio.sleep(random.uniform(0, interval_s * JITTER))
        while True:
            started = time.monotonic()
            result = await run_check(spec, addr, port)
            state = self.states[key]
            if state.record(result, spec.rise, spec.fall):
                self.on_transition(key, state, result)
            self.on_result(key, state)
            wait = interval_s * random.uniform(1 - JITTER, 1 + JITTER) - (time.monotonic() - started)
            await asyncio.sleep(max(wait, 0.0))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
