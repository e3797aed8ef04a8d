"""Instance lock files: exclusive across processes, and gone once their last holder lets go
(also when lab down removes a node that a lab command is still changing)."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from lbctl import control, lab_cluster, runlock

WORKERS = 4
ROUNDS = 300


def _contend(lock_path: str, marker: str, rounds: int, errors: multiprocessing.Queue) -> None:
    """Takes the lock `rounds` times; inside, claims `marker` exclusively (O_EXCL) as proof
    that nobody else is inside too."""
    for _ in range(rounds):
        with runlock.held(lock_path):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                errors.put("two processes held the lock at once")
                return
            os.close(fd)
            os.unlink(marker)


def test_the_lock_file_goes_with_its_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "ns1.lock")          # its directory is created too
    with runlock.held(path):
        assert os.path.exists(path)
    assert not os.path.exists(path)
    assert os.listdir(tmp_path / "run") == []


def test_a_held_lock_refuses_a_non_blocking_taker(tmp_path: Path) -> None:
    path = str(tmp_path / "ns1.lock")
    fd = runlock.acquire(path)
    try:
        ctx = multiprocessing.get_context("fork")
        proc = ctx.Process(target=runlock.acquire, args=(path, False))
        proc.start()
        proc.join(30)
        assert proc.exitcode not in (0, None)      # BlockingIOError in the child
    finally:
        runlock.release(path, fd)
    assert not os.path.exists(path)


def test_removing_on_release_never_lets_two_processes_hold_it(tmp_path: Path) -> None:
    # Waiters blocked on a file that its holder removes win their flock on a dead inode while a
    # newcomer locks a new file of the same name: without the inode check both are "inside".
    lock_path, marker = str(tmp_path / "ns1.lock"), str(tmp_path / "inside")
    ctx = multiprocessing.get_context("fork")
    errors: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(lock_path, marker, ROUNDS, errors))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    found = [] if errors.empty() else [errors.get()]
    assert found == []
    assert not os.path.exists(lock_path)



def _flock_waiter_on(path: str) -> bool:
    """Whether /proc/locks shows a process blocked on the flock of `path`'s inode."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as locks:
        return any("-> FLOCK" in line and f":{ino} " in line for line in locks)


def test_lab_down_removes_a_node_lock_only_once_its_holder_lets_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lab command changing a node holds its controller lock while lab down removes the node:
    # the lock file must stay its holder's until released (then the waiter removes it).
    monkeypatch.setattr(control, "LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(lab_cluster, "pin_dir_for", lambda netns: str(tmp_path / "pins" / netns))
    pins = tmp_path / "pins" / "dd1"
    pins.mkdir(parents=True)
    path = control.lock_path("dd1")
    fd = runlock.acquire(path)
    down = threading.Thread(target=lab_cluster.remove_node_state, args=("dd1",))
    down.start()
    try:
        deadline = time.monotonic() + 60
        while down.is_alive() and not _flock_waiter_on(path) and time.monotonic() < deadline:
            down.join(0.01)
        assert os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino, (
            "the node's lock file was removed while a command held it")
        assert pins.exists(), "the node's pins were removed while a command held its lock"
        assert down.is_alive(), "lab down did not wait for the node's lock"
    finally:
        runlock.release(path, fd)
        down.join(60)
    assert not down.is_alive()
    assert not os.path.exists(path) and not pins.exists()
