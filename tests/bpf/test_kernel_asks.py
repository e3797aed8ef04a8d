"""What the builds ask of the kernel: whether bpf_l4_csum_replace takes BPF_F_IPV6 (the tc
build's checksum updates, bpf_programs/lb_csum.h; a kernel from before the flag refuses the
whole update for it), and how much of the verifier's budget each build needs."""
from __future__ import annotations

import os

import pytest

from xdp import libbpf
from xdp.program import LoadedProgram, csum_flag_known

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loads and test-runs a sched_cls program")


def test_the_probe_knows_a_flag_every_kernel_takes_and_refuses_one_none_does() -> None:
    assert csum_flag_known(4)           # BPF_F_PSEUDO_HDR, since Linux 4.1
    assert not csum_flag_known(15)      # no such flag


def test_the_probe_runs_once_per_process() -> None:
    """Asked twice, answered once (functools.cache): the tc build's reload does not compile
    the probe again."""
    csum_flag_known.cache_clear()
    csum_flag_known(7)
    csum_flag_known(7)
    assert csum_flag_known.cache_info().misses == 1 and csum_flag_known.cache_info().hits == 1


# The verifier's limit on instructions processed for one program (BPF_COMPLEXITY_LIMIT_INSNS).
VERIFIER_LIMIT = 1_000_000


@pytest.mark.parametrize("build", ["xdp", "tc"])
def test_each_build_leaves_the_verifier_most_of_its_budget(build: str, lb_program: LoadedProgram,
                                                           lb_tc_program: LoadedProgram) -> None:
    """Another kernel's verifier prunes differently, and every feature adds paths: a build
    that needs most of the 1M instructions here may be refused elsewhere. Both builds took
    941k and 970k before lb_parse6.h passed the L4 offset through a map entry (the IPv6
    path was checked once per extension-header count); now about 260k. Half the limit is the
    line to hold."""
    prog = lb_program if build == "xdp" else lb_tc_program
    used = libbpf.prog_info(prog.fd).verified_insns
    assert 0 < used <= VERIFIER_LIMIT // 2, (
        f"the {build} build took {used:,} verifier instructions of {VERIFIER_LIMIT:,}")
