"""Reading local listeners from /proc/net text: the guard that keeps a VIP off sshd's port."""
from __future__ import annotations

from lbctl.safety import Listener, parse_proc_net

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
