"""The XDP mode chosen per driver when --mode is not given: the table, the reasons status shows,
the driver lookup, and how the CLI passes (or does not pass) a mode."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lbctl.cli import Context, main
from lbctl.control import AttachResult
from xdp.balancer import Attachment
from xdp.errors import AttachError
from xdp.modes import (
    GENERIC,
    MODE_BY_DRIVER,
    NATIVE,
    TC,
    default_mode,
    driver_of,
    link_type_of,
    mode_reason,
    require_ethernet,
)


def test_veth_defaults_to_tc_and_points_at_the_figures():
    choice = default_mode("veth")
    assert choice.mode == TC
    assert "copies" in choice.reason and "docs/real-hosts.md" in choice.reason


@pytest.mark.parametrize("driver", ["ice", "i40e", "mlx5_core", "virtio_net", "ena", "tun"])
def test_nic_drivers_default_to_native(driver):
    assert default_mode(driver).mode == NATIVE
    assert driver in default_mode(driver).reason


@pytest.mark.parametrize("driver", ["bridge", "vxlan", "macvlan", "ifb"])
def test_drivers_without_native_xdp_default_to_generic(driver):
    assert default_mode(driver) == MODE_BY_DRIVER[driver]
    assert default_mode(driver).mode == GENERIC and "no native XDP" in default_mode(driver).reason


def test_an_interface_without_driver_name_gets_native():
    assert default_mode(None).mode == NATIVE


def test_the_table_holds_only_known_modes():
    assert {c.mode for c in MODE_BY_DRIVER.values()} <= {NATIVE, GENERIC, TC}


def test_reason_names_the_override_when_mode_is_not_the_default():
    assert mode_reason("veth", TC) == default_mode("veth").reason
    override = mode_reason("veth", NATIVE)
    assert "--mode native" in override and "veth defaults to tc" in override
    assert "--mode generic" in mode_reason("ice", GENERIC)


def test_loopback_reports_no_driver():
    assert driver_of("lo") is None


def test_an_unknown_interface_is_an_attach_error():
    with pytest.raises(AttachError, match="unknown interface 'nosuch0'"):
        driver_of("nosuch0")
    with pytest.raises(AttachError, match="unknown interface 'nosuch0'"):
        require_ethernet("nosuch0")


def test_loopback_is_refused_by_its_link_type():
    """ARPHRD_LOOPBACK (772); tests/netns/test_attach.py tries a tun device (link type none)."""
    assert link_type_of("lo") == 772
    with pytest.raises(AttachError, match="cannot attach on 'lo': it is the loopback interface"):
        require_ethernet("lo")


class _Controller:
    """Stands in for lbctl.control.Controller: records attach's arguments, reports a status."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def attach(self, ifnames: list[str], mode: str | None, fresh: bool = False) -> AttachResult:
        self.calls.append(("attach", ifnames, mode))
        chosen = mode or default_mode("veth").mode
        return AttachResult([Attachment(n, i + 2, chosen, 7, "veth", mode_reason("veth", chosen))
                             for i, n in enumerate(ifnames)], None, [])

    def status(self) -> dict:
        return {"instance": "host", "pin_dir": "/sys/fs/bpf/lbctl/host", "prog_id": 7, "vips": 0,
                "backends": 0, "maps": True,
                "attached": [{"ifname": "eth0", "ifindex": 2, "mode": "tc", "prog_id": 7,
                              "driver": "veth", "why": mode_reason("veth", "tc")},
                             {"ifname": "eth1", "ifindex": 3, "mode": "native", "prog_id": 7,
                              "driver": "veth", "why": mode_reason("veth", "native")}]}


def _run(ctl: _Controller, *args: str):
    return CliRunner().invoke(main, list(args), obj=Context("host", lambda _i: ctl))


def test_attach_without_mode_leaves_the_choice_to_the_driver_table():
    ctl = _Controller()
    result = _run(ctl, "attach", "eth0", "eth1")
    assert result.exit_code == 0, result.output
    assert ctl.calls == [("attach", ["eth0", "eth1"], None)]
    assert "attached eth0 (tc, prog 7): veth: tc keeps the socket buffer" in result.output


def test_attach_mode_overrides_the_table():
    ctl = _Controller()
    result = _run(ctl, "attach", "eth0", "--mode", "native")
    assert result.exit_code == 0, result.output
    assert ctl.calls == [("attach", ["eth0"], "native")]
    assert "(native, prog 7): set by --mode native" in result.output


def test_status_says_which_mode_each_interface_got_and_why():
    result = _run(_Controller(), "status")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("IFACE"))
    assert header.split() == ["IFACE", "MODE", "PROG", "WHY"]
    eth0 = next(line for line in lines if line.startswith("eth0"))
    eth1 = next(line for line in lines if line.startswith("eth1"))
    assert eth0.split()[1] == "tc" and "keeps the socket buffer as it is" in eth0
    assert eth1.split()[1] == "native" and "veth defaults to tc" in eth1
    data = json.loads(_run(_Controller(), "status", "--json").output)
    assert [(a["mode"], a["driver"]) for a in data["attached"]] == [("tc", "veth"), ("native", "veth")]
