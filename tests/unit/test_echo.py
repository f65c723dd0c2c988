"""The echo client's pure parts (gap analysis, UDP counts, TCP stream verification, the
report), plus one short run of the real client process against a loopback echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.lab.echo import (
    MESSAGE_SIZE,
    EchoError,
    Gap,
    Recording,
    StreamVerifier,
    _parse_args,
    build_report,
    expected_stream,
    longest_gap,
    start_echo,
    tcp_message,
    udp_counts,
)

MS = 1_000_000


# ---- gaps --------------------------------------------------------------------------


def test_longest_gap_between_consecutive_arrivals() -> None:
    arrivals = [0, 1 * MS, 2 * MS, 50 * MS, 51 * MS]
    assert longest_gap(arrivals) == Gap(48 * MS, 2 * MS)


def test_longest_gap_sorts_its_input() -> None:
    assert longest_gap([51 * MS, 2 * MS, 50 * MS, 0, 1 * MS]) == Gap(48 * MS, 2 * MS)


def test_longest_gap_counts_silence_until_sending_stopped() -> None:
    # The target stopped answering for good: the gap runs to the end of sending.
    assert longest_gap([0, 1 * MS, 2 * MS], end_ns=500 * MS) == Gap(498 * MS, 2 * MS)
    # Replies arriving after the last request was sent are no gap.
    assert longest_gap([0, 1 * MS, 3 * MS], end_ns=2 * MS) == Gap(2 * MS, 1 * MS)


def test_longest_gap_without_replies() -> None:
    assert longest_gap([]) == Gap(0, 0)
    assert longest_gap([], end_ns=10 * MS) == Gap(0, 0)
    assert longest_gap([7]) == Gap(0, 7)


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=2))
def test_longest_gap_is_the_largest_difference(arrivals: list[int]) -> None:
    ordered = sorted(arrivals)
    gap = longest_gap(arrivals)
    assert gap.length_ns == max(b - a for a, b in pairwise(ordered))
    assert gap.start_ns in arrivals
    assert gap.start_ns + gap.length_ns in arrivals


# ---- UDP counts --------------------------------------------------------------------


def test_udp_counts_start_at_the_first_answered_request() -> None:
    # Requests 0-9 went out while the guest was booting; from 10 on, 2 were lost.
    replies = [s for s in range(10, 100) if s not in (40, 41)]
    assert udp_counts(100, replies) == (90, 88, 2)


def test_udp_counts_ignore_duplicates_and_unknown_sequence_numbers() -> None:
    assert udp_counts(5, [0, 1, 1, 2, 3, 4, 4, 99, -1]) == (5, 5, 0)


def test_udp_counts_without_replies() -> None:
    assert udp_counts(42, []) == (42, 0, 42)


# ---- the TCP stream ----------------------------------------------------------------


def test_messages_are_distinct_and_fixed_size() -> None:
    messages = [tcp_message(i) for i in range(1000)]
    assert {len(m) for m in messages} == {MESSAGE_SIZE}
    assert len(set(messages)) == len(messages)


@given(st.integers(min_value=0, max_value=500), st.integers(min_value=0, max_value=500))
def test_expected_stream_is_a_slice_of_the_messages(start: int, length: int) -> None:
    whole = b"".join(tcp_message(i) for i in range(80))
    assert expected_stream(start, length) == whole[start:start + length]


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    edges = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for a, b in pairwise(edges):
        yield data[a:b]


@given(st.integers(min_value=1, max_value=60), st.lists(st.integers(min_value=0)))
def test_an_intact_stream_passes_however_it_is_chunked(messages: int, cuts: list[int]) -> None:
    sent = b"".join(tcp_message(i) for i in range(messages))
    verifier = StreamVerifier()
    for chunk in _chunks(sent, cuts):
        verifier.feed(chunk)
    assert verifier.received == len(sent)
    assert verifier.problem(len(sent)) is None


@st.composite
def _damaged(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(sent, echoed): echoed is sent with one byte corrupted, dropped or moved, or a
    whole message dropped or repeated."""
    count = draw(st.integers(min_value=2, max_value=40))
    sent = b"".join(tcp_message(i) for i in range(count))
    kind = draw(st.sampled_from(["flip", "drop", "swap", "drop_msg", "repeat_msg"]))
    i = draw(st.integers(min_value=0, max_value=len(sent) - 2))
    m = draw(st.integers(min_value=0, max_value=count - 2)) * MESSAGE_SIZE
    if kind == "flip":
        echoed = sent[:i] + bytes([sent[i] ^ 0xFF]) + sent[i + 1:]
    elif kind == "drop":
        echoed = sent[:i] + sent[i + 1:]
    elif kind == "swap":
        # Find two neighbouring bytes that differ, so the swap changes something.
        while sent[i] == sent[i + 1]:
            i = (i + 1) % (len(sent) - 1)
        echoed = sent[:i] + sent[i + 1:i + 2] + sent[i:i + 1] + sent[i + 2:]
    elif kind == "drop_msg":
        echoed = sent[:m] + sent[m + MESSAGE_SIZE:]
    else:
        echoed = sent[:m + MESSAGE_SIZE] + sent[m:]
    return sent, echoed


