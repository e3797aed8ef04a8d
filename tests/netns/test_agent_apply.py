"""`lbctl apply` and `lbctl export` on a real lab: a file attaches and serves, the same file
twice writes nothing, export round-trips, and every broken file changes nothing."""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from labcli import lab_up, lbctl

from lbctl.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces and loads XDP"),
]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab whose balancer starts detached: the first apply attaches it."""
    with lab_up("ag", attach=False) as the_lab:
        yield the_lab


def config_text(lab: Lab, backends: dict[str, tuple[int, str]], udp: bool = False) -> str:
    """A config file for the lab: backend name -> (weight, state)."""
    lines = [f"interfaces: [{', '.join(lab.lb_ifaces)}]", "xdp_mode: native", "vips:",
             f"  - vip: {lab.vip}:{lab.http_port}", "    proto: tcp", "    backends:"]
    for name, (weight, state) in backends.items():
        lines.append(f"      - {{addr: {lab.host(name).addr}:{lab.http_port}, weight: {weight}, "
                     f"state: {state}}}")
    if udp:
        lines += [f"  - vip: {lab.vip}:{lab.udp_port}", "    proto: udp", "    backends:",
                  f"      - addr: {lab.host('be1').addr}:{lab.udp_port}"]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str, name: str = "lb.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def maps_dump(lab: Lab) -> object:
    """What the maps hold, without counters: VIPs with ids and generations, backends with ids."""
    vips = json.loads(lbctl(lab, "vip", "list", "--json").stdout)
    backends = json.loads(lbctl(lab, "backend", "list", "--json").stdout)
    keep_v = ("vip", "proto", "vip_id", "ring_generation", "backends", "active_backends")
    keep_b = ("vip", "proto", "backend", "weight", "state", "backend_id")
    return ([{k: v[k] for k in keep_v} for v in vips], [{k: b[k] for k in keep_b} for b in backends])


def test_apply_attaches_serves_and_the_same_file_twice_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    path = write(tmp_path, config_text(lab, {"be1": (1, "active"), "be2": (1, "active")}, udp=True))
    dry = lbctl(lab, "apply", "-f", path, "--dry-run")
    assert "+ attach" in dry.stdout and "(dry run: nothing changed)" in dry.stdout
    status = json.loads(lbctl(lab, "status", "--json").stdout)
    assert status["attached"] == [], "a dry run attaches nothing"

    first = lbctl(lab, "apply", "-f", path, timeout_s=180.0)
    assert f"+ vip {lab.vip}:{lab.http_port} (tcp)" in first.stdout
    attached = json.loads(lbctl(lab, "status", "--json").stdout)["attached"]
    assert sorted(a["ifname"] for a in attached) == sorted(lab.lb_ifaces)
    bodies = lab.http_get(lab.vip, lab.http_port, count=60, timeout_s=3.0)
    assert set(bodies) == {"be1", "be2"}

    before = maps_dump(lab)
    second = lbctl(lab, "apply", "-f", path)
    assert second.stdout.strip() == "no changes"
    assert maps_dump(lab) == before


def test_apply_changes_report_ring_share_and_flows(lab: Lab, tmp_path: Path) -> None:
    lbctl(lab, "apply", "-f", write(tmp_path, config_text(lab, {"be1": (1, "active"), "be2": (1, "active")},
                                                          udp=True)), timeout_s=180.0)
    changed = lbctl(lab, "apply", "-f", write(tmp_path, config_text(
        lab, {"be1": (1, "active"), "be2": (1, "drain"), "be3": (2, "active")}), "b.yaml"))
    assert f"  ~ backend {lab.host('be2').addr}:{lab.http_port} state active->drain" in changed.stdout
    assert f"  + backend {lab.host('be3').addr}:{lab.http_port} weight 2 active" in changed.stdout
    assert "slots move" in changed.stdout
    assert f"- vip {lab.vip}:{lab.udp_port} (udp)" in changed.stdout, "a VIP not in the file goes"
    bodies = Counter(lab.http_get(lab.vip, lab.http_port, count=60, timeout_s=3.0))
    assert set(bodies) == {"be1", "be3"}, bodies


def test_export_round_trips(lab: Lab, tmp_path: Path) -> None:
    lbctl(lab, "apply", "-f", write(tmp_path, config_text(lab, {"be1": (3, "active"), "be3": (1, "down")},
                                                          udp=True)), timeout_s=180.0)
    exported = lbctl(lab, "export").stdout
    path = write(tmp_path, exported, "exported.yaml")
    assert lbctl(lab, "apply", "-f", path).stdout.strip() == "no changes"
    assert lbctl(lab, "export").stdout == exported


BROKEN = {
    "bad YAML": ("vips:\n  - vip: {vip}\n   backends: []\n", ":3: not valid YAML"),
    "unknown key": ("vips:\n  - vip: {vip}\n    backend: []\n", ":3: vips[0].backend: unknown key"),
    "bad address": ("vips:\n  - vip: {vip}\n    backends:\n      - addr: 10.77.2.300:80\n",
                    ":4: vips[0].backends[0].addr: malformed backend"),
    "duplicate VIP": ("vips:\n  - vip: {vip}\n  - vip: {vip}\n", ":3: vips[1].vip: duplicate VIP"),
    "duplicate backend": (("vips:\n  - vip: {vip}\n    backends:\n      - addr: 10.77.2.11:80\n"
                           "      - addr: 10.77.2.11:80\n"), ":5: vips[0].backends[1].addr: duplicate backend"),
    "weight 0": ("vips:\n  - vip: {vip}\n    backends:\n      - {{addr: 10.77.2.11:80, weight: 0}}\n",
                 ":4: vips[0].backends[0].weight: 0 is out of range"),
    "weight 1001": (("vips:\n  - vip: {vip}\n    backends:\n      - addr: 10.77.2.11:80\n"
                     "        weight: 1001\n"), ":5: vips[0].backends[0].weight: 1001 is out of range"),
    "unknown interface": ("interfaces: [eth0, eth7]\nvips: []\n", ":1: interfaces[1]: unknown interface 'eth7'"),
    "interval 0": ("vips:\n  - vip: {vip}\n    health: {{check: tcp, interval: 0s}}\n",
                   ":3: vips[0].health.interval: duration '0s' must be more than 0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_file_says_where_exits_2_and_changes_nothing(lab: Lab, tmp_path: Path, case: str) -> None:
    lbctl(lab, "apply", "-f", write(tmp_path, config_text(lab, {"be1": (1, "active"),
                                                               "be2": (2, "active")})), timeout_s=180.0)
    before = maps_dump(lab)
    text, says = BROKEN[case]
    path = write(tmp_path, text.format(vip=f"{lab.vip}:{lab.http_port}"), "broken.yaml")
    proc = lbctl(lab, "apply", "-f", path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lbctl: error: {path}{says}"), proc.stderr
    assert "hint: " in lines[0]
    assert maps_dump(lab) == before


def test_xdp_mode_auto_takes_the_drivers_default_and_then_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    lbctl(lab, "detach", "--all", "--force")
    path = write(tmp_path, config_text(lab, {"be1": (1, "active")}).replace("xdp_mode: native",
                                                                             "xdp_mode: auto"))
    lbctl(lab, "apply", "-f", path, timeout_s=180.0)
    attached = json.loads(lbctl(lab, "status", "--json").stdout)["attached"]
    assert sorted(a["ifname"] for a in attached) == sorted(lab.lb_ifaces)
    assert lbctl(lab, "apply", "-f", path).stdout.strip() == "no changes"
    assert set(lab.http_get(lab.vip, lab.http_port, count=10, timeout_s=3.0)) == {"be1"}
