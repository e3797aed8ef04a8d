"""Full-NAT's settings on every path a user gives them: `vip add --snat/--snat-ports`, the
config file's `snat:`/`snat_ports:` keys, the planner (which writes them before the VIP entry
that makes a VIP full-NAT), and `export`; bad values are one line, exit 2, nothing changed."""

from __future__ import annotations

import re
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner

from lbctl import planner
from lbctl.cli import Context, main
from lbctl.config import dump, load_text
from lbctl.control import Controller
from lbctl.errors import ConfigError
from lbctl.model import (
    SNAT_PORTS_DEFAULT,
    VipSpec,
    check_vip,
    parse_endpoint,
    parse_port_range,
    parse_snat_addrs,
)
from xdp.codec import Endpoint
from xdp.limits import DEFAULT_LIMITS, DP_FLAGS, Limits

VIP = Endpoint("10.0.0.10", 80, "tcp")


# --- the model ---

def test_snat_addresses_parse_from_a_comma_list_or_a_list() -> None:
    assert parse_snat_addrs("10.0.1.2, 10.0.1.3") == ("10.0.1.2", "10.0.1.3")
    assert parse_snat_addrs(["10.0.1.2"]) == ("10.0.1.2",)


@pytest.mark.parametrize(("text", "fragment"), [
    ("10.0.1", "not an IPv4 or IPv6 address"), ("127.0.0.1", "not a unicast host address"),
    ("::1", "not a unicast host address"), ("fe80::1", "not a unicast host address"),
    ("::ffff:10.0.1.2", "not a unicast host address"), ("ff02::1", "not a unicast host address"),
    ("10.0.1.2,2001:db8:1::2", "mix IPv4 and IPv6"), ("2001:db8:1::2,2001:DB8:1:0::2", "listed twice"),
    ("224.0.0.1", "not a unicast host address"), ("10.0.1.2,10.0.1.2", "listed twice"),
    (",".join(f"10.0.1.{i}" for i in range(1, 2 + DEFAULT_LIMITS.snat_max_addrs)), "at most"),
])
def test_bad_snat_addresses_are_refused_with_a_hint(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as exc:
        parse_snat_addrs(text)
    assert "hint:" in str(exc.value)


def test_port_ranges_parse_and_a_single_port_is_a_range_of_one() -> None:
    assert parse_port_range("1024-65535") == (1024, 65535)
    assert parse_port_range("5000") == (5000, 5000)


@pytest.mark.parametrize("text", ["0-100", "2000-1000", "1-65536", "a-b", "1024-", "-5"])
def test_bad_port_ranges_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="hint:"):
        parse_port_range(text)


def test_the_default_range_stays_below_linuxs_ephemeral_ports() -> None:
    assert SNAT_PORTS_DEFAULT[1] < 32768      # net.ipv4.ip_local_port_range starts there


VIP6 = Endpoint("2001:db8::10", 80, "tcp")


def test_ipv6_snat_addresses_parse_to_their_canonical_form() -> None:
    assert parse_snat_addrs("2001:DB8:1:0::2, 2001:db8:1::3") == ("2001:db8:1::2", "2001:db8:1::3")


def test_full_nat_on_an_ipv6_vip_is_accepted_with_or_without_ipv6_snat_addresses() -> None:
    check_vip(VipSpec(VIP6, forwarding="fullnat"))
    check_vip(VipSpec(VIP6, forwarding="fullnat", snat=("2001:db8:1::2",), snat_ports=(2000, 3000)))


