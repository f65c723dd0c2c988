"""One end of bench/backlog_cap.py's TCP stream, run inside a namespace (`ip netns exec`).

`recv ADDRESS PORT`: accept one connection, read it to its end, print one JSON line
(bytes read, the CLOCK_MONOTONIC time the end arrived).

`send ADDRESS PORT --first-s F --then-s T --burst-bytes B [--cap-margin-ms M]`: stream
zeros as fast as the socket takes them, the way QEMU streams RAM: for F seconds (the
"first pass", whose average throughput the cap uses, as Ferry's policy does), then
(with --cap-margin-ms) cap the send buffer exactly as the agent does
(ferry.agent.stream_socket.cap_socket), then T seconds more (the steady throughput:
bytes the receiver acknowledged, TCP_INFO's bytes_acked, so a buffer draining after the
cap counts as carried), then B bytes (the switch's last pages and device state) and the
end of the stream. Prints one JSON line: throughputs, the buffer before and after, the
path's smallest RTT, retransmitted segments, and the monotonic time the last byte was
handed to the socket. Both ends run on one machine, so the two monotonic times compare.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

from ferry.agent.stream_socket import TCP_INFO_LEN, TCPI_MIN_RTT_OFFSET, cap_socket

CHUNK = bytes(64 * 1024)
TCPI_TOTAL_RETRANS_OFFSET = 100  # struct tcp_info: __u32 tcpi_total_retrans
TCPI_BYTES_ACKED_OFFSET = 120  # __u64 tcpi_bytes_acked (Linux >= 4.1)


def _info(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)


def _acked(sock: socket.socket) -> int:
    value: int = struct.unpack_from("Q", _info(sock), TCPI_BYTES_ACKED_OFFSET)[0]
    return value


def receive(address: str, port: int) -> dict[str, float]:
    with socket.create_server((address, port)) as server:
        server.settimeout(60)
        conn, _ = server.accept()
        total = 0
        with conn:
            conn.settimeout(120)
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                total += len(data)
        return {"bytes": total, "end_at": time.monotonic()}


def _send_for(sock: socket.socket, seconds: float) -> int:
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent += sock.send(CHUNK)
    return sent


def _connect(address: str, port: int, within_s: float = 20.0) -> socket.socket:
    """Connected once the receiver (started just before, in its namespace) listens."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return socket.create_connection((address, port), timeout=30)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def send(args: argparse.Namespace) -> dict[str, float | int | None]:
    sock = _connect(args.address, args.port)
    with sock:
        sock.settimeout(120)
        first = _send_for(sock, args.first_s)
        first_rate = first / args.first_s
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        after = before
        if args.cap_margin_ms is not None:
            after = cap_socket(sock, first_rate, args.cap_margin_ms).after_bytes
        acked, began = _acked(sock), time.monotonic()
        _send_for(sock, args.then_s)
        steady = (_acked(sock) - acked) / (time.monotonic() - began)
        sock.sendall(bytes(args.burst_bytes))
        written_at = time.monotonic()
        info = _info(sock)
        min_rtt_us = struct.unpack_from("I", info, TCPI_MIN_RTT_OFFSET)[0]
        retrans = struct.unpack_from("I", info, TCPI_TOTAL_RETRANS_OFFSET)[0]
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    return {"first_bytes_s": first_rate, "steady_bytes_s": steady,
            "sndbuf_before": before, "sndbuf_after": after, "min_rtt_us": min_rtt_us,
            "retransmits": retrans, "written_at": written_at}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("recv")
    s = sub.add_parser("send")
    for q in (r, s):
        q.add_argument("address")
        q.add_argument("port", type=int)
    s.add_argument("--first-s", type=float, required=True)
    s.add_argument("--then-s", type=float, required=True)
    s.add_argument("--burst-bytes", type=int, required=True)
    s.add_argument("--cap-margin-ms", type=int, default=None)
    args = p.parse_args(argv)
    result = receive(args.address, args.port) if args.role == "recv" else send(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
