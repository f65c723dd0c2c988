"""The kernel's watchdog device behind the host watchdog (optional, `kernel_watchdog` in
the agent's config): the host resets when ferry-watchdog itself stops, or when a QEMU
it had to kill survives.

ferry-watchdog (watchdog.py) kills the host's QEMUs when the agent stops renewing its
leases; nothing covers ferry-watchdog hanging, or a QEMU stuck in the kernel that
SIGKILL does not end. sanlock has wdmd and the kernel watchdog for that; so does Ferry,
when asked: ferry-watchdog opens the device (softdog or a hardware watchdog), sets its
timeout, and writes to it every round while it works and the host's guests are as the
leases allow. It stops writing, so the kernel resets the host, when a QEMU it killed is
still there a second later. A stop on purpose (SIGTERM) writes the magic close first.

The timeout must end before another host may take a lease (expire_s after the last
renewal it saw): the default 4 s is under the 6 s of the default lease timing. A device
that keeps a longer timeout is still used, and the log says so.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

# <linux/watchdog.h>: _IOWR('W', 6, int) and _IOR('W', 7, int)
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
MAGIC_CLOSE = b"V"
DEFAULT_TIMEOUT_S = 4


class KernelWatchdog:
    """One open watchdog device: `pet` keeps the host alive, `disarm` stops it for good
    (the driver's magic close; a driver built with nowayout ignores it)."""

    def __init__(self, path: Path, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
        self.path = path
        self.wanted_s = timeout_s
        self.timeout_s: int | None = None  # what the device says it uses (None: unknown)
        self.silenced = False  # no longer fed: the kernel resets the host
        self._fd: int | None = None

    def open(self) -> str:
        """Open and arm the device; returns a line for the watchdog's log."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self._fd, WDIOC_SETTIMEOUT, struct.pack("i", self.wanted_s))
            got = fcntl.ioctl(self._fd, WDIOC_GETTIMEOUT, struct.pack("i", 0))
            self.timeout_s = struct.unpack("i", got)[0]
        except OSError as exc:
            return f"kernel watchdog {self.path} armed; its timeout is unknown ({exc})"
        if self.timeout_s > self.wanted_s:
            return (f"kernel watchdog {self.path} armed with {self.timeout_s} s, longer "
                    f"than the {self.wanted_s} s asked for: a hung host may outlive its "
                    "leases")
        return f"kernel watchdog {self.path} armed ({self.timeout_s} s)"

    def pet(self) -> None:
        if self._fd is not None:
            os.write(self._fd, b"\0")

    def stop_feeding(self) -> None:
        """Stop feeding it (the device stays armed): the host resets within the timeout."""
        self.silenced = True

    def disarm(self) -> None:
        if self._fd is not None:
            os.write(self._fd, MAGIC_CLOSE)
            os.close(self._fd)
            self._fd = None
