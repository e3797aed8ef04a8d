"""`lbctl reload` on a real lab: a new program on both interfaces under a keep-alive load, with
no error and no connection changing backend; maps of another layout are refused, untouched."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from agentlab import KeepAliveLoad, load_verdict
from labcli import lab_up, lbctl

from lbctl.lab import Lab
from lbctl.netns import inside
from xdp.balancer import Balancer, reload_program
from xdp.errors import IncompatibleMapsError
from xdp.limits import Limits

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and loads XDP"),
]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up("ag") as the_lab:
        vip = f"{the_lab.vip}:{the_lab.http_port}"
        lbctl(the_lab, "vip", "add", vip)
        for b in the_lab.backends:
            lbctl(the_lab, "backend", "add", vip, f"{b.addr}:{the_lab.http_port}")
        yield the_lab


def attached(lab: Lab) -> dict[str, int]:
    return {a["ifname"]: a["prog_id"] for a in json.loads(lbctl(lab, "status", "--json").stdout)["attached"]}


def modes(lab: Lab) -> dict[str, str]:
    return {a["ifname"]: a["mode"] for a in json.loads(lbctl(lab, "status", "--json").stdout)["attached"]}


def test_reload_swaps_the_program_everywhere_and_no_connection_notices(lab: Lab) -> None:
    before, modes_before = attached(lab), modes(lab)
    vips_before = [{k: v[k] for k in ("vip", "vip_id", "ring_generation")}
                   for v in json.loads(lbctl(lab, "vip", "list", "--json").stdout)]
    load = KeepAliveLoad(lab, connections=64)
    try:
        out = lbctl(lab, "reload", timeout_s=180.0).stdout
        after = attached(lab)
        verdict = load_verdict(load.finish())
    finally:
        load.close()
    assert sorted(after) == sorted(lab.lb_ifaces) and len(set(after.values())) == 1
    assert not set(after.values()) & set(before.values()), "a new program runs on every interface"
    assert all(f"reloaded {name} ({modes_before[name]}, prog {after[name]})" in out for name in after)
    assert modes(lab) == modes_before, "each interface keeps its mode"
    assert [{k: v[k] for k in ("vip", "vip_id", "ring_generation")}
            for v in json.loads(lbctl(lab, "vip", "list", "--json").stdout)] == vips_before
    assert verdict["errors"] == [] and verdict["non2xx"] == 0 and verdict["idle_connections"] == 0
    assert verdict["moved"] == [], "a connection changed backend across the reload"
    # The new program serves new connections too.
    assert set(lab.http_get(lab.vip, lab.http_port, count=30, timeout_s=3.0)) <= {b.name for b in lab.backends}


def test_reload_against_maps_of_another_layout_is_refused_and_changes_nothing(lab: Lab) -> None:
    before = attached(lab)
    with inside(lab.lb.netns):
        other_build = Balancer(lab.lb.netns, Limits(flow_table_size=1024))
        with pytest.raises(IncompatibleMapsError, match="detach --all --purge"):
            reload_program(other_build)
    assert attached(lab) == before


def test_reload_without_an_attachment_says_so(lab: Lab) -> None:
    proc = lbctl(lab, "detach", "--all", "--force")
    assert proc.returncode == 0
    try:
        failed = lbctl(lab, "reload", check=False)
        assert failed.returncode == 4
        assert "nothing to reload" in failed.stderr and "hint: " in failed.stderr
    finally:
        lbctl(lab, "attach", *lab.lb_ifaces, timeout_s=180.0)
