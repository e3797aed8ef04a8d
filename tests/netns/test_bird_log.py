"""A node's BIRD keeps its log bounded: it writes bird.log itself and, past the configured
size, moves it to bird.log.old and starts a new one (run for real, in a namespace of its own
with no route anywhere, so its BGP sessions send nothing)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a network namespace for BIRD"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (lbctl/setup.sh installs bird2)"),
]

REPO = Path(__file__).resolve().parents[2]
LIMIT = 2048

# Inside the namespace: a Speaker with a small log limit, reconfigured many times (each
# `configure` logs two lines), then stopped without cleaning (the files stay to be read).
_SNIPPET = r"""
import json, sys
from lbctl.bgp import Speaker
from lbctl.config import BgpPeer, BgpSpec
spec = json.loads(sys.argv[1])
sp = Speaker("sclog", spec["run_dir"], BgpSpec(65010, "10.0.1.2", 3, (BgpPeer("10.0.1.1", 65000),)),
             "10.0.1.2", log_limit=spec["limit"])
sp.start()
try:
    for i in range(spec["rounds"]):
        sp.set([f"10.0.0.{i % 2 + 10}"])
finally:
    sp.stop()
"""


def test_bird_log_is_rotated_past_its_limit(tmp_path: Path):
    ns = f"sc{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        spec = {"run_dir": str(tmp_path), "limit": LIMIT, "rounds": 60}
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _SNIPPET, json.dumps(spec)],
                              capture_output=True, text=True, check=False, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    log, old = tmp_path / "bird.log", tmp_path / "bird.log.old"
    # 60 reconfigurations write far more than the limit; what stays is at most twice it.
    assert old.exists(), sorted(p.name for p in tmp_path.iterdir())
    assert "Reconfigured" in old.read_text()
    assert log.stat().st_size <= LIMIT + 512 and old.stat().st_size <= LIMIT + 512
    assert not (tmp_path / "bird.log.old.old").exists()
    print(f"\nbird.log {log.stat().st_size} B, bird.log.old {old.stat().st_size} B (limit {LIMIT})")
