"""Proves xdp/codec.py's ctypes mirrors lay out every map key and value exactly as clang did:
bcc builds each table's Key/Leaf types from clang's own record layout of lb_structs.h."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pytest

from xdp import codec
from xdp.program import LoadedProgram

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


@pytest.mark.parametrize("map_name", sorted(codec.MAP_LAYOUTS))
def test_codec_mirror_matches_clang_layout(lb_program: LoadedProgram, map_name: str) -> None:
    key_type, value_type = codec.MAP_LAYOUTS[map_name]
    clang_key, clang_value = _clang_types(lb_program.bpf[map_name.encode()])  # type: ignore[index]

    assert _layout(key_type) == _layout(clang_key), f"{map_name} key"
    assert _layout(value_type) == _layout(clang_value), f"{map_name} value"


def test_every_map_the_program_pins_has_a_mirror(lb_program: LoadedProgram) -> None:
    assert set(os.listdir(lb_program.pin_dir)) == set(codec.MAP_LAYOUTS)


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


def test_pinned_maps_of_an_older_build_without_a_newer_map_are_refused() -> None:
    """Maps pinned before a map was added (frags) are another build too: the same hint, not
    "not set up"."""
    import secrets
    import shutil

    from xdp.balancer import Balancer
    from xdp.errors import IncompatibleMapsError

    instance = "tcompat-" + secrets.token_hex(3)
    first = Balancer(instance)
    try:
        first._program_fd(fresh=True)
        first.close()
        os.unlink(os.path.join(first.pin_dir, "frags"))
        older = Balancer(instance)
        with pytest.raises(IncompatibleMapsError, match="no 'frags' map.*detach --all --purge"):
            older._program_fd(fresh=True)
        assert older._loaded is None
    finally:
        first.close()
        shutil.rmtree(first.pin_dir, ignore_errors=True)
