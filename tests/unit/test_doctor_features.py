"""doctor's LRO check read from real `ethtool -k` output. No interface on this host can have
LRO on (veth, tap and bridge fix it off; macvlan leaves it 'off [requested on]' over a veth;
the kernel has no netdevsim), so the fault cannot be injected in a lab: the check's logic runs
here against recorded output instead.

Fixtures (tests/unit/fixtures/), recorded with ethtool 6.1 on kernel 6.18:
- ethtool-k-veth.txt: a veth end, as `ethtool -k` printed it;
- ethtool-k-macvlan-lro-requested.txt: a macvlan over a veth after `ethtool -K mv0 lro on`,
  which the device refused ('off [requested on]');
- ethtool-k-lro-on.txt: the veth recording with its one large-receive-offload line edited to
  'on', the way a NIC with LRO on prints it (the only line not recorded)."""
from __future__ import annotations

from pathlib import Path

from lbctl.doctor import lro_check, parse_features

FIXTURES = Path(__file__).parent / "fixtures"


def features(name: str) -> dict[str, str]:
    return parse_features((FIXTURES / name).read_text())


def test_lro_on_is_named_with_its_fix() -> None:
    check = lro_check("eth0", features("ethtool-k-lro-on.txt"))
    assert not check.ok
    assert check.name == "lro" and check.subject == "eth0"
    assert check.fix == "ethtool -K eth0 lro off"


def test_lro_fixed_off_passes() -> None:
    assert lro_check("eth0", features("ethtool-k-veth.txt")).ok


def test_lro_requested_but_refused_by_the_device_is_off() -> None:
    """'off [requested on]' is the device's state (off), not the request."""
    parsed = features("ethtool-k-macvlan-lro-requested.txt")
    assert parsed["large-receive-offload"] == "off"
    assert lro_check("mv0", parsed).ok


def test_sub_features_and_fixed_flags_are_read_by_name() -> None:
    parsed = features("ethtool-k-veth.txt")
    assert parsed["tx-checksumming"] == "on"             # what the tx_checksum check reads
    assert parsed["tx-checksum-ipv4"] == "off"           # an indented sub-feature, '[fixed]'
    assert parsed["generic-receive-offload"] == "off"    # what the veth_gro check reads
    assert "Features for va" not in parsed
