"""Every header of the XDP program compiles alone through bcc: it includes what it uses, so
it can be read, reused and reordered without depending on what an entry file included first."""

from __future__ import annotations

import os
import re
import secrets
import shutil

import pytest

from xdp.limits import Limits
from xdp.maps import pin_dir_for
from xdp.program import BPF_DIR, CONSTS_HEADER, ENTRY_FILE, TC_BUILD, _import_bcc, render_unit

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: bcc creates the pinned maps a header declares")

# Small tables: a header's maps are created (and pinned) by the compile; their size is not
# what is tested.
SMALL = Limits(max_vips=2, max_backends=8, ring_size=13, flow_table_size=64, frag_table_size=64)

HEADERS = sorted({p.name for p in BPF_DIR.glob("lb_*.h")} | {CONSTS_HEADER})

# The unit: the header, and one function that uses nothing from it, so that bcc has a
# program to compile and clang still checks every declaration and inline body it brings.
UNIT = """#include "{header}"
int bx_header_alone(struct xdp_md *ctx)
{{
    return 2;
}}
"""


@pytest.fixture
def pin_dir() -> str:
    path = pin_dir_for(f"bxhdr-{secrets.token_hex(4)}")
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_every_header_opens_with_a_banner_and_pragma_once() -> None:
    for name in HEADERS:
        path = BPF_DIR / (name + ".j2" if name == CONSTS_HEADER else name)
        lines = path.read_text().splitlines()
        assert lines[0].startswith(f"/* {name}: "), f"{name}: first line is not its banner"
        assert "#pragma once" in lines, f"{name}: no #pragma once"


def test_the_entry_file_reaches_every_header() -> None:
    """A header nobody includes is dead code the compile-alone test would keep alive."""
    text = render_unit((BPF_DIR / ENTRY_FILE).read_text(), SMALL, "/nonexistent")
    for name in HEADERS:
        banner = f"/* {name}: "
        assert text.count(banner) == 1, f"{name} is inlined {text.count(banner)} times"
    assert not re.search(r'#\s*include\s+"', text)


# Templates a header includes once per instance (lb_snat_af.inc: once per address family);
# they compile as part of the headers that include them, each of which compiles alone.
TEMPLATES = {"lb_snat_af.inc": ("lb_snat.h", "lb_snat6.h")}


def test_every_template_is_inlined_once_per_header_that_instantiates_it() -> None:
    assert sorted(p.name for p in BPF_DIR.glob("*.inc")) == sorted(TEMPLATES)
    text = render_unit((BPF_DIR / ENTRY_FILE).read_text(), SMALL, "/nonexistent")
    for name, users in TEMPLATES.items():
        assert (BPF_DIR / name).read_text().startswith(f"/* {name}: ")
        assert text.count(f"/* {name}: ") == len(users), f"{name} is not inlined once per user"
        for user in users:
            assert f'#include "{name}"' in (BPF_DIR / user).read_text()


@pytest.mark.parametrize("build", ["xdp", "tc"])
@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone(header: str, build: str, pin_dir: str) -> None:
    """In both builds: the tc one (-DLB_TC) brings its own parts (lb_ctx.h, lb_csum.h)."""
    BPF = _import_bcc()
    source = render_unit(UNIT.format(header=header), SMALL, pin_dir)
    defines = [f"-D{TC_BUILD}"] if build == "tc" else []
    try:
        bpf = BPF(text=source.encode(), cflags=["-Wno-unused-function", *defines])
    except Exception as exc:  # noqa: BLE001  (bcc raises bare Exception; clang wrote to stderr)
        pytest.fail(f"{header} does not compile alone (clang's errors above): {exc}")
    try:
        bpf.load_func(b"bx_header_alone", BPF.XDP)
    finally:
        bpf.cleanup()
