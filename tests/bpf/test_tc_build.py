"""What the tc build asks of the kernel before it is compiled: whether bpf_l4_csum_replace
takes BPF_F_IPV6 (bpf_programs/lb_csum.h; a kernel from before the flag refuses the whole
update for it). The probe must tell a flag the kernel knows from one it does not."""
from __future__ import annotations

import os

import pytest

from xdp.program import csum_flag_known

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
