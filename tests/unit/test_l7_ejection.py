"""Passive ejection is shared by the L7 proxy's workers: N consecutive 5xx eject a backend for
every worker together (so clients meet N failures, not N per worker), the ejection is counted
once, and the shared table shows it to `lbctl status` and the metrics."""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_l7_proxy import CountingServer, Handler, Rig, free_port

from lbctl.l7.ejection import EjectionTable, create
from lbctl.l7.stats import L7Collector, backend_rows, read_all


class Broken(Handler):
    def do_GET(self) -> None:
        self._reply(b"broken", 500)


class EjectRig(Rig):
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.servers = {"good": CountingServer("good"), "bad": CountingServer("bad", Broken)}
        for srv in self.servers.values():
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.port = free_port()
        self.sup = None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[EjectRig]:
    r = EjectRig(tmp_path)
    yield r
    r.close()


CONFIG = """\
vips:
  - vip: "@VIP"
    mode: l7
    l7: {workers: 2, ejection: {failures: 4, cooldown: 60s}}
    backends:
      - {addr: "@good"}
      - {addr: "@bad"}
"""


def test_consecutive_failures_count_over_every_worker_and_eject_once(rig: EjectRig):
    rig.start(CONFIG, workers=2)
    statuses: Counter[int] = Counter()
    # One request per new connection: the kernel spreads them over both workers' sockets.
    for _ in range(60):
        conn = http.client.HTTPConnection("127.0.0.1", rig.port, timeout=10)
        conn.request("GET", "/")
        statuses[conn.getresponse().status] += 1
        conn.close()
    t = rig.totals_when(lambda t: sum(t.get("responses", {}).values()) >= 60)
    assert rig.sup is not None
    served = [snap["pid"] for snap in read_all(rig.sup.stats_dir) if snap.get("responses")]
    assert len(served) == 2, "both workers served requests (else sharing is not tested)"
    assert statuses[500] == 4, f"4 failures eject the backend for every worker: {statuses}"
    assert sum(t["ejections"].values()) == 1
    vip = f"127.0.0.1:{rig.port}"
    rows = {r["backend"]: r for r in backend_rows(str(rig.tmp))}
    assert rows[rig.addr("bad")]["ejected_s"] > 0 and rows[rig.addr("bad")]["ejections"] == 1
    assert rows[rig.addr("good")]["ejected_s"] == 0 and rows[rig.addr("good")]["vip"] == vip
    gauge = next(f for f in L7Collector(rig.sup.stats_dir).collect()
                 if f.name == "lbctl_l7_backend_ejected")
    assert {s.labels["backend"]: s.value for s in gauge.samples} == {rig.addr("bad"): 1.0,
                                                                     rig.addr("good"): 0.0}


def test_a_success_resets_the_shared_count(tmp_path: Path):
    path = str(tmp_path / "t.bin")
    create(path)
    one, two = EjectionTable(path), EjectionTable(path)
    try:
        assert not one.failed(7, 3, 10.0) and not two.failed(7, 3, 10.0)
        two.succeeded(7)
        assert not one.failed(7, 3, 10.0) and not two.failed(7, 3, 10.0)
        assert two.generation() == 0
        assert one.failed(7, 3, 10.0), "the third consecutive failure, from either worker, ejects"
        assert two.ejected_until(7) > 0 and two.read(7)[0] == 0
        assert two.generation() == 1, "the other worker must see that something was ejected"
        assert not two.failed(7, 1, 10.0), "no second ejection while one runs"
    finally:
        one.close()
        two.close()
