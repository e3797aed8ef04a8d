"""The namespace lab: it builds, carries HTTP and UDP through the balancer host, and cleans up."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from lbctl import lab as lab_module
from lbctl.lab import Lab, LabError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: builds network namespaces, veths and sysctls"
    ),
]


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _pids_mentioning(prefix: str) -> list[int]:
    """Processes whose command line names this lab (servers run `ip netns exec <prefix>-beN`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if f"{prefix}-".encode() in cmdline:
            found.append(int(entry))
    return found


def _assert_gone(lab: Lab) -> None:
    assert not set(lab.namespaces) & _netns_names()
    assert _pids_mentioning(lab.prefix) == []
    assert not lab.run_dir.exists()
    assert not lab.bpf_pin_dir.exists()
    assert not (lab_module.RUN_ROOT / f"{lab.prefix}.lock").exists()
    assert lab.status().down


def _prefix() -> str:
    return f"tlab{secrets.token_hex(2)}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab with a unique prefix, taken down whatever the test did."""
    the_lab = Lab(prefix=_prefix())
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def lab_up(lab: Lab) -> Lab:
    lab.up()
    return lab


def test_status_reports_every_part_up(lab_up: Lab) -> None:
    status = lab_up.status()
    assert status.up
    assert all(status.namespaces.values())
    assert set(status.servers) == {"be1", "be2", "be3"}
    assert all(isinstance(pid, int) for pid in status.servers.values())
    # IPv4, then the global IPv6 addresses beside them (link-local ones are not listed).
    assert status.addresses["client"] == [f"{lab_up.client.addr}/24", "fd77:1::2/64"]
    assert status.addresses["lb"] == ["10.77.1.1/24", "10.77.2.1/24", "fd77:1::1/64", "fd77:2::1/64"]
    assert status.addresses["be2"] == ["10.77.2.12/24", "fd77:2::12/64"]


def test_lab_attributes_match_the_topology(lab: Lab) -> None:
    assert [b.name for b in lab.backends] == ["be1", "be2", "be3"]
    assert lab.lb.netns == f"{lab.prefix}-lb"
    assert lab.lb_ifaces == ["eth0", "eth1"]
    assert lab.vip == "10.77.0.10"
    assert lab.http_port == 80
    assert lab.client.gateway == lab.lb.ifaces[0].addr
    assert all(b.gateway == lab.lb.ifaces[1].addr for b in lab.backends)
    assert all(len(i.name) <= 15 for h in lab.hosts.values() for i in h.ifaces)
    assert lab.vip6 == "fd77::10"
    assert lab.client.gateway6 == lab.lb.ifaces[0].addr6 == "fd77:1::1"
    assert [b.addr6 for b in lab.backends] == ["fd77:2::11", "fd77:2::12", "fd77:2::13"]
    assert all(b.gateway6 == lab.lb.ifaces[1].addr6 for b in lab.backends)


def test_client_reaches_each_backend_over_ipv6_through_the_balancer(lab_up: Lab) -> None:
    for backend in lab_up.backends:
        assert backend.addr6 is not None
        results = lab_up.http_requests(backend.addr6, count=2)
        assert [r.body for r in results] == [f"{backend.name}\n"] * 2
        assert all((r.client_addr or "").startswith(f"{lab_up.client.addr6}:") for r in results)
    assert lab_up.udp_echo(lab_up.backends[1].addr6 or "", payload="six") == ["be2 six"]
    # Usable at once and quiet: no address waits in duplicate address detection ("tentative"),
    # and the routes are the static ones (no router advertisements taken).
    for host in ("client", "lb", "be1"):
        addrs = lab_up.run(host, ["ip", "-6", "addr", "show"]).stdout
        assert "tentative" not in addrs
        knobs = lab_up.run(host, ["sysctl", "-n", "net.ipv6.conf.all.accept_ra",
                                  "net.ipv6.conf.eth0.accept_dad"]).stdout.split()
        assert knobs == ["0", "0"], host
    routes = lab_up.run("client", ["ip", "-6", "route", "show", "default"]).stdout
    assert routes.startswith("default via fd77:1::1 dev eth0"), routes
    # Nothing answers for the v6 VIP until XDP does, as for the IPv4 one.
    [r] = lab_up.http_requests(lab_up.vip6 or "", count=1, timeout_s=2.0)
    assert r.error is not None and r.backend is None


def test_a_topology_without_ipv6_keys_builds_an_ipv4_only_lab(tmp_path: Path) -> None:
    text = lab_module.TOPOLOGY_PATH.read_text()
    v4_only = "\n".join(line for line in text.splitlines()
                        if not line.strip().startswith(("vip6:", "cidr6:", "address6:", "gateway6:")))
    path = tmp_path / "v4.yaml"
    path.write_text(v4_only + "\n")
    lab = Lab(prefix=_prefix(), topology_path=path)
    try:
        assert lab.vip6 is None and lab.client.addr6 is None
        lab.up()
        assert lab.http_get(lab.backends[0].addr) == ["be1"]
        assert lab.status().addresses["be1"] == ["10.77.2.11/24"]
        assert lab.run("client", ["sysctl", "-n", "net.ipv6.conf.eth0.disable_ipv6"]).stdout.strip() == "1"
    finally:
        lab.down()
    _assert_gone(lab)


def test_a_kernel_without_ipv6_gets_an_ipv4_only_lab(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Lab(prefix=_prefix()).ipv6_missing  # this kernel has IPv6
    # ipv6.disable=1 at boot removes /proc/sys/net/ipv6: the lab must not try IPv6 there.
    monkeypatch.setattr(lab_module, "KERNEL_IPV6", tmp_path / "absent")
    lab = Lab(prefix=_prefix())
    try:
        assert lab.vip6 is None and lab.ipv6_missing
        lab.up()
        assert lab.http_get(lab.backends[2].addr) == ["be3"]
        assert lab.status().addresses["client"] == ["10.77.1.2/24"]
    finally:
        lab.down()
    _assert_gone(lab)


@pytest.mark.parametrize("edit, named", [
    (("vip6: fd77::10", "vip6: 10.77.0.99"), "vip6 '10.77.0.99' is not an IPv6 address"),
    (("address6: fd77:2::12", "address6: fd77:9::12"), "fd77:9::12 is not in fd77:2::/64"),
    (("    cidr6: fd77:1::/64\n", ""), "network 'client_net', which has no cidr6"),
    (("        address6: fd77:1::2\n", ""), "host 'client' needs address6 on every interface"),
])
def test_bad_ipv6_in_the_topology_is_named(tmp_path: Path, edit: tuple[str, str], named: str) -> None:
    path = tmp_path / "bad.yaml"
    old, new = edit
    text = lab_module.TOPOLOGY_PATH.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(LabError, match=named.replace("(", r"\(")):
        Lab(prefix=_prefix(), topology_path=path)


def test_client_reaches_each_backend_over_http_through_the_balancer(lab_up: Lab) -> None:
    for backend in lab_up.backends:
        results = lab_up.http_requests(backend.addr, count=3)
        assert [r.body for r in results] == [f"{backend.name}\n"] * 3
        assert {r.backend for r in results} == {backend.name}
        # Routed, not NATed: the backend sees the client's own address.
        assert all((r.client_addr or "").startswith(f"{lab_up.client.addr}:") for r in results)


def test_keep_alive_requests_reuse_one_connection(lab_up: Lab) -> None:
    be1 = lab_up.backends[0]
    results = lab_up.http_requests(be1.addr, count=20, new_connection=False)
    assert all(r.ok for r in results)
    assert len({r.client_addr for r in results}) == 1


def test_many_new_connections_in_one_call(lab_up: Lab) -> None:
    be3 = lab_up.backends[2]
    bodies = lab_up.http_get(be3.addr, count=300, timeout_s=3.0)
    assert bodies == ["be3"] * 300


def test_udp_echo_answers_with_the_backend_name(lab_up: Lab) -> None:
    be2 = lab_up.backends[1]
    assert lab_up.udp_echo(be2.addr, payload="hello", count=3) == ["be2 hello"] * 3


def test_vip_is_unreachable_without_a_balancer(lab_up: Lab) -> None:
    # Nothing claims the VIP until XDP does: the balancer's kernel has no route to it and
    # answers the client's SYN with ICMP net unreachable, while the backends stay reachable.
    route = lab_up.run("lb", ["ip", "route", "get", lab_up.vip])
    assert route.returncode != 0 and "Network is unreachable" in route.stderr
    results = lab_up.http_requests(lab_up.vip, count=1, timeout_s=2.0)
    assert [(r.status, r.backend) for r in results] == [(None, None)]
    assert "[Errno 101] Network is unreachable" in (results[0].error or "")
    assert lab_up.http_get(lab_up.backends[0].addr) == ["be1"]


def test_lb_namespace_forwards_and_does_not_filter(lab_up: Lab) -> None:
    out = lab_up.run(
        "lb",
        [
            "sysctl",
            "-n",
            "net.ipv4.ip_forward",
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
            "net.ipv4.conf.eth1.rp_filter",
        ],
    )
    assert out.stdout.split() == ["1", "0", "0", "0"]


def test_offloads_are_set_for_xdp_redirect(lab_up: Lab) -> None:
    client_features = lab_up.run("client", ["ethtool", "-k", "eth0"]).stdout
    assert "generic-receive-offload: on" in client_features
    assert "tx-checksumming: off" in client_features
    switch_port = lab_up.run("sw", ["ethtool", "-k", "p-lb"]).stdout
    assert "generic-receive-offload: on" in switch_port
    backend_features = lab_up.run("be1", ["ethtool", "-k", "eth0"]).stdout
    assert "tx-checksumming: off" in backend_features


def test_up_twice_is_a_no_op(lab_up: Lab) -> None:
    pids_before = lab_up.status().servers
    lab_up.up()
    assert lab_up.status().servers == pids_before
    assert lab_up.http_get(lab_up.backends[0].addr) == ["be1"]


def test_up_rebuilds_a_partial_lab(lab_up: Lab) -> None:
    be2_pid = lab_up.status().servers["be2"]
    assert be2_pid is not None
    os.kill(be2_pid, 9)
    deadline = time.monotonic() + 5
    while lab_up.status().servers["be2"] is not None and time.monotonic() < deadline:
        time.sleep(0.02)  # SIGKILL is delivered asynchronously
    assert not lab_up.status().up
    # A second Lab object stands for another process that finds the lab half broken.
    other = Lab(prefix=lab_up.prefix)
    other.up()
    assert other.status().up
    assert other.http_get(other.backends[1].addr) == ["be2"]


def test_down_removes_everything(lab_up: Lab) -> None:
    pin_dir = lab_up.bpf_pin_dir
    if Path("/sys/fs/bpf").is_mount():
        pin_dir.mkdir(parents=True, exist_ok=True)
    # A second Lab object stands for another process: down() works from pid files and names.
    Lab(prefix=lab_up.prefix).down()
    _assert_gone(lab_up)
    assert not pin_dir.exists()
    lab_up.down()  # again: nothing left to remove is not an error


class _LabWithSquatter(Lab):
    """A lab whose be2 namespace gets a process holding the UDP echo port before the servers
    start: be2's server really fails to bind, after namespaces, links and be1's server exist."""

    def _start_servers(self) -> None:
        squat = ("import socket, time\n"
                 "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 f"s.bind(('0.0.0.0', {self.udp_port}))\nprint('bound', flush=True)\n"
                 "time.sleep(600)\n")
        self.squatter = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts["be2"].netns, sys.executable, "-c", squat],
            stdout=subprocess.PIPE, text=True)
        assert self.squatter.stdout is not None
        assert self.squatter.stdout.readline() == "bound\n"
        super()._start_servers()


