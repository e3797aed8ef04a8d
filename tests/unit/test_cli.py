"""CLI contract through CliRunner with an injected fake controller: parsing, errors, help."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from lbctl.cli import Context, main
from lbctl.errors import ConflictError
from xdp.errors import AttachError, MapFullError, NotAttachedError


class FakeController:
    """Records what the CLI asked for; raises what a test tells it to."""

    def __init__(self, instance: str):
        self.instance = instance
        self.calls: list[tuple] = []
        self.raise_on: dict[str, Exception] = {}

    def _do(self, name: str, *args):
        self.calls.append((name, *args))
        if name in self.raise_on:
            raise self.raise_on[name]
        return _FakeResult()

    def __getattr__(self, name: str):
        return lambda *args: self._do(name, *args)

    def vips(self):
        self.calls.append(("vips",))
        return [{"vip": "10.0.0.10:80", "proto": "tcp", "backends": 1, "active_backends": 1,
                 "packets": 5, "bytes": 300, "new_flows": 1, "drops": 0}]


class _FakeResult:
    class plan:
        @staticmethod
        def describe():
            return ["+ vip 10.0.0.10:80 (tcp)"]


@pytest.fixture
def fake():
    return FakeController("host")


def run(fake: FakeController, *args: str):
    return CliRunner().invoke(main, list(args), obj=Context("host", lambda _i: fake))


def test_vip_add_parses_address_and_default_proto(fake):
    result = run(fake, "vip", "add", "10.0.0.10:80")
    assert result.exit_code == 0, result.output
    (name, vip, force), = fake.calls
    assert name == "vip_add" and (vip.addr, vip.port, vip.proto) == ("10.0.0.10", 80, "tcp")
    assert force is False


def test_backend_add_passes_weight_and_udp_proto(fake):
    result = run(fake, "backend", "add", "10.0.0.10:53", "10.0.1.11:5353", "--proto", "udp", "--weight", "7")
    assert result.exit_code == 0, result.output
    name, vip, backend, weight = fake.calls[0]
    assert (vip.proto, backend.port, weight) == ("udp", 5353, 7)


@pytest.mark.parametrize("args, needle", [
    (["vip", "add", "10.0.0.10"], "expected ADDR:PORT"),
    (["vip", "add", "10.0.0.300:80"], "not an IPv4 address"),
    (["vip", "add", "10.0.0.10:99999"], "not in 1-65535"),
    (["vip", "add", "10.0.0.10:0"], "not in 1-65535"),
    (["vip", "add", "10.0.0.10:http"], "not in 1-65535"),
    (["vip", "add", "[::1]:80"], "not an IPv4 address"),
    (["vip", "add", "0.0.0.0:80"], "not a unicast address"),
    (["vip", "add", "224.0.0.1:80"], "not a unicast address"),
    (["backend", "add", "10.0.0.10:80", "10.0.1.11"], "malformed backend"),
    (["backend", "add", "10.0.0.10:80", "10.0.1.11:80", "--weight", "0"], "weight 0 is out of range"),
    (["backend", "add", "10.0.0.10:80", "10.0.1.11:80", "--weight", "1001"], "weight 1001 is out of range"),
    (["backend", "set", "10.0.0.10:80", "10.0.1.11:80", "--weight", "-3"], "weight -3 is out of range"),
])
def test_bad_input_is_one_line_nonzero_and_calls_nothing(fake, args, needle):
    result = run(fake, *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "hint" in lines[0], result.output
    assert fake.calls == []


@pytest.mark.parametrize("args", [
    ["vip", "add", "10.0.0.10:80", "--proto", "sctp"],
    ["attach", "eth0", "--mode", "turbo"],
    ["detach"],
    ["detach", "eth0", "--all"],
    ["detach", "eth0", "--purge"],
    ["backend", "set", "10.0.0.10:80", "10.0.1.11:80"],
    ["backend", "set", "10.0.0.10:80", "10.0.1.11:80", "--state", "sleepy"],
])
def test_usage_errors_exit_2_and_call_nothing(fake, args):
    result = run(fake, *args)
    assert result.exit_code == 2, result.output
    assert fake.calls == []


@pytest.mark.parametrize("command, exc, code", [
    ("vip_add", ConflictError("VIP 10.0.0.10:80 (tcp) already exists; hint: x"), 2),
    ("vip_add", NotAttachedError("balancer not set up; hint: run 'lbctl attach IFACE' first"), 4),
    ("vip_add", MapFullError("cannot add VIP: full; hint: delete"), 5),
])
def test_library_errors_become_one_line_with_distinct_exit_codes(fake, command, exc, code):
    fake.raise_on[command] = exc
    result = run(fake, "vip", "add", "10.0.0.10:80")
    assert result.exit_code == code
    assert result.output.strip() == f"lbctl: error: {exc}"


def test_attach_refusal_names_interface_and_hint(fake):
    fake.raise_on["attach"] = AttachError("cannot attach XDP on 'eth0' in native mode: Operation not "
                                          "supported (95); try --mode generic")
    result = run(fake, "attach", "eth0")
    assert result.exit_code == 3 and "try --mode generic" in result.output


def test_vip_list_json_is_parseable(fake):
    result = run(fake, "vip", "list", "--json")
    assert json.loads(result.output)[0]["vip"] == "10.0.0.10:80"


def test_vip_list_table_has_header_and_row(fake):
    lines = run(fake, "vip", "list").output.splitlines()
    assert lines[0].split()[:2] == ["VIP", "PROTO"] and lines[1].split()[:2] == ["10.0.0.10:80", "tcp"]


def _all_commands(group: click.Group, path=()):
    for name, cmd in group.commands.items():
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, path + (name,))


@pytest.mark.parametrize("path", [p for p, _ in _all_commands(main)] + [()], ids=lambda p: " ".join(p) or "lbctl")
def test_every_help_ends_with_examples(fake, path):
    result = run(fake, *path, "--help")
    assert result.exit_code == 0
    tail = result.output.rstrip().split("Examples:")
    assert len(tail) == 2 and "lbctl " in tail[1], f"'lbctl {' '.join(path)} --help' has no examples"


def test_version(fake):
    result = run(fake, "--version")
    assert result.exit_code == 0 and result.output.startswith("lbctl, version ")


def test_unknown_netns_is_one_line_error():
    result = CliRunner().invoke(main, ["-n", "no-such-ns-xyz", "status"])
    assert result.exit_code == 2
    assert "network namespace 'no-such-ns-xyz' not found" in result.output
