"""A VM NIC's tap, made and put on its bridge with the kernel's own calls (TUN and
socket ioctls) in this process, in this network namespace.

It is on a migration's path (the destination's tap exists before its QEMU starts): an
`ip` process to do the same took 6-17 ms there on a busy 2-core host, these calls well
under one. The tap is made like `ip tuntap add mode tap`: persistent, no packet
information header, so QEMU opens it by name later (`-netdev tap,ifname=`). Deleting
one stays with `ip` (off the path: it goes while the source QEMU exits).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from ferry.domain.errors import HostUnavailable

TUN_DEVICE = "/dev/net/tun"
# <linux/if_tun.h>, <linux/sockios.h>, <linux/if.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq: the name, then a 24-byte union


class TapFailed(HostUnavailable):
    """The kernel refused to make a tap, or to put it on its bridge (HTTP 502, as a
    failed `ip` command: networks.NetworkCommandFailed)."""


def _ifreq(name: str, data: bytes = b"") -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} does not fit IFNAMSIZ")
    return raw.ljust(IFNAMSIZ, b"\0") + data.ljust(IFREQ_SIZE - IFNAMSIZ, b"\0")


def _fail(what: str, name: str, exc: OSError) -> TapFailed:
    fix = ""
    if exc.errno in (errno.EPERM, errno.EACCES):
        fix = "run the agent as root (CAP_NET_ADMIN)"
    elif exc.errno == errno.ENOENT:
        fix = "load the tun module (`modprobe tun`)"
    return TapFailed(f"cannot {what} tap {name}: {os.strerror(exc.errno or 0)}", fix)


class TapBusy(TapFailed):
    """The tap is a port of a bridge already (which one, `ip link set master` settles)."""


def make_tap(name: str) -> None:
    """Make tap `name`, persistent (it outlives the file that made it)."""
    try:
        tun = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail("open /dev/net/tun to make", name, exc) from None
    try:
        fcntl.ioctl(tun, TUNSETIFF, _ifreq(name, struct.pack("H", IFF_TAP | IFF_NO_PI)))
        fcntl.ioctl(tun, TUNSETPERSIST, 1)
    except OSError as exc:
        raise _fail("make", name, exc) from None
    finally:
        os.close(tun)


def plug_tap(name: str, mtu: int, bridge: str) -> None:
    """Set the tap's MTU, put it on `bridge` and up; TapBusy if it is on a bridge
    already (this call changed its MTU only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
        except OSError as exc:
            raise _fail(f"set MTU {mtu} on", name, exc) from None
        try:
            index = socket.if_nametoindex(name)
            fcntl.ioctl(sock, SIOCBRADDIF, _ifreq(bridge, struct.pack("i", index)))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise TapBusy(f"tap {name} is a bridge port already") from None
            raise _fail(f"put on bridge {bridge} the", name, exc) from None
        try:
            flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name)),
                                       IFNAMSIZ)[0]
            fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
        except OSError as exc:
            raise _fail("bring up", name, exc) from None


def link_exists(name: str) -> bool:
    """Whether this network namespace has a link `name`."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
