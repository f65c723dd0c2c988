"""The TCP ports a process listens on, as the kernel says (/proc), for listeners QEMU
opened on port 0 and reports no port for (its NBD server): the kernel picks a free port
and the agent reads it back, instead of picking one itself and racing another bind."""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's state column


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def parse_listeners(table: str, inodes: set[int]) -> set[int]:
    """Local ports of the LISTEN sockets in a /proc/net/tcp{,6} text whose inode is in
    `inodes`."""
    ports = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        if int(fields[9]) in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (in its own network namespace)."""
    inodes = _socket_inodes(pid)
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            table = Path(f"/proc/{pid}/net/{name}").read_text()
        except OSError:
            continue
        ports |= parse_listeners(table, inodes)
    return ports