@given(_damaged(), st.lists(st.integers(min_value=0)))
def test_any_damage_to_the_stream_is_noticed(case: tuple[bytes, bytes],
                                             cuts: list[int]) -> None:
    sent, echoed = case
    verifier = StreamVerifier()
    for chunk in _chunks(echoed, cuts):
        verifier.feed(chunk)
    assert verifier.problem(len(sent)) is not None


def test_missing_and_extra_bytes_are_problems() -> None:
    sent = b"".join(tcp_message(i) for i in range(4))
    short = StreamVerifier()
    short.feed(sent[:-5])
    assert short.problem(len(sent)) == f"5 of {len(sent)} bytes sent were not echoed back"
    extra = StreamVerifier()
    extra.feed(sent)
    assert (extra.problem(len(sent) - MESSAGE_SIZE)
            == f"{MESSAGE_SIZE} bytes echoed that were never sent")


def test_the_first_wrong_byte_is_located() -> None:
    sent = b"".join(tcp_message(i) for i in range(4))
    verifier = StreamVerifier()
    verifier.feed(sent[:20])
    verifier.feed(sent[20:37] + bytes([sent[37] ^ 1]) + sent[38:])
    verifier.feed(b"")
    assert verifier.mismatch_at == 37
    assert verifier.received == len(sent)


# ---- the report --------------------------------------------------------------------


def _recording(**overrides: object) -> Recording:
    fields: dict[str, object] = dict(
        target="198.19.210.10", anchor_wall=1000.0, anchor_ns=5 * 10**9,
        end_ns=5 * 10**9 + 3 * 10**9, udp_sent=3000, reply_seqs=[0, 1, 2, 3],
        arrivals_ns=[5 * 10**9 + x * MS for x in (1, 2, 300, 301)],
        tcp_connected=True, tcp_bytes_sent=160, tcp_bytes_echoed=160, tcp_error=None)
    fields.update(overrides)
    return Recording(**fields)  # type: ignore[arg-type]


def test_report_relates_the_gap_to_wall_clock() -> None:
    report = build_report(_recording(end_ns=5 * 10**9 + 302 * MS, udp_sent=4))
    assert report.max_gap_ms == 298.0
    assert report.max_gap_start == pytest.approx(1000.002)
    assert report.duration_s == pytest.approx(0.302)
    assert (report.udp_sent, report.udp_replies, report.udp_lost) == (4, 4, 0)
    assert not report.tcp_broken and report.tcp_error is None


def test_report_counts_silence_at_the_end() -> None:
    report = build_report(_recording())
    assert report.max_gap_ms == 3000.0 - 301.0
    assert report.udp_lost == 3000 - 4


def test_report_tcp_error_or_no_connection_is_broken() -> None:
    assert build_report(_recording(tcp_error="recv: reset")).tcp_broken
    report = build_report(_recording(tcp_connected=False, tcp_bytes_sent=0,
                                     tcp_bytes_echoed=0))
    assert report.tcp_broken and report.tcp_error == "never connected"


def test_report_without_replies() -> None:
    report = build_report(_recording(reply_seqs=[], arrivals_ns=[]))
    assert (report.udp_replies, report.max_gap_ms, report.max_gap_start) == (0, 0.0, 0.0)


def test_arguments() -> None:
    args = _parse_args(["--target", "10.0.0.1", "--out", "/tmp/x.json"])
    assert (args.port, args.interval_ms, args.out) == (7, 1.0, Path("/tmp/x.json"))
    with pytest.raises(SystemExit):
        _parse_args(["--target", "10.0.0.1", "--out", "x", "--interval-ms", "0"])


# ---- the real client, on loopback --------------------------------------------------


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _TcpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def loopback_echo() -> Iterator[int]:
    tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TcpEcho)
    tcp.daemon_threads = True
    port = tcp.server_address[1]
    udp = socketserver.UDPServer(("127.0.0.1", port), _UdpEcho)
    for server in (tcp, udp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield port
    finally:
        for server in (tcp, udp):
            server.shutdown()
            server.server_close()


def test_client_process_against_a_loopback_echo_server(loopback_echo: int,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "echo.json"
    with start_echo(None, "127.0.0.1", out, port=loopback_echo, ready_timeout_s=20) as session:
        time.sleep(0.5)
        report = session.stop()
    assert report.udp_replies > 0
    assert report.tcp_connected and not report.tcp_broken, report.tcp_error
    assert report.tcp_bytes_sent > 0
    assert report.tcp_bytes_echoed == report.tcp_bytes_sent
    assert not out.with_name(out.name + ".tmp").exists()


def test_start_echo_says_why_when_nothing_answers(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EchoError, match="no UDP reply and TCP connection within 1 s"):
        start_echo(None, "127.0.0.1", tmp_path / "echo.json", port=port, ready_timeout_s=1)
