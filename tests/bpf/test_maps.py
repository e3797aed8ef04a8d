"""LbMaps on the balancer's own pinned maps: whole-table reads and deletes (batch syscalls on
the LRU tracking tables) find, keep and remove exactly the entries they should."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from xdp import codec
from xdp.maps import LbMaps

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads the balancer's maps")

VIP = "10.0.0.10"


def _client(i: int) -> tuple[str, int]:
    return f"10.{100 + i // 60000}.{i // 250 % 240}.{i % 250 + 1}", 1024 + i % 60000


def _flow_entries(vip_id: int, count: int, first: int = 0) -> tuple[bytes, bytes, bytes]:
    """count client->VIP flows of one VIP and their reverse entries, packed for update_batch."""
    flow_keys, rnat_keys, values = [], [], []
    for i in range(first, first + count):
        addr, port = _client(i)
        backend = f"10.0.1.{i % 3 + 11}"
        flow_keys.append(codec.encode_flow_key(addr, port, VIP, 80, "tcp"))
        rnat_keys.append(codec.encode_flow_key(backend, 8080, addr, port, "tcp"))
        values.append(bytes(codec.NatEntry(addr=codec._be32(backend), port=codec._be16(8080),
                                           state=1, backend_id=i % 3, vip_id=vip_id)))
    return b"".join(flow_keys), b"".join(rnat_keys), b"".join(values)


def _frag_entries(vip_id: int, count: int, first: int = 0) -> tuple[bytes, bytes]:
    keys = [codec.encode_frag_key(_client(i)[0], VIP, i, "udp") for i in range(first, first + count)]
    values = [bytes(codec.FragEntry(vip_id=vip_id)) for _ in keys]
    return b"".join(keys), b"".join(values)


def _track(maps: LbMaps, vip_id: int, flows: int, frags: int, first: int) -> None:
    flow_keys, rnat_keys, values = _flow_entries(vip_id, flows, first)
    maps["flows"].update_batch(flow_keys, values, flows)
    maps["rnat"].update_batch(rnat_keys, values, flows)
    frag_keys, frag_values = _frag_entries(vip_id, frags, first)
    maps["frags"].update_batch(frag_keys, frag_values, frags)


def _vip_ids(maps: LbMaps, name: str, entry_type: type) -> list[int]:
    return sorted(entry_type.from_buffer_copy(raw).vip_id for _, raw in maps[name].items())


@pytest.fixture
def maps(lb_maps: LbMaps, clean_dataplane: Callable[[], None]) -> Iterator[LbMaps]:
    clean_dataplane()
    try:
        yield lb_maps
    finally:
        clean_dataplane()


def test_flows_lists_every_tracked_flow_decoded(maps: LbMaps) -> None:
    _track(maps, vip_id=3, flows=5000, frags=0, first=0)
    records = list(maps.flows())
    assert len(records) == 5000
    assert {(r.client, r.client_port) for r in records} == {_client(i) for i in range(5000)}
    first = next(r for r in records if (r.client, r.client_port) == _client(7))
    assert (first.vip, first.vip_port, first.proto, first.backend, first.backend_port,
            first.vip_id, first.state) == (VIP, 80, "tcp", "10.0.1.12", 8080, 3, "established")


def test_forget_flows_removes_one_vips_entries_from_every_tracking_table(maps: LbMaps) -> None:
    _track(maps, vip_id=3, flows=3000, frags=40, first=0)
    _track(maps, vip_id=4, flows=25, frags=2, first=3000)

    assert maps.forget_flows(3) == 3000

    assert _vip_ids(maps, "flows", codec.NatEntry) == [4] * 25
    assert _vip_ids(maps, "rnat", codec.NatEntry) == [4] * 25
    assert _vip_ids(maps, "frags", codec.FragEntry) == [4] * 2
    assert maps.forget_flows(3) == 0


def test_flush_flows_empties_every_tracking_table_and_counts_the_flows(maps: LbMaps) -> None:
    _track(maps, vip_id=1, flows=4500, frags=30, first=0)

    assert maps.flush_flows() == 4500

    for name in ("flows", "rnat", "frags"):
        assert list(maps[name].items()) == [], name
    assert maps.flush_flows() == 0


def test_read_ring_returns_the_ring_written_to_that_vip_and_generation(maps: LbMaps) -> None:
    # The planner counts the slots a change moves against this read: a ring read from the
    # wrong offset (another VIP's, the idle generation) would misreport every change.
    size = maps.limits.ring_size
    rings = {(0, 0): [7] * size, (0, 1): list(range(size)), (1, 0): [(i * 3) % 11 for i in range(size)]}
    for (vip_id, generation), ring in rings.items():
        maps.write_ring(vip_id, generation, ring)
    for (vip_id, generation), ring in rings.items():
        assert list(maps.read_ring(vip_id, generation)) == ring
