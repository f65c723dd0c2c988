"""Listening ports read back from the kernel (ferry/hypervisor/sockets.py)."""

from __future__ import annotations

import os
import socket

from ferry.hypervisor.sockets import listening_ports, parse_listeners

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A4BF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1
   2: 0100007F:A4C0 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4243 1
"""


def test_only_listening_sockets_of_the_process_count() -> None:
    assert parse_listeners(TABLE, {4242, 4243}) == {0xA4BF}  # 4243 is connected
    assert parse_listeners(TABLE, set()) == set()
    assert parse_listeners("header only\n", {4242}) == set()


def test_a_port_picked_by_the_kernel_is_read_back() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        before = listening_ports(os.getpid())
        s.listen()
        port = s.getsockname()[1]
        assert listening_ports(os.getpid()) - before == {port}
