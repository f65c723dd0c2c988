"""Run inside a network namespace by test_nic_filter.py: write frames into a tap (as a
guest's QEMU would) and report which of them reached another port of the bridge.

usage: nic_frames.py TAP LISTEN_DEV SOURCE_MAC...  (prints a JSON list of the source
MACs whose frame arrived)
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else on the bridge sends it
WAIT_S = 1.0


def _mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def main(tap: str, listen: str, sources: list[str]) -> list[str]:
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    rx.bind((listen, ETHERTYPE))
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
        time.sleep(0.2)  # carrier up on the bridge port
        for src in sources:
            frame = b"\xff" * 6 + _mac(src) + struct.pack("!H", ETHERTYPE) + \
                b"ferry " + src.encode() + bytes(40)
            os.write(fd, frame)
        arrived: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([rx], [], [], left)[0]:
                break
            data = rx.recv(2048)
            arrived += [s for s in sources if data[6:12] == _mac(s)]
        return arrived
    finally:
        os.close(fd)
        rx.close()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
