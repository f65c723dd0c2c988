"""The lab's echo client: a migration's downtime as a client sees it.

Runs as its own process inside a network namespace (an "outside" machine), against the
probe guest's echo server (guest/echod.c, UDP and TCP port 7):

    python -m ferry.lab.echo --target 198.19.210.10 --out report.json

- UDP: a sequence-numbered request every --interval-ms; a dedicated receiver thread
  timestamps every reply. Client-visible downtime is the longest interval between
  consecutive reply arrivals.
- TCP: one connection streaming a 16-byte sequence-numbered message every interval; the
  echoed stream must be byte for byte what was sent, in order. A reset, EOF, error or any
  lost, reordered or corrupted byte marks it broken. There is no reconnect: surviving
  the migration is the point.

It prints READY_LINE on stdout once the first UDP reply has arrived and TCP is connected.
On SIGTERM or SIGINT it stops sending, waits up to 2 s for outstanding echoes, writes an
EchoReport as JSON to --out (tmp + rename) and exits 0.

Host side: start_echo() spawns it with `ip netns exec`, EchoSession.stop() ends it and
returns the report.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from pydantic import BaseModel, ConfigDict

from ferry.domain.errors import FerryError

READY_LINE = "FERRY-ECHO-CLIENT-READY"
DEFAULT_PORT = 7
MESSAGE_SIZE = 16
DRAIN_S = 2.0  # how long stop waits for outstanding TCP echo bytes
UDP_DRAIN_S = 0.5  # and for the last UDP replies (a 1 ms RTT needs far less)
_UDP_PAD = b"\0" * 24  # requests of 32 bytes, a small realistic packet
_MASK = (1 << 64) - 1


class EchoError(FerryError):
    code = "echo_error"


class EchoReport(BaseModel):
    """What the client saw. Monotonic times are converted to wall clock (epoch seconds)
    through an anchor taken at start, so they can be lined up with migration events."""

    model_config = ConfigDict(frozen=True)

    target: str
    started_at: float  # epoch seconds
    duration_s: float  # from the client's start (target maybe still booting) to the last send
    udp_sent: int  # requests sent since the first answered one (see udp_counts)
    udp_replies: int
    udp_lost: int
    max_gap_ms: float  # longest interval between consecutive UDP reply arrivals
    max_gap_start: float  # epoch seconds where that gap began (0.0: no replies)
    tcp_connected: bool
    tcp_bytes_sent: int
    tcp_bytes_echoed: int
    tcp_broken: bool
    tcp_error: str | None
    tcp_used: bool = True  # False: the client ran UDP only (--no-tcp)


# ---- pure parts --------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    length_ns: int
    start_ns: int  # monotonic time of the reply that opened the gap


def longest_gap(arrivals_ns: Iterable[int], end_ns: int | None = None) -> Gap:
    """The longest interval between consecutive reply arrivals. With end_ns (when the
    client stopped sending), the silence from the last reply until then counts too, so a
    target that never answered again is not reported as a short gap."""
    times = sorted(arrivals_ns)
    if not times:
        return Gap(0, 0)
    best = Gap(0, times[0])
    for a, b in pairwise(times):
        if b - a > best.length_ns:
            best = Gap(b - a, a)
    if end_ns is not None and end_ns - times[-1] > best.length_ns:
        best = Gap(end_ns - times[-1], times[-1])
    return best


def udp_counts(sent: int, reply_seqs: Iterable[int]) -> tuple[int, int, int]:
    """(sent, replies, lost), counted from the first answered request on: requests sent
    while the target was still coming up are not losses. Duplicates count once; replies
    to requests never sent are ignored."""
    seqs = {s for s in reply_seqs if 0 <= s < sent}
    if not seqs:
        return sent, 0, sent
    window = sent - min(seqs)
    return window, len(seqs), window - len(seqs)


def tcp_message(seq: int) -> bytes:
    """Message `seq` of the TCP stream: the sequence number and a hash of it, so a lost,
    repeated or reordered message (or byte) never lines up with what is expected."""
    return struct.pack(">QQ", seq, ((seq + 1) * 0x9E3779B97F4A7C15) & _MASK)


def expected_stream(start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the stream the client sends."""
    first, skip = divmod(start, MESSAGE_SIZE)
    count = (skip + length + MESSAGE_SIZE - 1) // MESSAGE_SIZE
    data = b"".join(tcp_message(first + i) for i in range(count))
    return data[skip:skip + length]


