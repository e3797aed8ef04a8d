"""The l7 block of the config file: mode: l7 alone gives working defaults, every key loads, and
each broken value is refused in one line naming file, line and field."""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from lbctl.config import DesiredState, L7Route, load_text
from lbctl.errors import ConfigError
from xdp.codec import Endpoint

VIP = Endpoint("10.0.0.10", 80, "tcp")

FULL = """\
interfaces: []
vips:
  - vip: 10.0.0.10:80
    mode: l7
    health: {check: http, path: /healthz}
    l7:
      workers: 2
      balancing: least_outstanding
      pool: {max_size: 16, min_idle: 4, idle_timeout: 30s, warmup: eager}
      limits: {header_timeout: 5s, keepalive_timeout: 20s, max_header_bytes: 16384, max_headers: 50,
               max_body_bytes: 1048576, connect_timeout: 500ms, read_timeout: 3s, drain_timeout: 2s}
      ejection: {failures: 3, cooldown: 5s}
      cache: {max_bytes: 1048576, max_entry_bytes: 65536}
      groups:
        stable: [10.0.1.11:8080, 10.0.1.12:8080]
        canary: [10.0.1.13:8080]
      routes:
        - {host: api.example.com, path_prefix: /v2/, group: canary}
        - {path_prefix: /, split: {stable: 90, canary: 10}}
    backends:
      - {addr: 10.0.1.11:8080, weight: 2}
      - {addr: 10.0.1.12:8080}
      - {addr: 10.0.1.13:8080}
  - vip: 10.0.0.10:443
    backends: [{addr: 10.0.1.11:443}]
"""

MINIMAL = """\
vips:
  - vip: 10.0.0.10:80
    mode: l7
    backends: [{addr: 10.0.1.11:8080}]
"""


def load(text: str) -> DesiredState:
    return load_text(textwrap.dedent(text), "lb.yaml", lambda name: True)


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert "\n" not in message and "hint: " in message
    return message


def with_l7(block: str) -> str:
    return MINIMAL.replace("    mode: l7\n", "    mode: l7\n    l7: " + block + "\n")


def test_mode_l7_alone_has_working_defaults():
    entry = load(MINIMAL).vips[VIP]
    assert entry.mode == "l7" and entry.l7 is not None
    assert entry.l7.balancing == "round_robin" and entry.l7.warmup == "lazy"
    assert entry.l7.header_timeout_ms == 10_000 and entry.l7.max_header_bytes == 32 * 1024
    assert entry.l7.max_headers == 100 and entry.l7.max_body_bytes == 10 * 1024 * 1024
    assert entry.l7.routes == () and entry.l7.workers == 0 and entry.l7.cache_max_bytes == 0


def test_l7_vips_stay_out_of_the_maps():
    state = load(FULL)
    assert set(state.l7_vips()) == {VIP}
    assert set(state.config()) == {Endpoint("10.0.0.10", 443, "tcp")}, \
        "an L7 VIP in the maps would be NATed by XDP before the proxy sees it"


def test_every_key_loads():
    spec = load(FULL).vips[VIP].l7
    assert spec is not None
    assert (spec.workers, spec.balancing, spec.pool_max_size, spec.pool_min_idle) == \
        (2, "least_outstanding", 16, 4)
    assert (spec.pool_idle_timeout_ms, spec.warmup) == (30_000, "eager")
    assert (spec.header_timeout_ms, spec.keepalive_timeout_ms, spec.connect_timeout_ms,
            spec.read_timeout_ms, spec.drain_timeout_ms) == (5000, 20_000, 500, 3000, 2000)
    assert (spec.max_header_bytes, spec.max_headers, spec.max_body_bytes) == (16384, 50, 1048576)
    assert (spec.eject_failures, spec.eject_cooldown_ms) == (3, 5000)
    assert (spec.cache_max_bytes, spec.cache_max_entry_bytes) == (1048576, 65536)
    assert dict(spec.groups) == {"stable": ("10.0.1.11:8080", "10.0.1.12:8080"),
                                 "canary": ("10.0.1.13:8080",)}
    assert spec.routes == (L7Route("api.example.com", "/v2/", (("canary", 1),)),
                           L7Route(None, "/", (("stable", 90), ("canary", 10))))


