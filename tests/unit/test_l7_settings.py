"""The proxy's settings cross a process boundary: the config's L7Spec (durations in ms) is
sent to each worker as JSON and read back as L7Settings (seconds). The two are written field
by field, so this proves they agree: same fields, same defaults, after the unit change."""
from __future__ import annotations

import json
from dataclasses import fields

from lbctl.config import L7Spec
from lbctl.l7.proxy import L7Settings
from lbctl.l7.supervisor import settings_dict
from lbctl.l7.worker import settings_of


def test_every_spec_field_reaches_the_worker_and_nothing_else() -> None:
    sent = set(settings_dict(L7Spec()))
    received = {f.name for f in fields(L7Settings)}
    assert sent == received, f"only in the config: {sent - received}; only in the worker: {received - sent}"


def test_the_configs_defaults_are_the_workers_defaults_after_a_json_round_trip() -> None:
    assert settings_of(json.loads(json.dumps(settings_dict(L7Spec())))) == L7Settings()


def test_durations_arrive_in_seconds() -> None:
    got = settings_of(json.loads(json.dumps(settings_dict(L7Spec(header_timeout_ms=2500)))))
    assert got.header_timeout_s == 2.5
