"""HTTP/2 through `lbctl agent`'s L7 proxy on a real lab: a TLS VIP with a certificate made at
test time, curl (nghttp2) in the client namespace opening 60 concurrent streams on one
connection, spread per request over the lab's three servers by weight."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import AgentProc, wait_for
from labcli import lab_up

from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (lbctl/setup.sh test installs it)"),
]

STREAMS = 60


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_up("h2", attach=False) as the_lab:
        yield the_lab


def test_http2_over_tls_through_the_agent_spreads_streams_by_weight(lab: Lab, tmp_path: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={lab.vip}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = 8443
    backends = "\n".join(f"      - {{addr: {lab.host(n).addr}:{lab.http_port}, weight: {w}}}"
                         for n, w in (("be1", 3), ("be2", 2), ("be3", 1)))
    config = tmp_path / "lb.yaml"
    config.write_text(f"interfaces: []\nvips:\n  - vip: {lab.vip}:{port}\n    mode: l7\n"
                      f"    l7: {{workers: 2, tls: {{cert: {cert}, key: {key}}}}}\n"
                      f"    backends:\n{backends}\n")
    agent = AgentProc(lab, config, tmp_path / "agent.log", 9800 + secrets.randbelow(150))
    try:
        agent.wait_ready()
        argv = ["curl", "-sS", "--http2", "--cacert", str(cert), "--parallel", "--parallel-max",
                str(STREAMS), "-w", "%{http_version} %{response_code} %{num_connects} %header{x-backend}\\n"]
        for i in range(STREAMS):
            argv += ["-o", "/dev/null", f"https://{lab.vip}:{port}/s{i}"]
        proc = lab.run(lab.client, argv, timeout=120)
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert len(rows) == STREAMS
        assert {(r[0], r[1]) for r in rows} == {("2", "200")}, "every stream answered over HTTP/2"
        assert sum(int(r[2]) for r in rows) == 1, "all streams shared one TCP connection"
        assert Counter(r[3] for r in rows) == {"be1": 30, "be2": 20, "be3": 10}
        wait_for(lambda: (agent.sample("lbctl_l7_http2_connections_total") or 0) >= 1,
                 "the HTTP/2 connection in the metrics")
    finally:
        status = agent.stop()
    assert status == 0, agent.log()[-2000:]