@pytest.mark.parametrize(("vip", "snat", "fragment"), [
    (VIP6, ("10.0.1.2",), "SNAT address 10.0.1.2 is IPv4 but VIP [2001:db8::10]:80 is IPv6"),
    (VIP, ("2001:db8:1::2",), "SNAT address 2001:db8:1::2 is IPv6 but VIP 10.0.0.10:80 is IPv4"),
])
def test_snat_addresses_of_the_other_family_are_refused(vip: Endpoint, snat: tuple[str, ...],
                                                        fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as exc:
        check_vip(VipSpec(vip, forwarding="fullnat", snat=snat))
    assert "hint: a full-NAT VIP's SNAT addresses share its address family" in str(exc.value)


def test_snat_settings_on_a_nat_vip_are_refused() -> None:
    with pytest.raises(ConfigError, match="for full-NAT only"):
        check_vip(VipSpec(VIP, snat=("10.0.1.2",)))
    with pytest.raises(ConfigError, match="for full-NAT only"):
        check_vip(VipSpec(VIP, snat_ports=(2000, 3000)))
    check_vip(VipSpec(VIP, forwarding="fullnat", snat=("10.0.1.2",), snat_ports=(2000, 3000)))


# --- the CLI ---

@pytest.fixture
def fake() -> Any:
    f = mock.Mock()
    f.vip_add.return_value = mock.Mock(plan=planner.Plan([]), applied=False)
    return f


def run(fake: Any, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), obj=Context("host", lambda _i: fake))


def test_vip_add_passes_snat_addresses_and_port_range(fake: Any) -> None:
    result = run(fake, "vip", "add", "10.0.0.10:80", "--forwarding", "fullnat",
                 "--snat", "10.0.1.2,10.0.1.3", "--snat-ports", "20000-29999")
    assert result.exit_code == 0, result.output
    fake.vip_add.assert_called_once_with(VIP, False, "flow", "fullnat",
                                         snat=("10.0.1.2", "10.0.1.3"), snat_ports=(20000, 29999))


def test_vip_add_fullnat_without_options_leaves_the_defaults_to_the_library(fake: Any) -> None:
    result = run(fake, "vip", "add", "10.0.0.10:80", "--forwarding", "fullnat")
    assert result.exit_code == 0, result.output
    fake.vip_add.assert_called_once_with(VIP, False, "flow", "fullnat")


