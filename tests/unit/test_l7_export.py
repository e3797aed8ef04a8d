"""`lbctl export` writes mode: l7 VIPs with their l7 blocks: every key of the block comes back
as it was loaded, the text is stable through load and dump, and VIPs the agent publishes (the
maps never hold an L7 VIP) come out in address order among the maps' VIPs."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import yaml
from test_l7_config import FULL, MINIMAL, VIP

from lbctl.config import DesiredState, dump, load_text, vip_item


def load(text: str) -> DesiredState:
    return load_text(textwrap.dedent(text), "lb.yaml", lambda name: True)


def round_trip(state: DesiredState) -> str:
    return dump(list(state.interfaces), state.xdp_mode, state.vips)


def test_every_l7_key_survives_export_and_load(tmp_path: Path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    text = FULL.replace("      balancing: least_outstanding\n",
                        "      balancing: hash\n      hash_on: 'header:X-User'\n"
                        f"      tls: {{cert: {cert}, key: {key}}}\n"
                        "      http2: {tls: false, cleartext: false, max_concurrent_streams: 16,"
                        " stream_window_bytes: 131072}\n")
    state = load(text)
    exported = round_trip(state)
    again = load(exported)
    assert again.vips == state.vips, "an l7 key was lost or changed on the way"
    assert round_trip(again) == exported, "export of the exported file differs"
    item = next(v for v in yaml.safe_load(exported)["vips"] if v["vip"] == "10.0.0.10:80")
    assert item["mode"] == "l7"
    assert set(item["l7"]) == {"workers", "balancing", "hash_on", "pool", "limits", "ejection", "cache",
                               "groups", "routes", "tls", "http2"}
    assert item["l7"]["routes"][1] == {"path_prefix": "/", "split": {"stable": 90, "canary": 10}}
    assert item["l7"]["limits"]["connect_timeout"] == "500ms"


def test_an_l7_vip_with_defaults_exports_without_a_block():
    state = load(MINIMAL)
    item = yaml.safe_load(round_trip(state))["vips"][0]
    assert item["mode"] == "l7" and "l7" not in item
    assert load(round_trip(state)).vips == state.vips


def test_published_l7_vips_merge_in_address_order_with_the_maps_vips():
    state = load(FULL)
    l4 = {v: e for v, e in state.vips.items() if e.mode == "l4"}
    # What the agent publishes is JSON: the items must survive it unchanged.
    published = json.loads(json.dumps([vip_item(v, e) for v, e in state.l7_vips().items()]))
    text = dump([], "native", l4, published)
    assert [v["vip"] for v in yaml.safe_load(text)["vips"]] == ["10.0.0.10:80", "10.0.0.10:443"]
    assert load(text).vips == state.vips
    assert VIP in load(text).l7_vips()


def test_pool_off_survives_export():
    state = load(MINIMAL.replace("    mode: l7\n", "    mode: l7\n    l7: {pool: {enabled: false}}\n"))
    assert yaml.safe_load(round_trip(state))["vips"][0]["l7"] == {"pool": {"enabled": False}}
    assert load(round_trip(state)).vips == state.vips
