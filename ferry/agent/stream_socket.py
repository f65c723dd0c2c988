"""The source QEMU's migration connection as the kernel holds it: found by its peer
address, and its send buffer capped so that little data queues in front of the
switchover.

Why: TCP fills whatever queue the path has (a send buffer autotuned to megabytes, a
router's or a shaper's queue), and QEMU counts a page as sent once it is in its socket.
The guest's last pages and device state then wait behind all that: on the lab's
200 Mbit/s link the client saw the guest paused ~50 ms longer than QEMU's own downtime
said, whatever the downtime limit. A send buffer of about the path's bandwidth-delay
product plus a few milliseconds keeps the throughput and bounds that wait.

The connection is QEMU's; the agent (root, same host) takes a duplicate of its socket
with pidfd_getfd(2), sets the buffer, and closes the duplicate.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from ferry.domain.migration import Progress
from ferry.domain.streams import migration_endpoint

log = logging.getLogger("ferry.agent")

SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has
SO_SNDBUFFORCE = 32  # SO_SNDBUF without net.core.wmem_max's ceiling (CAP_NET_ADMIN)
TCP_INFO_LEN = 232
TCPI_MIN_RTT_OFFSET = 148  # struct tcp_info: __u32 tcpi_min_rtt (µs), Linux >= 4.6
MIN_BUFFER_BYTES = 256 * 1024
ESTABLISHED = "01"


@dataclass(frozen=True)
class BufferCap:
    """What capping one connection's send buffer did."""

    fd: int  # in QEMU
    min_rtt_us: int
    before_bytes: int  # the kernel's sk_sndbuf (twice what was asked, for overhead)
    after_bytes: int


def _hex_ipv4(address: IPv4Address, port: int) -> str:
    """An address as /proc/net/tcp spells it: the IP's bytes in host order, hex."""
    return f"{struct.unpack('<I', address.packed)[0]:08X}:{port:04X}"


def socket_inodes(peer: IPv4Address, port: int, table: str | None = None) -> set[int]:
    """Inodes of this namespace's established TCP connections to peer:port."""
    text = table if table is not None else Path("/proc/net/tcp").read_text()
    want = _hex_ipv4(peer, port)
    found = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[2] == want and fields[3] == ESTABLISHED:
            found.add(int(fields[9]))
    return found


def fds_of(pid: int, inodes: set[int]) -> list[int]:
    """The file descriptors of process `pid` that are these sockets."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    fds = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) in wanted:
                fds.append(int(entry.name))
        except OSError:
            continue  # closed meanwhile
    return sorted(fds)


_LIBC = ctypes.CDLL(None, use_errno=True)  # Python's os has no pidfd_getfd


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    dup = int(_LIBC.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    if dup < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return dup


def cap_socket(sock: socket.socket, throughput_bytes_s: float, margin_ms: int,
               fd: int | None = None) -> BufferCap:
    """Cap one connected TCP socket's send buffer (see cap_send_buffers); `fd`: its
    number in the process that owns it, for the record (this one's by default)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    min_rtt_us = struct.unpack_from("I", info, TCPI_MIN_RTT_OFFSET)[0]
    before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    wanted = max(MIN_BUFFER_BYTES,
                 int(throughput_bytes_s * (min_rtt_us / 1e6 + margin_ms / 1000)))
    # The kernel doubles what it is given (bookkeeping overhead): compare so.
    if 2 * wanted < before:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, wanted)
    after = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return BufferCap(fd=sock.fileno() if fd is None else fd, min_rtt_us=min_rtt_us,
                     before_bytes=before, after_bytes=after)


def cap_send_buffers(pid: int, peer: IPv4Address, port: int, throughput_bytes_s: float,
                     margin_ms: int) -> list[BufferCap]:
    """Cap the send buffer of each of QEMU's connections to peer:port at the path's
    bandwidth-delay product (its smallest RTT seen) plus `margin_ms` of the throughput,
    if that is smaller than what it has. OSError if the sockets cannot be reached."""
    caps = []
    pidfd = os.pidfd_open(pid)  # first: the descriptors listed are this process's
    try:
        for fd in fds_of(pid, socket_inodes(peer, port)):
            dup = _pidfd_getfd(pidfd, fd)
            sock = socket.socket(fileno=dup)
            try:
                caps.append(cap_socket(sock, throughput_bytes_s, margin_ms, fd))
            finally:
                sock.close()  # the duplicate only: QEMU's descriptor stays
    finally:
        os.close(pidfd)
    return caps


async def cap_outgoing(pid: int | None, uri: str | None, progress: Progress,
                       margin_ms: int) -> list[BufferCap]:
    """CAP_BACKLOG on a source QEMU's running stream to `uri` (as it was started), at
    the average throughput so far. Best effort: the stream runs on uncapped (and a
    warning says why) when its sockets cannot be reached."""
    if pid is None or uri is None or progress.elapsed_ms <= 0:
        log.warning("stream backlog not capped: no outgoing stream known")
        return []
    address, port = migration_endpoint(uri)
    throughput = progress.transferred_bytes / (progress.elapsed_ms / 1000)
    try:
        caps = await asyncio.to_thread(cap_send_buffers, pid, IPv4Address(address), port,
                                       throughput, margin_ms)
    except OSError as exc:
        log.warning("stream backlog to %s not capped: %s", uri, exc)
        return []
    if not caps:
        log.info("stream backlog to %s not capped: QEMU has no connection to it (ended?)",
                 uri)
    for cap in caps:
        log.info("stream to %s: send buffer %d -> %d bytes (%.1f MB/s, min RTT %d us)",
                 uri, cap.before_bytes, cap.after_bytes, throughput / 1e6, cap.min_rtt_us)
    return caps
