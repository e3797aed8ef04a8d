"""Renders the constants header, compiles lb_xdp.c with bcc and loads the XDP program."""
from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from xdp.errors import BccMissingError, CompileError
from xdp.limits import DEFAULT_LIMITS, Limits

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf_programs"
ENTRY_FILE = "lb_xdp.c"
ENTRY_FUNCTION = "xdp_lb"
# The tc build of the same source (bpf_programs/lb_ctx.h): a sched_cls program for the ingress
# hook, compiled with TC_BUILD defined.
TC_ENTRY_FUNCTION = "tc_lb"
TC_BUILD = "LB_TC"


def render_consts(limits: Limits, pin_dir: str) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(BPF_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("lb_consts.h.j2").render(pin_dir=pin_dir.rstrip("/"), **limits.template_vars())


CONSTS_HEADER = "lb_consts.h"
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*\n?", re.MULTILINE)


def expand_includes(text: str, headers: dict[str, str], seen: set[str] | None = None) -> str:
    """`text` with each `#include "NAME"` replaced by the header's own expansion: for a header
    with `#pragma once` the first time NAME appears and by nothing after, for one without
    (lb_snat_af.inc, included once per address family) every time, as clang would. System
    includes (`<...>`) stay for clang. Raises CompileError for a header that is not there."""
    seen = set() if seen is None else seen

    def inline(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        if name not in headers:
            raise CompileError(f"#include \"{name}\": no such header in {BPF_DIR}; "
                               "hint: a header of the program must sit in bpf_programs/")
        body, once = _PRAGMA_ONCE.subn("", headers[name], count=1)
        if once:
            seen.add(name)
        return expand_includes(body, headers, seen)

    return _LOCAL_INCLUDE.sub(inline, text)


def program_headers(limits: Limits, pin_dir: str) -> dict[str, str]:
    """Every header the program may include, by name, the constants header rendered."""
    # *.inc: a template a header includes more than once (lb_snat_af.inc, once per family).
    headers = {path.name: path.read_text()
               for path in sorted([*BPF_DIR.glob("*.h"), *BPF_DIR.glob("*.inc")])}
    headers[CONSTS_HEADER] = render_consts(limits, pin_dir)
    return headers


def render_unit(text: str, limits: Limits, pin_dir: str) -> str:
    """A C unit with its local includes inlined, as bcc compiles it."""
    return expand_includes(text, program_headers(limits, pin_dir))


def render_source(limits: Limits, pin_dir: str) -> str:
    """The whole program as one C text (headers inlined), as bcc would see it: for --print-c."""
    return render_unit((BPF_DIR / ENTRY_FILE).read_text(), limits, pin_dir)


@dataclass
class LoadedProgram:
    """A compiled program; keeps the bcc object alive so its fd stays open."""

    bpf: Any  # bcc.BPF; bcc ships no type information
    fd: int
    pin_dir: str


def _import_bcc():
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BccMissingError(
            "python module 'bcc' not found; hint: apt-get install python3-bpfcc and run lbctl "
            "from a venv made with /usr/bin/python3 -m venv --system-site-packages "
            "(lbctl/setup.sh does both)"
        ) from exc
    return BPF


# A build switch (-D) for `lbctl bench dataplane` only: the entry skips the trace hooks, so
# the cost of tracing compiled in but off is measured against a program without them.
WITHOUT_TRACE = "LB_WITHOUT_TRACE"


# The tc build's IPv6 checksum updates pass the kernel's BPF_F_IPV6 where the kernel knows it
# (bpf_programs/lb_csum.h); a kernel from before it refuses the whole update for the flag.
CSUM_IPV6_FLAG = "LB_CSUM_IPV6_FLAG"
_CSUM_PROBE = """
int csum_probe(struct __sk_buff *skb)
{
    return bpf_l4_csum_replace(skb, 20, 0, 0, BPF_F_PSEUDO_HDR | (1ULL << FLAG_BIT)) == 0;
}
"""


@functools.cache
def csum_flag_known(bit: int) -> bool:
    """Whether bpf_l4_csum_replace takes the flag `1 << bit` here: asked of the kernel itself
    by a test run of a few instructions (so a kernel that backports a flag counts too). A
    failure to ask counts as no."""
    from xdp import libbpf
    BPF = _import_bcc()
    try:
        bpf = BPF(text=_CSUM_PROBE.encode(), cflags=[f"-DFLAG_BIT={int(bit)}"])
        try:
            fd = bpf.load_func(b"csum_probe", BPF.SCHED_CLS).fd
            # Ethernet, then an IPv6 header and 16 bytes: the helper updates bytes 20-21.
            frame = b"\x00" * 12 + b"\x86\xdd" + b"\x60" + b"\x00" * 55
            return libbpf.prog_test_run_skb(fd, frame, socket.if_nametoindex("lo")).retval == 1
        finally:
            bpf.cleanup()
    except Exception:  # noqa: BLE001  (bcc raises bare Exception; the answer is then no)
        return False


def kernel_knows_csum_ipv6_flag() -> bool:
    """BPF_F_IPV6 (bit 7). Without it the update is still made, and only a NIC's complete
    checksum on IPv6 notices (the receiver then checks the segment again in software)."""
    return csum_flag_known(7)


def compile_and_load(pin_dir: str, limits: Limits = DEFAULT_LIMITS,
                     defines: tuple[str, ...] = (), tc: bool = False) -> LoadedProgram:
    """Compiles and loads the program. Its maps are created pinned under pin_dir, or reused
    from there when already pinned (bcc's BPF_TABLE_PINNED). `defines`: build switches such
    as WITHOUT_TRACE, passed to clang as -D. `tc`: the tc build (a sched_cls program) instead
    of the XDP one; both share the pinned maps."""
    BPF = _import_bcc()
    os.makedirs(pin_dir, exist_ok=True)
    kernel_build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(kernel_build):
        raise BccMissingError(
            f"kernel headers not found at {kernel_build}; hint: apt-get install linux-headers-amd64 "
            "(lbctl/setup.sh links them when the running kernel has no headers package)"
        )
    # One inlined text: bcc rewrites map calls (`map.lookup(...)`) only in its main file.
    source = render_source(limits, pin_dir)
    try:
        names = defines
        if tc:
            names = (*names, TC_BUILD, *((CSUM_IPV6_FLAG,) if kernel_knows_csum_ipv6_flag() else ()))
        bpf = BPF(text=source.encode(),
                  cflags=["-Wno-unused-function", *(f"-D{name}" for name in names)])
        fn = (bpf.load_func(TC_ENTRY_FUNCTION.encode(), BPF.SCHED_CLS) if tc
              else bpf.load_func(ENTRY_FUNCTION.encode(), BPF.XDP))
    except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
        raise CompileError(f"cannot compile or load {ENTRY_FILE}: {exc}") from exc
    return LoadedProgram(bpf=bpf, fd=fn.fd, pin_dir=pin_dir)
