"""A point-to-point link with a real round-trip time between two network namespaces:
the lab's stand-in for a long-distance path (netem does not exist on these machines).

Two TUN devices, one moved into each namespace, carry IP packets to this process, which
writes each packet into the other device `one_way_ms` after it read it. TCP sees a true
RTT (its bandwidth-delay product is in flight, not buffered in a relay that terminates
it, as a TCP proxy would do). An optional tbf on each side's device shapes the link.

Run as a process (`python -m ferry.lab.delay_line ...`): it prints one line, "ready",
once both ends are up, forwards until SIGTERM or SIGINT, and its devices vanish with it
(they are not persistent). Root only. Packets are forwarded one at a time by Python:
fine for tens of MB/s, not for a fast link.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import fcntl
import os
import signal
import struct
import sys
from dataclasses import dataclass

from ferry.lab import net

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_TUN_EXCL = 0x8000  # fail if the name exists: never attach to someone else's device
MAX_PACKET = 65535


@dataclass(frozen=True)
class End:
    """One end of the link: a namespace, the device's name there, its address."""

    netns: str
    device: str
    address: str


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL))
    except OSError as exc:
        os.close(fd)
        raise RuntimeError(f"cannot make TUN device {name}: {exc.strerror}"
                           + (" (a device of that name exists: not this line's)"
                              if exc.errno == errno.EBUSY else "")) from exc
    return fd


def _set_up(end: End, peer: End, rate_bits_s: int | None) -> None:
    """Move the device (made here) into its namespace, address it, shape it."""
    net.ip("link", "set", end.device, "netns", end.netns)
    net.ip("-n", end.netns, "addr", "add", end.address, "peer", peer.address, "dev",
           end.device)
    net.ip("-n", end.netns, "link", "set", end.device, "up")
    if rate_bits_s:
        net.tc("qdisc", "replace", "dev", end.device, "root", *net.tbf(rate_bits_s),
               ns=end.netns)


class _Direction:
    """Packets read from one device, written to the other once their time has come."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: int, dst: int,
                 delay_s: float) -> None:
        self.loop, self.src, self.dst, self.delay_s = loop, src, dst, delay_s
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.dropped = 0

    def readable(self) -> None:
        now = self.loop.time()
        for _ in range(64):  # a burst at a time, then let the other direction run
            try:
                packet = os.read(self.src, MAX_PACKET)
            except BlockingIOError:
                break
            self.queue.append((now + self.delay_s, packet))
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, packet = self.queue.popleft()
            try:
                os.write(self.dst, packet)
            except OSError:
                self.dropped += 1  # the device's queue is full: a lost packet, as on a wire
        self._arm()


async def forward(a: End, b: End, one_way_ms: float, rate_bits_s: int | None) -> None:
    fd_a, fd_b = _tun(a.device), _tun(b.device)
    try:
        _set_up(a, b, rate_bits_s)
        _set_up(b, a, rate_bits_s)
        loop = asyncio.get_running_loop()
        delay_s = one_way_ms / 1000
        a_to_b = _Direction(loop, fd_a, fd_b, delay_s)
        b_to_a = _Direction(loop, fd_b, fd_a, delay_s)
        loop.add_reader(fd_a, a_to_b.readable)
        loop.add_reader(fd_b, b_to_a.readable)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        loop.remove_reader(fd_a)
        loop.remove_reader(fd_b)
        if a_to_b.dropped or b_to_a.dropped:
            print(f"delay line: {a_to_b.dropped} packets lost towards {b.netns}, "
                  f"{b_to_a.dropped} towards {a.netns}", file=sys.stderr, flush=True)
    finally:
        os.close(fd_a)
        os.close(fd_b)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--a", nargs=3, metavar=("NETNS", "DEVICE", "ADDRESS"), required=True)
    p.add_argument("--b", nargs=3, metavar=("NETNS", "DEVICE", "ADDRESS"), required=True)
    p.add_argument("--one-way-ms", type=float, required=True,
                   help="delay each way (the RTT is twice this)")
    p.add_argument("--rate-bits", type=int, default=None,
                   help="shape each direction to this many bits/s (tbf)")
    args = p.parse_args(argv)
    if args.one_way_ms < 0:
        p.error("--one-way-ms must be 0 or more")
    try:
        asyncio.run(forward(End(*args.a), End(*args.b), args.one_way_ms, args.rate_bits))
    except (OSError, RuntimeError) as exc:
        print(f"delay line failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
