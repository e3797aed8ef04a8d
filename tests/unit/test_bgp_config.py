"""The bgp block and the BIRD config it renders: what loads, what each broken block says, and
that BIRD itself accepts what lbctl writes."""
from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from lbctl import bgp
from lbctl.config import BgpPeer, BgpSpec, DesiredState, load_text
from lbctl.errors import ConfigError

BASE = """\
interfaces: [eth0]
vips:
  - vip: 10.0.0.10:80
    backends: [{addr: 10.0.1.11:80}, {addr: 10.0.1.12:80}]
"""


def load(text: str) -> DesiredState:
    return load_text(textwrap.dedent(text), "lb.yaml", lambda name: name == "eth0")


def test_bgp_block_loads_with_its_defaults():
    st = load(BASE + "bgp: {local_as: 65010, peers: [{addr: 10.0.1.1, as: 65000}]}\n")
    assert st.bgp == BgpSpec(65010, None, 9, (BgpPeer("10.0.1.1", 65000),))
    assert [e.min_healthy for e in st.vips.values()] == [1]


def test_the_issue_example_loads():
    st = load(BASE + textwrap.dedent("""\
        bgp:
          local_as: 65010
          router_id: 10.0.1.2
          hold_time: 3
          peers:
            - addr: 10.0.1.1
              as: 65000
        """))
    assert st.bgp is not None and (st.bgp.router_id, st.bgp.hold_time_s) == ("10.0.1.2", 3)


def test_no_bgp_block_means_no_speaker():
    assert load(BASE).bgp is None


@pytest.mark.parametrize(("block", "says"), [
    ("{local_as: 65010, hold_time: 2, peers: [{addr: 10.0.1.1, as: 65000}]}", "lb.yaml:5: bgp.hold_time: 2 is out of range"),
    ("{local_as: 65010, peers: [{addr: 10.0.1.1, as: 65000, asn: 65000}]}", "unknown key 'asn'"),
    ("{local_as: 65010, peers: [{addr: 10.0.1.1}]}", "bgp.peers[0].as: required key missing"),
    ("{local_as: 65010, peers: []}", "bgp.peers"),
    ("{local_as: 0, peers: [{addr: 10.0.1.1, as: 65000}]}", "bgp.local_as: 0 is out of range"),
    ("{local_as: 65010, peers: [{addr: router, as: 65000}]}", "peer address 'router' is not an IPv4 address"),
    ("{local_as: 65010, router_id: 1.2.3, peers: [{addr: 10.0.1.1, as: 65000}]}", "router_id '1.2.3'"),
    ("{local_as: 65010, peers: [{addr: 10.0.1.1, as: 65000}, {addr: 10.0.1.1, as: 65001}]}",
     "peer 10.0.1.1 listed twice"),
    ("{local_as: 65010, router_id: 10.0.1.1, peers: [{addr: 10.0.1.1, as: 65000}]}", "own router_id"),
])
def test_a_broken_bgp_block_is_refused_in_one_line(block: str, says: str):
    with pytest.raises(ConfigError) as exc:
        load(BASE + f"bgp: {block}\n")
    msg = str(exc.value)
    assert says in msg and "; hint: " in msg and "\n" not in msg


def test_router_id_must_come_from_somewhere():
    with pytest.raises(ConfigError, match="no router_id and no interfaces"):
        load("interfaces: []\nbgp: {local_as: 65010, peers: [{addr: 10.0.1.1, as: 65000}]}\n")


def test_min_healthy_above_the_backends_would_never_announce():
    with pytest.raises(ConfigError, match=r"lb.yaml:5: vips\[0\].min_healthy: min_healthy 3 is more than"):
        load(BASE + "    min_healthy: 3\n")
    assert [e.min_healthy for e in load(BASE + "    min_healthy: 2\n").vips.values()] == [2]
    with pytest.raises(ConfigError, match="min_healthy: 0 is out of range"):
        load(BASE + "    min_healthy: 0\n")


SPEC = BgpSpec(65010, "10.0.1.2", 3, (BgpPeer("10.0.1.1", 65000), BgpPeer("10.0.2.1", 65001)))


def test_rendered_config_announces_exactly_the_given_vips():
    text = bgp.render("host", SPEC, "10.0.1.2", ["10.0.0.11", "10.0.0.9"])
    assert "router id 10.0.1.2;" in text
    routes = [line.strip() for line in text.splitlines() if line.strip().startswith("route ")]
    assert routes == ["route 10.0.0.9/32 blackhole;", "route 10.0.0.11/32 blackhole;"]
    assert "neighbor 10.0.1.1 as 65000;" in text and "neighbor 10.0.2.1 as 65001;" in text
    assert text.count("hold time 3;") == 2 and text.count("keepalive time 1;") == 2
    assert "graceful restart off;" in text
    assert "kernel" not in text          # nothing it learns or announces reaches this node's FIB
    empty = bgp.render("host", SPEC, "10.0.1.2", [])
    assert not [line for line in empty.splitlines() if line.strip().startswith("route ")]


def test_ipv6_vips_are_announced_as_128s_over_the_same_sessions():
    text = bgp.render("host", SPEC, "10.0.1.2", ["fd00::10", "10.0.0.9", "fd00::9"], next_hop6="fd00:1::2")
    routes = [line.strip() for line in text.splitlines() if line.strip().startswith("route ")]
    # Numeric order, not text order (fd00::9 before fd00::10).
    assert routes == ["route 10.0.0.9/32 blackhole;", "route fd00::9/128 blackhole;",
                      "route fd00::10/128 blackhole;"]
    # Each session exports the IPv6 static protocol on its ipv6 channel, the IPv4 one on ipv4.
    assert text.count('export where proto = "lbctl_vips6";') == 2
    assert text.count('export where proto = "lbctl_vips";') == 2
    # The channel is there without IPv6 VIPs too: the first one must not restart the sessions.
    assert bgp.render("host", SPEC, "10.0.1.2", []).count("ipv6 {") == 2


def test_an_ipv6_vip_without_a_next_hop_is_refused():
    with pytest.raises(bgp.BgpError, match="fd00::10/128 without an IPv6 next hop"):
        bgp.render("host", SPEC, "10.0.1.2", ["fd00::10"])


def test_bird_rotates_its_own_log():
    text = bgp.render("host", SPEC, "10.0.1.2", [], log_path="/run/lbctl/x/bird.log", log_limit=4096)
    assert 'log "/run/lbctl/x/bird.log" 4096 "/run/lbctl/x/bird.log.old" {' in text
    assert "log stderr" not in text
    assert f" {bgp.LOG_LIMIT_BYTES} " in bgp.render("host", SPEC, "10.0.1.2", [], log_path="/l")


@pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (lbctl/setup.sh installs bird2)")
@pytest.mark.parametrize("announced", [[], ["10.0.0.10", "10.0.0.11"], ["10.0.0.10", "fd00::10"]])
@pytest.mark.parametrize("logged", [False, True], ids=["stderr", "log-file"])
def test_bird_accepts_what_lbctl_renders(tmp_path: Path, announced: list[str], logged: bool):
    conf = tmp_path / "bird.conf"
    conf.write_text(bgp.render("host", SPEC, "10.0.1.2", announced, next_hop6="fd00:1::2",
                               log_path=str(tmp_path / "bird.log") if logged else None))
    proc = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_protocol_names_give_back_the_peer():
    assert bgp._peer_of(bgp.protocol_name("10.77.2.1")) == "10.77.2.1"
    assert bgp._peer_of("device1") is None

