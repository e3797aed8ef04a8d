"""The proxy's settings cross a process boundary: the config's L7Spec is sent to each worker as
JSON and read back as L7Settings, which is the L7Spec class itself plus derived units. This
proves nothing is lost or changed on the way, and that the derived units are right."""
from __future__ import annotations

import json
from dataclasses import asdict, fields

from lbctl.config import L7Route, L7Spec, load_text
from lbctl.l7.proxy import L7Settings
from lbctl.l7.supervisor import settings_dict
from lbctl.l7.worker import settings_of


def _through_the_wire(spec: L7Spec) -> L7Settings:
    return settings_of(json.loads(json.dumps(settings_dict(spec))))


def test_the_worker_gets_every_field_of_the_spec_with_its_value() -> None:
    spec = L7Spec(balancing="hash", hash_on=("header", "X-User"), header_timeout_ms=2500,
                  groups=(("blue", ("b1", "b2")), ("green", ("b3",))),
                  routes=(L7Route("api.example.com", "/v1", (("blue", 90), ("green", 10))),
                          L7Route(None, "/", (("blue", 1),))),
                  tls_cert="/c.pem", tls_key="/k.pem", cache_max_bytes=1 << 20)
    got = _through_the_wire(spec)
    assert asdict(got) == asdict(spec)
    assert {f.name for f in fields(L7Settings)} == {f.name for f in fields(L7Spec)}


def test_a_files_l7_block_reaches_the_worker_whole() -> None:
    state = load_text("""
interfaces: []
vips:
  - vip: 10.0.0.1:80
    mode: l7
    l7:
      balancing: least_outstanding
      limits: {header_timeout: 1500ms, read_timeout: 400ms}
    backends:
      - {addr: 10.0.1.1:8080}
""")
    (entry,) = state.l7_vips().values()
    assert entry.l7 is not None
    got = _through_the_wire(entry.l7)
    assert asdict(got) == asdict(entry.l7)
    assert got.balancing == "least_outstanding"
    assert (got.header_timeout_s, got.read_timeout_s) == (1.5, 0.4)


def test_durations_arrive_in_seconds_and_groups_as_a_mapping() -> None:
    got = _through_the_wire(L7Spec(header_timeout_ms=2500, read_timeout_ms=30,
                                   groups=(("blue", ("b1", "b2")),)))
    assert got.header_timeout_s == 2.5
    assert got.read_timeout_s == 0.03
    assert got.keepalive_timeout_s == L7Spec().keepalive_timeout_ms / 1000
    assert got.group_members == {"blue": ["b1", "b2"]}


def test_every_duration_in_the_spec_has_its_seconds() -> None:
    settings = L7Settings()
    for f in fields(L7Spec):
        if f.name.endswith("_ms"):
            assert getattr(settings, f.name[:-3] + "_s") == getattr(settings, f.name) / 1000