class StreamVerifier:
    """Checks the echoed TCP stream, chunk by chunk as it arrives, against the stream the
    client sends (which is a function of the offset, so nothing needs to be kept)."""

    def __init__(self) -> None:
        self.received = 0
        self.mismatch_at: int | None = None  # stream offset of the first wrong byte

    def feed(self, data: bytes) -> None:
        if self.mismatch_at is None:
            want = expected_stream(self.received, len(data))
            if data != want:
                at = next(i for i, (a, b) in enumerate(zip(data, want, strict=True)) if a != b)
                self.mismatch_at = self.received + at
        self.received += len(data)

    def problem(self, sent: int) -> str | None:
        """Why the echoed stream is not exactly the `sent` bytes sent, or None."""
        if self.mismatch_at is not None:
            return (f"echoed byte {self.mismatch_at} differs from what was sent "
                    "(lost, reordered or corrupted)")
        if self.received > sent:
            return f"{self.received - sent} bytes echoed that were never sent"
        if self.received < sent:
            return f"{sent - self.received} of {sent} bytes sent were not echoed back"
        return None


@dataclass(frozen=True)
class Recording:
    """Raw observations of one run, monotonic nanoseconds throughout."""

    target: str
    anchor_wall: float  # time.time() ...
    anchor_ns: int  # ... and time.monotonic_ns() read together at start
    end_ns: int  # when sending stopped
    udp_sent: int
    reply_seqs: Sequence[int]
    arrivals_ns: Sequence[int]
    tcp_connected: bool
    tcp_bytes_sent: int
    tcp_bytes_echoed: int
    tcp_error: str | None  # a socket error, EOF or a stream problem
    tcp_used: bool = True  # False: UDP only (--no-tcp)


def build_report(rec: Recording) -> EchoReport:
    sent, replies, lost = udp_counts(rec.udp_sent, rec.reply_seqs)
    gap = longest_gap(rec.arrivals_ns, rec.end_ns)
    error = rec.tcp_error if rec.tcp_connected else (rec.tcp_error or "never connected")
    if not rec.tcp_used:
        error = None
    return EchoReport(
        target=rec.target,
        started_at=rec.anchor_wall,
        duration_s=(rec.end_ns - rec.anchor_ns) / 1e9,
        udp_sent=sent,
        udp_replies=replies,
        udp_lost=lost,
        max_gap_ms=gap.length_ns / 1e6,
        max_gap_start=(rec.anchor_wall + (gap.start_ns - rec.anchor_ns) / 1e9
                       if rec.arrivals_ns else 0.0),
        tcp_connected=rec.tcp_connected,
        tcp_bytes_sent=rec.tcp_bytes_sent,
        tcp_bytes_echoed=rec.tcp_bytes_echoed,
        tcp_broken=error is not None,
        tcp_error=error,
        tcp_used=rec.tcp_used,
    )


# ---- the client process ------------------------------------------------------------


