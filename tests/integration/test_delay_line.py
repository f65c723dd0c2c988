"""The lab's long-distance link (ferry/lab/delay_line.py) between two scratch namespaces:
TCP over it sees the round trip asked for, its bytes arrive intact, and its devices go
with the process (bench/backlog_cap.py measures the stream-backlog cap over it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

PREFIX = f"ferry-dl-{os.getpid()}"
NS_A, NS_B = f"{PREFIX}-a", f"{PREFIX}-b"
DEV_A, DEV_B = f"fdl{os.getpid() % 100000}a", f"fdl{os.getpid() % 100000}b"
ADDR_A, ADDR_B = "198.18.252.1", "198.18.252.2"
ONE_WAY_MS = 25
PORT = 5700

# Run in NS_B: echo one connection back to its sender.
ECHO = f"""
import socket
with socket.create_server(("{ADDR_B}", {PORT})) as srv:
    srv.settimeout(60)
    conn, _ = srv.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
"""
# Run in NS_A: send 2 MiB of a pattern, read it back, report what TCP saw.
CLIENT = f"""
import json, socket, struct, threading
from ferry.agent.stream_socket import TCP_INFO_LEN, TCPI_MIN_RTT_OFFSET
data = bytes(range(256)) * 8192
sock = socket.create_connection(("{ADDR_B}", {PORT}), timeout=60)
sender = threading.Thread(target=sock.sendall, args=(data,))
sender.start()
got = bytearray()
while len(got) < len(data):
    chunk = sock.recv(65536)
    if not chunk:
        break
    got += chunk
sender.join()
info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
print(json.dumps({{"intact": bytes(got) == data, "bytes": len(got),
                  "min_rtt_us": struct.unpack_from("I", info, TCPI_MIN_RTT_OFFSET)[0]}}))
"""


def _ns(*argv: str) -> None:
    subprocess.run(["ip", "netns", *argv], check=False, timeout=30, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root, as CI does")
    made: list[str] = []
    try:
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
            made.append(ns)
        yield
    finally:
        for ns in made:
            _ns("delete", ns)


def _links(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [link["ifname"] for link in json.loads(out)]


def test_tcp_sees_the_round_trip_and_its_bytes_arrive(namespaces: None) -> None:
    line = subprocess.Popen(
        [sys.executable, "-m", "ferry.lab.delay_line", "--a", NS_A, DEV_A, ADDR_A,
         "--b", NS_B, DEV_B, ADDR_B, "--one-way-ms", str(ONE_WAY_MS),
         "--rate-bits", str(50_000_000)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    echo = None
    try:
        assert line.stdout is not None
        assert line.stdout.readline().strip() == "ready", line.stderr
        assert DEV_A in _links(NS_A) and DEV_B in _links(NS_B)
        echo = subprocess.Popen(["ip", "netns", "exec", NS_B, sys.executable, "-c", ECHO])
        out = ""
        for _ in range(50):  # the server binds
            done = subprocess.run(["ip", "netns", "exec", NS_A, sys.executable, "-c", CLIENT],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                out = done.stdout
                break
            assert "Connection refused" in done.stderr, done.stderr
        seen = json.loads(out)
        assert seen["intact"] and seen["bytes"] == 2 << 20, seen
        # Packets are held at least ONE_WAY_MS each way (1 ms for the timer's grain).
        assert seen["min_rtt_us"] >= (2 * ONE_WAY_MS - 1) * 1000, seen
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
        line.send_signal(signal.SIGTERM)
        assert line.wait(10) == 0
    # Not persistent: the devices went with the process.
    assert DEV_A not in _links(NS_A) and DEV_B not in _links(NS_B)


def test_a_bad_namespace_is_reported_and_leaves_nothing() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root, as CI does")
    done = subprocess.run(
        [sys.executable, "-m", "ferry.lab.delay_line", "--a", f"{PREFIX}-none", DEV_A,
         ADDR_A, "--b", f"{PREFIX}-none2", DEV_B, ADDR_B, "--one-way-ms", "1"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "delay line failed" in done.stderr, done.stderr
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                           timeout=30, check=True).stdout
    assert DEV_A not in links and DEV_B not in links