def test_hash_on_header_or_cookie():
    spec = load(with_l7("{balancing: hash, hash_on: 'header:X-User'}")).vips[VIP].l7
    assert spec is not None and spec.hash_on == ("header", "x-user")
    spec = load(with_l7("{balancing: hash, hash_on: 'cookie:Session'}")).vips[VIP].l7
    assert spec is not None and spec.hash_on == ("cookie", "Session")


@pytest.mark.parametrize("block, where, what", [
    ("{bogus: 1}", "vips[0].l7.bogus", "unknown key 'bogus'"),
    ("{cache: {max_bytes: -1}}", "vips[0].l7.cache.max_bytes", "out of range"),
    ("{pool: {max_sise: 3}}", "vips[0].l7.pool.max_sise", "unknown key"),
    ("{balancing: random}", "vips[0].l7.balancing", "'random' is not one of"),
    ("{balancing: hash}", "vips[0].l7", "balancing hash needs hash_on"),
    ("{hash_on: 'header:X'}", "vips[0].l7", "hash_on is for balancing: hash"),
    ("{balancing: hash, hash_on: 'query:x'}", "vips[0].l7.hash_on", "is not 'header:NAME'"),
    ("{pool: {warmup: eager}}", "vips[0].l7.pool", "min_idle is 0"),
    ("{pool: {enabled: false, warmup: eager, min_idle: 1}}", "vips[0].l7.pool", "the pool is off"),
    ("{pool: {enabled: 'no'}}", "vips[0].l7.pool.enabled", "wrong type"),
    ("{pool: {max_size: 2, min_idle: 3}}", "vips[0].l7.pool", "min_idle 3 is more than max_size 2"),
    ("{pool: {idle_timeout: 60}}", "vips[0].l7.pool.idle_timeout", "has no unit"),
    ("{limits: {header_timeout: soon}}", "vips[0].l7.limits.header_timeout", "is not a duration"),
    ("{limits: {max_headers: 0}}", "vips[0].l7.limits.max_headers", "out of range"),
    ("{limits: {max_body_bytes: '10M'}}", "vips[0].l7.limits.max_body_bytes", "wrong type"),
    ("{routes: [{path_prefix: /}]}", "vips[0].l7.routes[0]", "exactly one of 'group' or 'split'"),
    ("{routes: [{path_prefix: api, group: g}]}", "vips[0].l7.routes[0].path_prefix", "must start with /"),
    ("{routes: [{group: nowhere}]}", "vips[0].l7.routes[0].group", "unknown group 'nowhere'"),
    ("{groups: {g: [10.0.1.99:8080]}}", "vips[0].l7.groups.g[0]", "not a backend of this VIP"),
    ("{groups: {g: []}}", "vips[0].l7.groups.g", "group 'g' is empty"),
    ("{groups: {g: [10.0.1.11:8080]}, routes: [{split: {g: 0}}]}", "vips[0].l7.routes[0].split",
     "add up to 0"),
    ("{tls: {cert: /nonexistent.pem, key: /nonexistent.key}}", "vips[0].l7.tls",
     "cannot load the certificate"),
])
def test_broken_l7_values_are_refused(block: str, where: str, what: str):
    msg = refused(with_l7(block))
    assert msg.startswith(f"lb.yaml:4: {where}: "), msg
    assert what in msg


def test_l7_block_on_an_l4_vip_is_refused():
    msg = refused(with_l7("{workers: 1}").replace("mode: l7", "mode: l4"))
    assert "vips[0]: an 'l7' block is for mode: l7 VIPs only" in msg


def test_l7_over_udp_is_refused():
    msg = refused(MINIMAL.replace("mode: l7", "mode: l7\n    proto: udp"))
    assert "mode l7 serves HTTP over tcp" in msg


def test_tls_files_made_now_load(tmp_path: Path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=lbctl-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    spec = load(with_l7(f"{{tls: {{cert: {cert}, key: {key}}}}}")).vips[VIP].l7
    assert spec is not None and (spec.tls_cert, spec.tls_key) == (str(cert), str(key))
    msg = refused(with_l7(f"{{tls: {{cert: {cert}, key: {cert}}}}}"))
    assert "vips[0].l7.tls: cannot load the certificate" in msg


class _NoController:
    instance = "unit"


def test_the_agent_keeps_l7_vips_out_of_the_maps_it_applies():
    from lbctl.agent import Agent
    agent = Agent(_NoController(), "lb.yaml", "127.0.0.1:0")  # type: ignore[arg-type]
    agent.state = load(FULL)
    assert set(agent.effective()) == {Endpoint("10.0.0.10", 443, "tcp")}