class _LabWithTakenPortName(Lab):
    """A lab whose switch namespace already holds a link named like be2's switch port: the
    kernel refuses that veth (EEXIST) after the bridge and the first ports exist."""

    def _wire(self) -> dict[str, tuple[str, str]]:
        with IPRoute(netns=self.switch_netns, flags=0) as ipr:
            ipr.link("add", ifname="p-be2", kind="bridge")
        return super()._wire()


@contextmanager
def _lab_of(lab_class: type[Lab]) -> Iterator[Lab]:
    the_lab = lab_class(prefix=_prefix())
    try:
        yield the_lab
    finally:
        the_lab.down()


def test_a_server_that_cannot_start_fails_the_build_and_nothing_is_left() -> None:
    with _lab_of(_LabWithSquatter) as lab:
        with pytest.raises(LabError) as raised:
            lab.up()
        message = str(raised.value)
        assert message.startswith("lab servers did not start: be2: server exited")
        assert "Address already in use" in message and "be1" not in message
        assert "\n" not in message
        # The squatter lived in be2's namespace: the cleanup ended it with everything else.
        assert lab.squatter.wait(timeout=10) is not None
        _assert_gone(lab)


def test_a_taken_link_name_fails_the_build_and_nothing_is_left() -> None:
    with _lab_of(_LabWithTakenPortName) as lab:
        with pytest.raises(LabError, match=r"^cannot build lab 'tlab[0-9a-f]{4}': NetlinkError: "
                                           r"\(17, 'File exists'\)$"):
            lab.up()
        _assert_gone(lab)
        # Nothing half-built blocks the next attempt.
        Lab(prefix=lab.prefix).up()
        assert Lab(prefix=lab.prefix).status().up


def test_interrupted_build_cleans_up(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while the servers come up: everything built so far goes, and the
    # KeyboardInterrupt itself reaches the caller.
    real_wait = Lab._wait_servers_ready

    def interrupted(self: Lab) -> None:
        real_wait(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_module.Lab, "_wait_servers_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lab.up()
    _assert_gone(lab)


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(LabError, match="bad lab prefix"):
        Lab(prefix="no/slash")
