"""Proves the Python side describes the program's maps as the C side made them: xdp/codec.py's
ctypes mirrors lay out every key and value exactly as clang did (bcc builds each table's
Key/Leaf types from clang's own record layout of lb_structs.h), xdp/maps.py's table has each
map's type and size, and the ring index is computed alike."""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
from typing import Any

import pytest

from xdp import libbpf
from xdp.limits import DEFAULT_LIMITS, Limits
from xdp.maps import MAPS, MapShape
from xdp.program import LoadedProgram, render_consts

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads XDP programs and BPF maps")


def _layout(ctype: Any) -> tuple[int, list[tuple[str, int, int]]]:
    """(sizeof, [(field, offset, size)]) of a struct; (sizeof, []) of a scalar. Padding that
    bcc makes explicit (`__pad_*` members) is left out: only named fields carry meaning."""
    if not hasattr(ctype, "_fields_"):
        return ctypes.sizeof(ctype), []
    fields = []
    for spec in ctype._fields_:
        name = spec[0]
        if name.startswith("__pad"):
            continue
        member = getattr(ctype, name)
        fields.append((name, member.offset, member.size))
    return ctypes.sizeof(ctype), fields


def _clang_types(table: Any) -> tuple[Any, Any]:
    # bcc turns a per-CPU map's Leaf into an array of one value per CPU; sLeaf is one value.
    return table.Key, getattr(table, "sLeaf", table.Leaf)


# A ring buffer has no keys or values (the kernel reports size 0); its events are checked below.
KEYED_MAPS = sorted(name for name, spec in MAPS.items() if spec.map_type != libbpf.MapType.RINGBUF)


@pytest.mark.parametrize("map_name", KEYED_MAPS)
def test_codec_mirror_matches_clang_layout(lb_program: LoadedProgram, map_name: str) -> None:
    spec = MAPS[map_name]
    clang_key, clang_value = _clang_types(lb_program.bpf[map_name.encode()])  # type: ignore[index]

    assert _layout(spec.key_type) == _layout(clang_key), f"{map_name} key"
    assert _layout(spec.value_type) == _layout(clang_value), f"{map_name} value"


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_map_table_has_the_type_and_size_the_program_declared(lb_program: LoadedProgram,
                                                               map_name: str) -> None:
    fd = lb_program.bpf[map_name.encode()].map_fd  # type: ignore[index]
    assert MapShape.of(libbpf.map_info(fd)) == MAPS[map_name].shape(DEFAULT_LIMITS)


def test_trace_event_mirror_matches_clang_layout(lb_program: LoadedProgram) -> None:
    """The events `lbctl trace` decodes are laid out as the program writes them (the per-CPU
    scratch entry holds the event the program sends)."""
    from xdp.tracing import TraceEvent, TraceTuple

    scratch = _clang_types(lb_program.bpf[b"trace_scratch"])[1]  # type: ignore[index]
    clang_event = {f[0]: f[1] for f in scratch._fields_}["ev"]
    clang_tuple = {f[0]: f[1] for f in clang_event._fields_}["out"]
    assert _layout(TraceTuple) == _layout(clang_tuple)
    ours = _layout(TraceEvent)
    # The mirror spells the C member `in` as `in_` (a Python keyword).
    assert (ours[0], [(n.rstrip("_"), o, sz) for n, o, sz in ours[1]]) == _layout(clang_event)


def test_every_map_the_program_pins_has_a_mirror(lb_program: LoadedProgram) -> None:
    assert set(os.listdir(lb_program.pin_dir)) == set(MAPS)


def test_pinned_maps_of_another_build_are_refused_before_loading() -> None:
    """An upgrade that changed a map must say so with a hint, not fail in the verifier or run
    a program against maps laid out for another build."""
    import secrets
    import shutil

    from xdp.balancer import Balancer
    from xdp.errors import IncompatibleMapsError
    from xdp.limits import Limits

    instance = "tcompat-" + secrets.token_hex(3)
    first = Balancer(instance)
    try:
        first._program_fd(fresh=True)
        first.close()
        pinned_before = sorted(os.listdir(first.pin_dir))
        other_build = Balancer(instance, Limits(flow_table_size=1024))
        with pytest.raises(IncompatibleMapsError, match="detach --all --purge"):
            other_build._program_fd(fresh=True)
        assert other_build._loaded is None                   # nothing was compiled or loaded
        assert sorted(os.listdir(first.pin_dir)) == pinned_before
    finally:
        first.close()
        shutil.rmtree(first.pin_dir, ignore_errors=True)


