"""Reading local listeners from /proc/net text: the guard that keeps a VIP off sshd's port."""
from __future__ import annotations

import ipaddress
import json
import socket
import subprocess

import pytest

from lbctl.safety import Listener, egress_ifindex, local_networks, parse_proc_net, unusable_reason

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1151 1
   1: 0101A8C0:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1152 1
   2: 0101A8C0:C350 0201A8C0:0016 01 00000000:00000000 00:00000000 00000000     0        0 1153 1
"""
UDP = """   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2001 2
  11: 0101A8C0:D431 0201A8C0:0035 01 00000000:00000000 00:00000000 00000000     0        0 2002 2
  12: 0101A8C0:2328 0201A8C0:2328 07 00000000:00000000 00:00000000 00000000     0        0 2003 2
"""


def test_tcp_listeners_only_and_addresses_in_network_order():
    assert parse_proc_net(TCP, "tcp") == [Listener("0.0.0.0", 22), Listener("192.168.1.1", 8080)]


def test_udp_bound_sockets_without_a_peer_only():
    assert parse_proc_net(UDP, "udp") == [Listener("0.0.0.0", 53)]


# The balancer's directly connected subnets, as local_networks() reads them from its interfaces.
NETWORKS = [ipaddress.IPv4Interface("10.77.1.1/24"), ipaddress.IPv4Interface("10.77.2.1/24"),
            ipaddress.IPv4Interface("10.9.0.1/31")]


@pytest.mark.parametrize(("addr", "why"), [
    ("127.0.0.1", "loopback"),
    ("127.3.4.5", "loopback"),
    ("255.255.255.255", "broadcast"),
    ("10.77.2.255", "broadcast address of 10.77.2.0/24"),
    ("224.0.0.251", "multicast"),
    ("239.1.2.3", "multicast"),
    ("0.0.0.0", "unspecified"),
])
def test_addresses_that_cannot_be_a_vip_or_backend_say_why(addr, why):
    reason = unusable_reason(addr, NETWORKS)
    assert reason is not None and why in reason


@pytest.mark.parametrize("addr", ["10.77.2.11", "10.77.0.10", "10.77.3.255", "10.9.0.1", "192.168.1.255"])
def test_ordinary_addresses_are_usable(addr):
    # 10.77.3.255 and 192.168.1.255 are on no connected subnet: they may be hosts elsewhere;
    # a /31 has no broadcast address.
    assert unusable_reason(addr, NETWORKS) is None


def test_local_networks_are_the_addresses_ip_shows():
    shown = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True,
                                      check=True).stdout)
    expected = {ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
                for link in shown for a in link.get("addr_info", [])}
    assert set(local_networks()) == expected and expected


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.77.2.11", "192.0.2.1", "240.0.0.1"])
def test_egress_interface_is_the_one_ip_route_get_names(addr):
    proc = subprocess.run(["ip", "-j", "route", "get", addr], capture_output=True, text=True, check=False)
    expected = socket.if_nametoindex(json.loads(proc.stdout)[0]["dev"]) if proc.returncode == 0 else None
    assert egress_ifindex(addr) == expected
