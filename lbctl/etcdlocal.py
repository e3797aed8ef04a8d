"""A real, single-member etcd process (Debian's etcd-server) on this machine, for tests and the
lab: its data under a directory of its own, listening on loopback or on an address inside a
network namespace, and always stopped, also when the code that started it fails."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from lbctl.errors import LbctlError
from lbctl.etcd import EtcdClient, EtcdError, EtcdUrl

READY_TIMEOUT_S = 60.0   # a bound on a loaded machine; etcd is ready in about a second when idle
STOP_TIMEOUT_S = 15.0


class LocalEtcdError(LbctlError):
    exit_code = 9


def _free_port() -> int:
    """A port free on this namespace's loopback now (etcd binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalEtcd:
    """`with LocalEtcd() as etcd:` starts etcd and waits until it answers; leaving the block
    stops it and removes its data. kill() and start() in between are an outage and a
    restart with the same data (what the cluster tests need).

    netns: run it inside that network namespace (through `ip netns exec`), listening on
    `addr` there (0.0.0.0: every address of the namespace). Without netns it listens on
    127.0.0.1 at a free port. tie_to_parent=False lets it outlive this process (the lab
    records its pid and stops it on `lab down`)."""

    def __init__(self, netns: str | None = None, addr: str = "127.0.0.1", client_port: int | None = None,
                 prefix: str = "/lbctl", base_dir: str | Path | None = None, name: str = "lbctl",
                 tie_to_parent: bool = True):
        self.netns = netns
        self.addr = addr
        if netns is None:
            self.client_port = client_port or _free_port()
            self.peer_port = _free_port()
        else:   # a namespace of its own: the default ports are free there
            self.client_port = client_port or 2379
            self.peer_port = 2380
        self.prefix = prefix
        self.name = name
        self.tie_to_parent = tie_to_parent
        self._own_dir = base_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="lbctl-etcd-")) if base_dir is None else Path(base_dir)
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self.proc: subprocess.Popen | None = None

    # -- where clients find it ------------------------------------------------------------------
    @property
    def client_host(self) -> str:
        """The address a client in the same namespace dials."""
        return "127.0.0.1" if self.addr in ("0.0.0.0", "127.0.0.1") else self.addr

    def url(self, host: str | None = None) -> EtcdUrl:
        """etcd://HOST:PORT/PREFIX for clients; `host`: the address they reach it at (another
        namespace dials the namespace's address)."""
        return EtcdUrl(host or self.client_host, self.client_port, self.prefix)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if shutil.which("etcd") is None:
            raise LocalEtcdError("etcd is not installed; hint: apt-get install etcd-server (lbctl/setup.sh "
                                 "installs it)")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)   # etcd warns about wider
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", f"http://{self.addr}:{self.client_port}",
                "--advertise-client-urls", f"http://{self.client_host}:{self.client_port}",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                # No metrics/pprof listeners beyond the client port; quiet logs.
                "--log-level", "warn", "--logger", "zap"]
        cmd = ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv
        if self.tie_to_parent:
            # If the process that started etcd dies (a test killed with -9), the kernel sends
            # etcd SIGTERM (the setting survives both execs), so no etcd outlives its test.
            cmd = ["setpriv", "--pdeathsig=TERM", "--", *cmd]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=not self.tie_to_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        client = EtcdClient(self.url(), timeout_s=2.0)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise LocalEtcdError(f"etcd exited {self.proc.returncode} at start: {self.log_tail()}")
            if self.netns is None:
                try:
                    client.get(self.prefix + "/")
                    return
                except EtcdError:
                    pass
            elif self._answers_in_netns():
                return
            if time.monotonic() > deadline:
                raise LocalEtcdError(f"etcd did not answer within {READY_TIMEOUT_S:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def _answers_in_netns(self) -> bool:
        """Asks from inside the namespace (this process stays where it is)."""
        code = ("import urllib.request; urllib.request.urlopen("
                f"'http://127.0.0.1:{self.client_port}/health', timeout=2)")
        assert self.netns is not None
        proc = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-I", "-S", "-c", code],
                              capture_output=True, timeout=30, check=False)
        return proc.returncode == 0

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill(self) -> None:
        """An outage: SIGKILL, no goodbye to the clients; the data stays for start()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stops etcd and removes the directory it made (a given base_dir is emptied of its data)."""
        self.stop()
        shutil.rmtree(self.dir if self._own_dir else self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:  # noqa: PYI034  (Python 3.9+: no typing.Self)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def stop_pid(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stops an etcd started with tie_to_parent=False by another process (the lab's down)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