@pytest.mark.parametrize("added", ["frags", "snat_flows6", "snat_rnat6"])
def test_pinned_maps_of_an_older_build_without_a_newer_map_are_refused(added: str) -> None:
    """Maps pinned before a map was added (frags; full-NAT over IPv6's two) are another build
    too: the same hint, not "not set up"."""
    import secrets
    import shutil

    from xdp.balancer import Balancer
    from xdp.errors import IncompatibleMapsError

    instance = "tcompat-" + secrets.token_hex(3)
    first = Balancer(instance)
    try:
        first._program_fd(fresh=True)
        first.close()
        os.unlink(os.path.join(first.pin_dir, added))
        older = Balancer(instance)
        with pytest.raises(IncompatibleMapsError, match=f"no '{added}' map.*detach --all --purge") as exc:
            older._program_fd(fresh=True)
        assert exc.value.exit_code == 6
        assert older._loaded is None
    finally:
        first.close()
        shutil.rmtree(first.pin_dir, ignore_errors=True)


def test_a_pinned_snat_cfg_of_the_build_before_ipv6_full_nat_is_refused() -> None:
    """snat_cfg grew its IPv6 addresses (40 -> 168 bytes a value): the older map is refused
    before anything is compiled, with the purge hint."""
    import secrets
    import shutil

    from xdp.balancer import Balancer
    from xdp.errors import IncompatibleMapsError

    instance = "tcompat-" + secrets.token_hex(3)
    first = Balancer(instance)
    try:
        first._program_fd(fresh=True)
        first.close()
        path = os.path.join(first.pin_dir, "snat_cfg")
        os.unlink(path)
        fd, err = libbpf._call("bpf_map_create", libbpf.MapType.ARRAY, b"snat_cfg", 4, 40,
                               DEFAULT_LIMITS.max_vips, None)
        assert not err, os.strerror(err)
        libbpf.obj_pin(fd, path)
        libbpf.close(fd)
        older = Balancer(instance)
        with pytest.raises(IncompatibleMapsError, match=r"snat_cfg is array, key 4 B, value 40 B.*"
                                                        r"expects array, key 4 B, value 168 B.*"
                                                        r"detach --all --purge") as exc:
            older._program_fd(fresh=True)
        assert exc.value.exit_code == 6
        assert older._loaded is None
    finally:
        first.close()
        shutil.rmtree(first.pin_dir, ignore_errors=True)


# LB_RING_INDEX and LB_RING_ENTRIES run in the program with each case's inputs from the frame.
RING_INDEX_PROGRAM = """
#include <uapi/linux/bpf.h>
{consts}
int ring_index(struct xdp_md *ctx) {{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 *word = data + 14;

    if ((void *)(word + 5) > data_end)
        return XDP_ABORTED;
    word[3] = LB_RING_INDEX(word[0], word[1], word[2]);
    word[4] = LB_RING_ENTRIES;
    return XDP_PASS;
}}
"""


@pytest.mark.parametrize("limits", [Limits(), Limits(max_vips=5, ring_size=251)],
                         ids=["shipped", "small"])
def test_c_ring_index_is_the_python_one(limits: Limits) -> None:
    """The program and the control plane must agree where each VIP's ring lives, or a ring
    written by lbctl is read as another VIP's (or as empty)."""
    from bcc import BPF  # type: ignore[import-untyped]

    consts = render_consts(limits, "/sys/fs/bpf/unused")
    bpf = BPF(text=RING_INDEX_PROGRAM.format(consts=consts).encode())
    try:
        fd = bpf.load_func(b"ring_index", BPF.XDP).fd
        last_vip, last_slot = limits.max_vips - 1, limits.ring_size - 1
        for vip_id, generation, slot in itertools.product(
                (0, 1, last_vip), (0, 1, 2, 7, 0xFFFFFFFF), (0, 1, last_slot)):
            frame = bytes(14) + struct.pack("=5I", vip_id, generation, slot, 0, 0)
            out = libbpf.prog_test_run(fd, frame)
            c_index, c_entries = struct.unpack("=2I", out.data_out[26:34])
            assert c_index == limits.ring_index(vip_id, generation, slot), (vip_id, generation, slot)
            assert c_entries == limits.ring_entries
        assert limits.ring_index(last_vip, 1, last_slot) == limits.ring_entries - 1
    finally:
        bpf.cleanup()
