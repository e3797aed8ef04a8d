"""Active health checks for the agent: TCP connect and HTTP status probes on asyncio, one task
per backend with jitter, and HAProxy-style rise/fall state with each transition's reason."""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lbctl.config import HealthSpec
from xdp.codec import format_endpoint

# Each wait is the interval +/- this share, so checks of many backends do not fire in step.
JITTER = 0.1
MAX_STATUS_LINE = 4096
# The loop watchdog ticks this often; a tick this much late counts as a stall of the checker.
STALL_TICK_S = 0.1
STALL_LATE_S = 0.1


def _os_text(exc: OSError) -> str:
    # asyncio wraps connect errors as "Connect call failed (...)": name the errno instead.
    return os.strerror(exc.errno) if exc.errno else str(exc)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str           # HAProxy-like: "Layer4 connection problem (Connection refused)"
    duration_s: float


def _closed_with_reset(sock: socket.socket) -> None:
    # Close with RST, as HAProxy's checks do: at 1000 checks a second, FIN would leave tens of
    # thousands of TIME_WAIT sockets on the balancer and use up its ephemeral ports.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


async def _within(coro: Any, timeout_s: float) -> Any:
    """The coroutine's result, or TimeoutError after timeout_s. asyncio.timeout (3.11+) runs it in
    the calling task; wait_for would make a task per check."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout_s)


async def _connect(addr: str, port: int) -> socket.socket:
    """A connected non-blocking socket: the event loop's own sock_* calls, without the stream
    objects of open_connection, cost a fraction of the CPU per check."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (addr, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def check_tcp(addr: str, port: int, timeout_s: float) -> CheckResult:
    """Passes when a TCP connection to addr:port completes within the timeout."""
    start = time.monotonic()
    try:
        sock = await _within(_connect(addr, port), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return CheckResult(False, "Layer4 timeout", time.monotonic() - start)
    except OSError as exc:
        return CheckResult(False, f"Layer4 connection problem ({_os_text(exc)})", time.monotonic() - start)
    took = time.monotonic() - start
    _closed_with_reset(sock)
    return CheckResult(True, "Layer4 check passed", took)


async def check_http(addr: str, port: int, path: str, expect: tuple[int, int], timeout_s: float) -> CheckResult:
    """Passes when GET path answers with a status in `expect` within the timeout (one request,
    Connection: close; only the status line is read)."""
    start = time.monotonic()
    connected = False

    async def probe() -> CheckResult:
        nonlocal connected
        loop = asyncio.get_running_loop()
        try:
            sock = await _connect(addr, port)
        except OSError as exc:
            return CheckResult(False, f"Layer4 connection problem ({_os_text(exc)})", time.monotonic() - start)
        connected = True
        line = b""
        try:
            await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: {format_endpoint(addr, port)}\r\n"
                                          "User-Agent: lbctl-health\r\nConnection: close\r\n\r\n".encode())
            while b"\n" not in line and len(line) < MAX_STATUS_LINE:
                chunk = await loop.sock_recv(sock, MAX_STATUS_LINE)
                if not chunk:
                    break
                line += chunk
        except OSError as exc:
            return CheckResult(False, f"Layer7 connection problem ({_os_text(exc)})", time.monotonic() - start)
        finally:
            _closed_with_reset(sock)
        took = time.monotonic() - start
        line = line.split(b"\n", 1)[0]
        parts = line[:MAX_STATUS_LINE].decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            what = "empty response" if not line else f"not an HTTP status line: {line[:40]!r}"
            return CheckResult(False, f"Layer7 invalid response ({what})", took)
        status = int(parts[1])
        if expect[0] <= status <= expect[1]:
            return CheckResult(True, f"Layer7 check passed (status {status})", took)
        return CheckResult(False, f"Layer7 wrong status ({status})", took)

    try:
        return await _within(probe(), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
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
        self._watchdog: asyncio.Task | None = None
        self.last_stall = 0.0          # monotonic time the event loop last ran late
        self.stalls = 0
        self.inconclusive = 0          # timeouts not counted because the loop itself was late

    def sync(self, targets: dict[tuple, tuple[HealthSpec, str, int]], initially_down: set[tuple]) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
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
            late = result.duration_s > spec.timeout_ms / 1000 + STALL_LATE_S
            if not result.ok and result.reason.endswith("timeout") and (late or self.last_stall >= started):
                # The loop ran late while this check waited (the host or this process was
                # starved, e.g. by a big apply): its timeout says nothing about the backend.
                self.inconclusive += 1
                await asyncio.sleep(interval_s * random.uniform(1 - JITTER, 1 + JITTER))
                continue
            state = self.states[key]
            if state.record(result, spec.rise, spec.fall):
                self.on_transition(key, state, result)
            self.on_result(key, state)
            wait = interval_s * random.uniform(1 - JITTER, 1 + JITTER) - (time.monotonic() - started)
            await asyncio.sleep(max(wait, 0.0))

    async def _watch(self) -> None:
        """Notes when the event loop runs late, so a check's timeout can be told apart from a
        pause of the checker itself."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(STALL_TICK_S)
            if time.monotonic() - before > STALL_TICK_S + STALL_LATE_S:
                self.stalls += 1
                self.last_stall = time.monotonic()

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
