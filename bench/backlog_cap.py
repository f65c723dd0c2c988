"""Ferry's stream-backlog cap (CAP_BACKLOG) on long round trips: throughput kept, and the
switch's wait behind the backlog, capped against uncapped, at several RTTs.

Method
------
Two namespaces (`<prefix>-a`, `<prefix>-b`) joined by ferry.lab.delay_line: a
point-to-point link through this machine's userspace, each way delayed by RTT/2 and
shaped to --mbit with tbf (as the lab shapes its hosts' links). For every RTT in --rtts,
--runs pairs of one capped and one uncapped stream, in ABBA order
(bench/common.py abba). Each stream (bench/stream_peer.py) sends zeros as fast as its
socket takes them, as QEMU sends RAM: --first-s seconds (the "first pass"), then the
capped side caps its send buffer exactly as Ferry's source agent does (cap_socket: the
path's smallest RTT plus BACKLOG_MARGIN_MS, at the first pass's average throughput, only
ever lower), then --then-s seconds whose throughput is the steady rate, then a burst of
--burst-mib (the switch's last pages and device state) and the end of the stream.

- throughput: bytes the receiver acknowledged per second in the --then-s phase (what
  the path carried; a buffer still draining after the cap counts, as QEMU's link stays
  busy then too).
- switch wait: from the moment the burst's last byte was in the socket (where QEMU
  counts it sent) to the moment the receiver read the stream's end; the burst's own
  transfer time and the one-way delay are in it for both sides alike.

Summary per RTT: medians of both sides, the throughput ratio (capped / uncapped, per
pair) and the switch-wait delta (capped - uncapped, per pair). A pair with a failed side
is counted as failed and left out. Last line: `throughput_ratio_min=<min over RTTs of the
median ratio> wait_delta_ms_max=<max over RTTs of the median delta> pairs=<n>
failed=<n>`.

Needs root. Sends nothing outside the two namespaces it creates (and removes).
Run: .venv/bin/python bench/backlog_cap.py [--rtts 0,20,50,150] [--runs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import abba, fmt, median, pair_fields

from ferry.domain.convergence import BACKLOG_MARGIN_MS
from ferry.lab.net import ip

HERE = Path(__file__).resolve().parent
PORT = 5601


@dataclass
class Run:
    rtt_ms: int
    pair: int
    capped: bool
    ok: bool = False
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    wait_ms: float | None = None

    @property
    def throughput(self) -> float | None:
        return self.result.get("steady_bytes_s") if self.ok else None


@contextlib.contextmanager
def namespaces(prefix: str) -> Iterator[tuple[str, str]]:
    a, b = f"{prefix}-a", f"{prefix}-b"
    made: list[str] = []
    try:
        for ns in (a, b):
            # One that exists is someone else's (or a crashed run's): never taken over.
            if Path(f"/run/netns/{ns}").exists():
                raise RuntimeError(f"network namespace {ns} exists already: remove it "
                                   "(`ip netns delete`) if it is a leftover, or pick "
                                   "another --prefix")
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in made:
            ip("netns", "delete", ns, check=False)


@contextlib.contextmanager
def delay_line(a: str, b: str, addresses: tuple[str, str], rtt_ms: int,
               mbit: int) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry.lab.delay_line",
         "--a", a, f"{a}-dly", addresses[0], "--b", b, f"{b}-dly", addresses[1],
         "--one-way-ms", str(rtt_ms / 2), "--rate-bits", str(mbit * 1_000_000)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the delay line did not start: {line} "
                               f"{proc.stderr.read() if proc.stderr else ''}")
        yield
    finally:
        proc.terminate()
        try:
            _, said = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, said = proc.communicate()
        if said.strip():
            print(f"  rtt={rtt_ms:>3}: {said.strip()}", flush=True)  # packets it lost


def in_ns(ns: str, *argv: str) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def one_stream(args: argparse.Namespace, a: str, b: str, addresses: tuple[str, str],
               run: Run) -> None:
    peer = str(HERE / "stream_peer.py")
    cap = ["--cap-margin-ms", str(BACKLOG_MARGIN_MS)] if run.capped else []
    started: list[subprocess.Popen[str]] = []
    try:
        receiver = in_ns(b, peer, "recv", addresses[1], str(PORT))
        started.append(receiver)
        sender = in_ns(a, peer, "send", addresses[1], str(PORT),
                       "--first-s", str(args.first_s), "--then-s", str(args.then_s),
                       "--burst-bytes", str(args.burst_mib << 20), *cap)
        started.append(sender)
        out, err = sender.communicate(timeout=args.first_s + args.then_s + 120)
        if sender.returncode != 0:
            raise RuntimeError(f"sender: {err.strip()[-400:]}")
        got, rerr = receiver.communicate(timeout=30)
        if receiver.returncode != 0:
            raise RuntimeError(f"receiver: {rerr.strip()[-400:]}")
    finally:
        for proc in started:  # one that timed out or was left behind by a failure
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run.result = json.loads(out)
    end = json.loads(got)
    run.wait_ms = (end["end_at"] - run.result["written_at"]) * 1000
    run.ok = True


def benchmark(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    addresses = (args.address_a, args.address_b)
    with namespaces(args.prefix) as (a, b):
        for rtt in args.rtts:
            with delay_line(a, b, addresses, rtt, args.mbit):
                for pair in range(args.runs):
                    for capped in abba(pair, True, False):
                        run = Run(rtt_ms=rtt, pair=pair, capped=capped)
                        try:
                            one_stream(args, a, b, addresses, run)
                        except Exception as exc:  # counted, never dropped
                            run.error = repr(exc)
                        runs.append(run)
                        print(describe(run), flush=True)
    return runs


def describe(run: Run) -> str:
    side = "capped  " if run.capped else "uncapped"
    if not run.ok:
        return f"  rtt={run.rtt_ms:>3} #{run.pair} {side}: FAILED {run.error}"
    r = run.result
    return (f"  rtt={run.rtt_ms:>3} #{run.pair} {side}: first {r['first_bytes_s'] / 1e6:.2f}"
            f" MB/s, steady {r['steady_bytes_s'] / 1e6:.2f} MB/s, send buffer "
            f"{r['sndbuf_before']} -> {r['sndbuf_after']} B, min RTT "
            f"{r['min_rtt_us'] / 1000:.1f} ms, {r['retransmits']} retransmits, switch wait "
            f"{run.wait_ms:.1f} ms")


def summarize(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    print()
    print("| RTT ms | uncapped MB/s | capped MB/s | throughput ratio | uncapped switch wait ms "
          "| capped switch wait ms | wait delta ms | capped send buffer B | pairs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ratios: list[float] = []
    deltas: list[float] = []
    sides: list[tuple[bool, bool]] = []
    for rtt in args.rtts:
        mine = [r for r in runs if r.rtt_ms == rtt]
        pairs = []
        for pair in range(args.runs):
            cap = next((r for r in mine if r.pair == pair and r.capped), None)
            unc = next((r for r in mine if r.pair == pair and not r.capped), None)
            ok = (cap is not None and cap.ok, unc is not None and unc.ok)
            sides.append(ok)
            if cap is not None and unc is not None and all(ok):
                pairs.append((cap, unc))
        ratio = median([c.result["steady_bytes_s"] / u.result["steady_bytes_s"]
                        for c, u in pairs])
        delta = median([c.wait_ms - u.wait_ms for c, u in pairs
                        if c.wait_ms is not None and u.wait_ms is not None])
        if ratio is not None:
            ratios.append(ratio)
        if delta is not None:
            deltas.append(delta)
        rate = {k: median([r.result["steady_bytes_s"] / 1e6 for r in mine
                           if r.ok and r.capped is k]) for k in (True, False)}
        wait = {k: median([r.wait_ms for r in mine if r.ok and r.capped is k
                           and r.wait_ms is not None]) for k in (True, False)}
        buf = median([float(r.result["sndbuf_after"]) for r in mine if r.ok and r.capped])
        rtt_sides = sides[-args.runs:]
        print(f"| {rtt} | {fmt(rate[False])} | {fmt(rate[True])} | {fmt(ratio)} | "
              f"{fmt(wait[False], 1)} | {fmt(wait[True], 1)} | {fmt(delta, 1)} | "
              f"{fmt(buf, 0)} | {pair_fields(rtt_sides)} |")
    summary = {"throughput_ratio_min": min(ratios) if ratios else None,
               "wait_delta_ms_max": max(deltas) if deltas else None}
    print()
    print(f"link {args.mbit} Mbit/s each way; first pass {args.first_s} s, steady "
          f"{args.then_s} s, burst {args.burst_mib} MiB; margin {BACKLOG_MARGIN_MS} ms")
    print(f"throughput_ratio_min={fmt(summary['throughput_ratio_min'])} "
          f"wait_delta_ms_max={fmt(summary['wait_delta_ms_max'], 1)} {pair_fields(sides)}")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rtts", default="0,20,50,150",
                   help="round-trip times in ms, comma-separated (default 0,20,50,150: "
                        "vSphere allows long-distance vMotion up to 150 ms)")
    p.add_argument("--mbit", type=int, default=100, help="link rate each way (default 100)")
    p.add_argument("--runs", type=int, default=2, help="capped/uncapped pairs per RTT")
    p.add_argument("--first-s", type=float, default=5.0,
                   help="seconds before the cap (the first pass; default 5)")
    p.add_argument("--then-s", type=float, default=5.0,
                   help="seconds of steady streaming measured (default 5)")
    p.add_argument("--burst-mib", type=int, default=1, help="the switch's burst (MiB)")
    p.add_argument("--prefix", default=os.environ.get("FERRY_BENCH_PREFIX", "fbc"))
    p.add_argument("--address-a", default="198.18.251.1")
    p.add_argument("--address-b", default="198.18.251.2")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    args = p.parse_args(argv)
    try:
        args.rtts = [int(x) for x in args.rtts.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rtts must be whole milliseconds, comma-separated: {args.rtts!r}")
    if not args.rtts or min(args.rtts) < 0:
        p.error("--rtts needs at least one RTT, none negative")
    if args.runs < 1 or args.mbit < 1 or args.first_s <= 0 or args.then_s <= 0:
        p.error("--runs, --mbit, --first-s and --then-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("backlog_cap.py needs root: it creates network namespaces", file=sys.stderr)
        return 2
    try:
        runs = benchmark(args)
    except RuntimeError as exc:  # the namespaces or the delay line could not be set up
        print(f"backlog_cap.py: {exc}", file=sys.stderr)
        return 2
    summary = summarize(runs, args)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": [
            {"rtt_ms": r.rtt_ms, "pair": r.pair, "capped": r.capped, "ok": r.ok,
             "error": r.error, "wait_ms": r.wait_ms, **r.result} for r in runs]}, indent=1))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
