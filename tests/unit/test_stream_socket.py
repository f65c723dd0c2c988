"""The migration connection's send buffer cap (agent/stream_socket.py): found in
/proc by its peer, capped through a duplicate taken with pidfd_getfd, only ever lowered.
A connection of this test process stands in for QEMU's (the same calls reach it)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from ferry.agent import stream_socket

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111
   1: 0A00C6C6:D431 0B00C6C6:9C41 01 00000000:00000000 00:00000000 00000000     0        0 222
   2: 0A00C6C6:D432 0B00C6C6:9C41 06 00000000:00000000 00:00000000 00000000     0        0 333
   3: 0A00C6C6:D433 0C00C6C6:9C41 01 00000000:00000000 00:00000000 00000000     0        0 444
"""


def test_connections_are_found_by_their_peer_in_proc_net_tcp() -> None:
    # 198.198.0.11:40001, established; the same peer in TIME_WAIT (06) and another
    # peer are not it, nor is a listener.
    assert stream_socket.socket_inodes(IPv4Address("198.198.0.11"), 40001, TABLE) == {222}
    assert stream_socket.socket_inodes(IPv4Address("198.198.0.13"), 40001, TABLE) == set()


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, int]]:
    """A client connection of this process to a local listener, and the port."""
    if os.geteuid() != 0:
        pytest.fail("needs root (SO_SNDBUFFORCE): run the suite as root, as CI does")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    try:
        yield client, port
    finally:
        for s in (client, accepted, server):
            s.close()


def test_a_large_send_buffer_is_capped_at_bdp_plus_the_margin(
        connection: tuple[socket.socket, int]) -> None:
    client, port = connection
    client.setsockopt(socket.SOL_SOCKET, stream_socket.SO_SNDBUFFORCE, 4 << 20)
    caps = stream_socket.cap_send_buffers(os.getpid(), IPv4Address("127.0.0.1"), port,
                                          throughput_bytes_s=50e6, margin_ms=10)
    assert [c.fd for c in caps] == [client.fileno()]
    cap = caps[0]
    assert cap.before_bytes == 8 << 20  # the kernel doubles what it is given
    # 50 MB/s x (loopback's RTT of some µs + 10 ms): ~500 kB, doubled by the kernel
    assert 1_000_000 <= cap.after_bytes <= 1_100_000
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == cap.after_bytes
    # The duplicate was closed, the connection still works.
    client.sendall(b"x")


def test_a_buffer_already_smaller_is_left_alone(connection: tuple[socket.socket, int]
                                               ) -> None:
    client, port = connection
    before = client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    caps = stream_socket.cap_send_buffers(os.getpid(), IPv4Address("127.0.0.1"), port,
                                          throughput_bytes_s=10e9, margin_ms=10)
    assert [(c.before_bytes, c.after_bytes) for c in caps] == [(before, before)]


def test_no_connection_to_the_peer_caps_nothing() -> None:
    assert stream_socket.cap_send_buffers(os.getpid(), IPv4Address("127.0.0.1"), 9,
                                          throughput_bytes_s=50e6, margin_ms=10) == []