class _Client:
    def __init__(self, target: str, port: int, interval_ms: float, tcp: bool = True
                 ) -> None:
        self.target, self.port, self.use_tcp = target, port, tcp
        self.interval_ns = max(1, int(interval_ms * 1e6))
        self.anchor_wall, self.anchor_ns = time.time(), time.monotonic_ns()
        self.stop_sending = threading.Event()
        self.done = threading.Event()  # receivers may stop
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.connect((target, port))
        self.udp_sent = 0
        self.end_ns = 0
        self.reply_seqs: list[int] = []
        self.arrivals_ns: list[int] = []
        self.tcp: socket.socket | None = None
        self.tcp_connected = threading.Event()
        self.tcp_sent = 0
        self.tcp_error: str | None = None
        self.verifier = StreamVerifier()
        # Without TCP nothing but echo replies leaves the guest: how long the network
        # keeps sending to the old host after a migration shows then.
        workers = [self._udp_send, self._udp_receive] + ([self._tcp_run] if tcp else [])
        self.threads = [threading.Thread(target=f, name=f.__name__, daemon=True)
                        for f in workers]

    def _ticks(self) -> Iterable[int]:
        """Yield every interval until told to stop. Absolute schedule, so sleep overshoot
        does not drift the rate; after a stall (e.g. CPU starvation) it resumes rather
        than bursting the missed requests out at once."""
        n, next_ns = 0, time.monotonic_ns()
        while not self.stop_sending.is_set():
            yield n
            n += 1
            next_ns += self.interval_ns
            now = time.monotonic_ns()
            if next_ns > now:
                time.sleep((next_ns - now) / 1e9)
            elif now - next_ns > 10 * self.interval_ns:
                next_ns = now

    def _udp_send(self) -> None:
        for seq in self._ticks():
            # An ICMP error from an earlier request may surface here: still sent.
            with contextlib.suppress(OSError):
                self.udp.send(struct.pack(">Q", seq) + _UDP_PAD)
            self.udp_sent = seq + 1
        self.end_ns = time.monotonic_ns()

    def _udp_receive(self) -> None:
        while not self.done.is_set():
            ready, _, _ = select.select([self.udp], [], [], 0.1)
            if not ready:
                continue
            try:
                data = self.udp.recv(2048, socket.MSG_DONTWAIT)
            except OSError:
                continue  # unreachable while the target is away; keep listening
            now = time.monotonic_ns()
            if len(data) >= 8:
                self.arrivals_ns.append(now)
                self.reply_seqs.append(struct.unpack_from(">Q", data)[0])

    def _tcp_run(self) -> None:
        # The echo server may not listen yet (guest booting): retry until connected.
        while not self.stop_sending.is_set():
            try:
                sock = socket.create_connection((self.target, self.port), timeout=1.0)
                break
            except OSError:
                time.sleep(0.1)
        else:
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tcp = sock
        receiver = threading.Thread(target=self._tcp_receive, name="tcp_receive",
                                    daemon=True)
        receiver.start()
        self.threads.append(receiver)
        self.tcp_connected.set()
        # Non-blocking sends with a local backlog: a stalled connection (target paused)
        # must not stall the schedule; the backlog goes out when the window opens.
        pending = bytearray()
        for seq in self._ticks():
            pending += tcp_message(seq)
            if not self._tcp_push(sock, pending):
                return
        deadline = time.monotonic() + DRAIN_S
        while pending and self.tcp_error is None and time.monotonic() < deadline:
            if not self._tcp_push(sock, pending):
                return
            time.sleep(0.005)

    def _tcp_push(self, sock: socket.socket, pending: bytearray) -> bool:
        try:
            n = sock.send(pending, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError as e:
            self._tcp_fail(f"send: {e}")
            return False
        del pending[:n]
        self.tcp_sent += n
        return True

    def _tcp_receive(self) -> None:
        assert self.tcp is not None
        while not self.done.is_set():
            ready, _, _ = select.select([self.tcp], [], [], 0.1)
            if not ready:
                continue
            try:
                data = self.tcp.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                self._tcp_fail(f"recv: {e}")
                return
            if not data:
                self._tcp_fail("connection closed by the target (EOF)")
                return
            self.verifier.feed(data)

    def _tcp_fail(self, why: str) -> None:
        if self.tcp_error is None:
            self.tcp_error = why

    def start(self) -> None:
        for t in list(self.threads):
            t.start()

    def ready(self) -> bool:
        return bool(self.arrivals_ns) and (self.tcp_connected.is_set() or not self.use_tcp)

    def finish(self) -> Recording:
        """Stop sending, wait (bounded) for outstanding echoes, stop receiving."""
        self.stop_sending.set()
        deadline = time.monotonic() + DRAIN_S
        for t in self.threads[:1]:
            t.join()
        udp_deadline = time.monotonic() + UDP_DRAIN_S
        while time.monotonic() < udp_deadline and (
                not self.reply_seqs or max(self.reply_seqs) < self.udp_sent - 1):
            time.sleep(0.01)
        for t in self.threads[2:]:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
        while (self.tcp_connected.is_set() and self.tcp_error is None
               and self.verifier.received < self.tcp_sent and time.monotonic() < deadline):
            time.sleep(0.01)
        self.done.set()
        for t in self.threads[1:]:
            t.join(timeout=1.0)
        error = self.tcp_error
        if self.tcp_connected.is_set():
            error = error or self.verifier.problem(self.tcp_sent)
        for s in (self.udp, self.tcp):
            if s is not None:
                s.close()
        return Recording(
            target=self.target, anchor_wall=self.anchor_wall, anchor_ns=self.anchor_ns,
            end_ns=self.end_ns or time.monotonic_ns(), udp_sent=self.udp_sent,
            reply_seqs=list(self.reply_seqs), arrivals_ns=list(self.arrivals_ns),
            tcp_connected=self.tcp_connected.is_set(), tcp_bytes_sent=self.tcp_sent,
            tcp_bytes_echoed=self.verifier.received, tcp_error=error, tcp_used=self.use_tcp)


def write_report(report: EchoReport, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(report.model_dump_json(indent=2) + "\n")
    os.replace(tmp, out)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ferry.lab.echo",
        description="Echo client: measures the gap in UDP echo replies and checks that a "
                    "TCP echo stream survives intact. Run it inside the client's network "
                    "namespace; stop it with SIGTERM or SIGINT to get the JSON report.")
    parser.add_argument("--target", required=True, help="the echo server's IPv4 address")
    parser.add_argument("--out", required=True, type=Path,
                        help="where to write the JSON report (atomically) on exit")
    parser.add_argument("--interval-ms", type=float, default=1.0,
                        help="time between UDP requests and TCP messages (default 1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"UDP and TCP port of the echo server (default {DEFAULT_PORT})")
    parser.add_argument("--no-tcp", dest="tcp", action="store_false",
                        help="UDP echo only: no TCP stream (then the guest sends nothing "
                             "unasked, which shows how long frames go to its old host)")
    args = parser.parse_args(argv)
    if args.interval_ms <= 0:
        parser.error("--interval-ms must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = _Client(args.target, args.port, args.interval_ms, tcp=args.tcp)
    client.start()
    announced = False
    while not stop.wait(0.01):
        if not announced and client.ready():
            print(READY_LINE, flush=True)
            announced = True
    write_report(build_report(client.finish()), args.out)
    return 0


# ---- host side ---------------------------------------------------------------------


class EchoSession:
    """A running echo client. stop() ends it and returns its report; as a context
    manager it always kills the process on exit (stop() first to get the report)."""

    def __init__(self, proc: subprocess.Popen[str], out: Path, stderr: IO[bytes]) -> None:
        self.proc, self.out, self._stderr = proc, out, stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        with contextlib.suppress(ValueError, OSError):  # closed already
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()[-2000:]
        return ""

    def stop(self, timeout_s: float = 10.0) -> EchoReport:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            err = self.stderr_text()
            self.kill()
            raise EchoError(f"echo client did not stop within {timeout_s:g} s: {err}") from None
        err = self.stderr_text()
        self._close()
        if rc != 0:
            raise EchoError(f"echo client exited with status {rc}: {err}")
        try:
            return EchoReport.model_validate_json(self.out.read_text())
        except (OSError, ValueError) as e:
            raise EchoError(f"echo client wrote no readable report at {self.out}: {e}") from e

    def kill(self) -> None:
        if self.proc.poll() is None:
            # Its own session (start_new_session): the group is just the client.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> EchoSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float) -> str | None:
    """None once the client printed READY_LINE, else why not."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if ready:
            line = proc.stdout.readline()
            if line.strip() == READY_LINE:
                return None
            if not line:
                proc.wait()
                return f"exited with status {proc.returncode} before it was ready"
        elif proc.poll() is not None:
            return f"exited with status {proc.returncode} before it was ready"
    return f"no UDP reply and TCP connection within {timeout_s:g} s"


def start_echo(ns: str | None, target: str, out: Path, *, python: str = sys.executable,
               port: int = DEFAULT_PORT, interval_ms: float = 1.0,
               ready_timeout_s: float = 30.0, tcp: bool = True) -> EchoSession:
    """Start the echo client in network namespace `ns` (None: this one) against `target`
    and wait until it has its first UDP reply and its TCP connection."""
    out.unlink(missing_ok=True)  # never mistake an old report for this run's
    cmd = [python, "-m", "ferry.lab.echo", "--target", target, "--out", str(out),
           "--port", str(port), "--interval-ms", str(interval_ms)] + ([] if tcp else ["--no-tcp"])
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    # The child imports this very ferry, wherever it was imported from.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the session owns and closes it
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env=env, start_new_session=True)
    except OSError:
        stderr.close()
        raise
    session = EchoSession(proc, out, stderr)
    try:
        problem = _wait_ready(proc, ready_timeout_s)
    except BaseException:
        session.kill()
        raise
    if problem is not None:
        err = session.stderr_text()
        session.kill()
        where = f" in namespace {ns}" if ns is not None else ""
        raise EchoError(f"echo client to {target}{where} {problem}"
                        + (f": {err}" if err else ""))
    return session


if __name__ == "__main__":
    sys.exit(main())