@pytest.mark.parametrize(("args", "fragment"), [
    (("--snat", "10.0.1.300"), "SNAT address '10.0.1.300' is not an IPv4 or IPv6 address"),
    (("--snat-ports", "70000-80000"), "port range '70000-80000' is not within 1-65535"),
    (("--snat-ports", "9-1"), "port range '9-1'"),
])
def test_bad_snat_options_exit_2_in_one_line_before_the_balancer(fake: Any, args: tuple[str, ...],
                                                                 fragment: str) -> None:
    result = run(fake, "vip", "add", "10.0.0.10:80", "--forwarding", "fullnat", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "hint:" in lines[0], result.output
    fake.vip_add.assert_not_called()


def test_vip_add_passes_ipv6_snat_addresses_for_an_ipv6_vip(fake: Any) -> None:
    result = run(fake, "vip", "add", "[2001:db8::10]:80", "--forwarding", "fullnat",
                 "--snat", "2001:db8:1::2")
    assert result.exit_code == 0, result.output
    fake.vip_add.assert_called_once_with(VIP6, False, "flow", "fullnat", snat=("2001:db8:1::2",))


@pytest.mark.parametrize(("vip", "snat", "fragment"), [
    ("[2001:db8::10]:80", "10.0.1.2", "is IPv4 but VIP [2001:db8::10]:80 is IPv6"),
    ("10.0.0.10:80", "2001:db8:1::2", "is IPv6 but VIP 10.0.0.10:80 is IPv4"),
])
def test_vip_add_with_snat_of_the_other_family_exits_2_in_one_line(vip: str, snat: str,
                                                                   fragment: str) -> None:
    result = CliRunner().invoke(main, ["vip", "add", vip, "--forwarding", "fullnat", "--snat", snat],
                                obj=Context("host", Controller))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "hint:" in lines[0], result.output


def test_snat_on_a_nat_vip_is_refused_by_the_library_in_one_line() -> None:
    result = CliRunner().invoke(main, ["vip", "add", "10.0.0.10:80", "--snat", "10.0.1.2"],
                                obj=Context("host", Controller))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "full-NAT only" in lines[0] and "--forwarding fullnat" in lines[0]


# --- the config file ---

FILE = """\
interfaces: [eth0]
vips:
  - vip: 10.0.0.10:80
    forwarding: fullnat
    snat: [10.0.1.2, 10.0.1.3]
    snat_ports: 20000-29999
    backends:
      - {addr: 10.0.1.11:8080}
  - vip: 10.0.0.11:80
    forwarding: fullnat
    backends:
      - {addr: 10.0.1.12:8080}
"""


def test_the_file_carries_snat_and_snat_ports_to_the_spec() -> None:
    state = load_text(FILE, "lb.yaml")
    spec = state.vips[VIP].spec
    assert (spec.forwarding, spec.snat, spec.snat_ports) == (
        "fullnat", ("10.0.1.2", "10.0.1.3"), (20000, 29999))
    other = state.vips[Endpoint("10.0.0.11", 80, "tcp")].spec
    assert (other.snat, other.snat_ports) == ((), SNAT_PORTS_DEFAULT)


@pytest.mark.parametrize(("old", "new", "where", "fragment"), [
    ("snat_ports: 20000-29999", "snat_ports: 29999-20000", "lb.yaml:6: vips[0].snat_ports",
     "port range '29999-20000'"),
    ("snat: [10.0.1.2, 10.0.1.3]", "snat: [10.0.1.2, nope]", "lb.yaml:5: vips[0].snat",
     "SNAT address 'nope'"),
    ("    forwarding: fullnat\n    snat:", "    forwarding: nat\n    snat:", "lb.yaml:5: vips[0].snat",
     "snat is for forwarding: fullnat"),
])
def test_bad_snat_keys_name_file_line_and_field(old: str, new: str, where: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(FILE.replace(old, new, 1), "lb.yaml")
    message = str(exc.value)
    assert message.startswith(where) and fragment in message and "hint:" in message, message


FILE6 = """\
interfaces: [eth0]
vips:
  - vip: "[2001:db8::10]:80"
    forwarding: fullnat
    snat: [2001:db8:1::2]
    snat_ports: 20000-29999
    backends:
      - {addr: "[2001:db8:1::11]:8080"}
"""


def test_the_file_takes_forwarding_fullnat_on_an_ipv6_vip_and_exports_it_again() -> None:
    state = load_text(FILE6, "lb.yaml")
    spec = state.vips[VIP6].spec
    assert (spec.forwarding, spec.snat, spec.snat_ports) == ("fullnat", ("2001:db8:1::2",), (20000, 29999))
    again = load_text(dump(["eth0"], "auto", state.vips), "export")
    assert again.vips[VIP6].spec == spec


def test_an_ipv4_snat_address_on_an_ipv6_vip_in_the_file_names_its_line() -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(FILE6.replace("snat: [2001:db8:1::2]", "snat: [10.0.1.2]"), "lb.yaml")
    message = str(exc.value)
    assert message.startswith("lb.yaml:5: vips[0].snat") and "is IPv4 but VIP" in message
    assert "hint:" in message


def test_export_writes_snat_keys_that_load_again() -> None:
    state = load_text(FILE, "lb.yaml")
    again = load_text(dump(["eth0"], "auto", state.vips), "export")
    assert {v: e.spec for v, e in again.vips.items()} == {v: e.spec for v, e in state.vips.items()}
    assert "snat_ports" not in dump(["eth0"], "auto", {v: e for v, e in state.vips.items() if v != VIP})


# --- the planner ---

class Maps:
    """Records the planner's writes (the ones a full-NAT VIP needs) and reads them back."""

    read_ring = None        # the planner rebuilds old rings from the spec

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.vip_entries: dict = {}
        self.snat: dict = {}

    def put_vip(self, vip, vip_id, gen, count, flags=0):
        self.log.append(("put_vip", vip_id))
        self.vip_entries[vip] = (vip_id, gen, count, flags)

    def put_snat_cfg(self, vip_id, addrs, port_min, port_max):
        self.log.append(("put_snat_cfg", vip_id))
        self.snat[vip_id] = (tuple(addrs), port_min, port_max)

    def snat_cfg(self, vip_id):
        from xdp.codec import SnatSettings
        return SnatSettings(*self.snat.get(vip_id, ((), 0, 0)))

    def vips(self):
        class Meta:
            def __init__(self, vid, gen, cnt, flags):
                self.vip_id, self.ring_generation, self.backend_count, self.flags = vid, gen, cnt, flags
        return {v: Meta(*e) for v, e in self.vip_entries.items()}

    def backends(self):
        return []

    dp = 0
    reverse_entries: frozenset[str] = frozenset()    # reverse tables that hold entries

    def dp_flags(self) -> int:
        return self.dp

    def put_dp_flags(self, flags: int) -> None:
        self.log.append(("put_dp_flags", flags))
        self.dp = flags

    def holds_entries(self, name: str) -> bool:
        return name in self.reverse_entries

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self.log.append((name,))


SMALL = Limits(max_vips=4, max_backends=8, ring_size=251)


def change(maps: Maps, desired: dict) -> planner.Plan:
    live = planner.read_live(maps)
    the_plan = planner.plan(live, desired, SMALL)
    planner.apply(the_plan, live, maps)
    return the_plan


def test_the_snat_settings_are_written_before_the_vip_entry_and_read_back() -> None:
    maps = Maps()
    spec = VipSpec(VIP, forwarding="fullnat", snat=("10.0.1.2",), snat_ports=(2000, 2999))
    the_plan = change(maps, {VIP: spec})
    writes = [w for w in maps.log if w[0] in ("put_snat_cfg", "put_vip")]
    assert writes == [("put_snat_cfg", 0), ("put_vip", 0)]
    assert "  snat 10.0.1.2 ports 2000-2999" in the_plan.describe()
    assert planner.read_live(maps)[VIP].spec == spec
    # Nothing changed: nothing written again.
    maps.log.clear()
    assert change(maps, {VIP: spec}).empty and maps.log == []


def test_a_new_port_range_is_a_change_that_says_tracked_flows_keep_theirs() -> None:
    maps = Maps()
    spec = VipSpec(VIP, forwarding="fullnat")
    change(maps, {VIP: spec})
    the_plan = change(maps, {VIP: VipSpec(VIP, forwarding="fullnat", snat_ports=(5000, 5999))})
    assert any("ports 5000-5999 (new flows; tracked flows keep theirs)" in line
               for line in the_plan.describe())
    assert maps.snat[0] == ((), 5000, 5999)


def test_a_nat_vip_writes_no_snat_settings() -> None:
    maps = Maps()
    change(maps, {VIP: VipSpec(VIP, backends=())})
    assert ("put_snat_cfg", 0) not in maps.log
    backend = parse_endpoint("10.0.1.11:80")
    assert str(backend) == "10.0.1.11:80"


def test_dp_config_flags_follow_the_full_nat_vips_of_each_family() -> None:
    maps = Maps()
    nat6 = Endpoint("2001:db8::11", 80, "tcp")
    change(maps, {VIP: VipSpec(VIP, forwarding="fullnat")})
    assert maps.dp == DP_FLAGS["fullnat"]
    # On before the VIP entry that makes the VIP full-NAT: its first reply is looked up.
    assert maps.log.index(("put_dp_flags", DP_FLAGS["fullnat"])) < maps.log.index(("put_vip", 0))
    change(maps, {VIP: VipSpec(VIP, forwarding="fullnat"), VIP6: VipSpec(VIP6, forwarding="fullnat")})
    assert maps.dp == DP_FLAGS["fullnat"] | DP_FLAGS["fullnat6"]
    # Switched to NAT while its flows still hold ports: the flag stays until they are gone.
    maps.reverse_entries = frozenset({"snat_rnat"})
    change(maps, {VIP: VipSpec(VIP), nat6: VipSpec(nat6)})
    assert maps.dp == DP_FLAGS["fullnat"]
    maps.reverse_entries = frozenset()
    change(maps, {VIP: VipSpec(VIP)})
    assert maps.dp == 0
