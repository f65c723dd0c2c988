"""What reading a guest's RAM in several threads saves the memory check.

The check (docs/memory-check.md) digests all of a paused guest's RAM on both hosts
before the destination may run, so the guest's client waits for the slower of the two.
This builds a memfd as QEMU's memory-backend-memfd is (--mib MiB, the first --data-mib
of it written with random bytes, the rest allocated zeros, as a destination's copy is)
and digests it with `guest_ram.chunk_digests` in one thread and in --threads threads
(default: the agent's DIGEST_THREADS, as many as cores up to 4), in ABBA pairs so
neither always runs first. A pair whose two results differ is a failure (counted, left
out of the ratios).

On the lab's hosts, which share one machine's cores, both agents hash at once and the
gain is not there (docs/memory-check.md); on hosts of their own it is what a host with
spare cores saves. Last line: `threads=<n> one_ms=<median> many_ms=<median>
ratio=<median of many/one per pair> pairs=<n> failed=<n>`.
Run: .venv/bin/python bench/ram_digest.py [--mib 1024 --data-mib 600 --pairs 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import abba, fmt, median

from ferry.hypervisor import guest_ram

MIB = 1 << 20


def build(mib: int, data_mib: int) -> int:
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, mib * MIB)
    noise, zeros = os.urandom(MIB), bytes(MIB)
    for i in range(mib):
        os.pwrite(fd, noise if i < data_mib else zeros, i * MIB)
    return fd


def timed(ram: Path, size: int, threads: int) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    packed = guest_ram.chunk_digests(ram, size, threads=threads)
    return (time.perf_counter() - t0) * 1000, packed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mib", type=int, default=1024, help="RAM size, MiB")
    p.add_argument("--data-mib", type=int, default=600, help="MiB of it holding data")
    p.add_argument("--threads", type=int, default=guest_ram.DIGEST_THREADS,
                   help="threads to compare with one (default: the agent's)")
    p.add_argument("--pairs", type=int, default=6)
    args = p.parse_args(argv)
    if args.mib < 1 or not 0 <= args.data_mib <= args.mib:
        p.error("need --mib >= 1 and 0 <= --data-mib <= --mib")
    if args.threads < 2 or args.pairs < 1:
        p.error("need --threads >= 2 (this machine's default is "
                f"{guest_ram.DIGEST_THREADS}) and --pairs >= 1")
    fd = build(args.mib, args.data_mib)
    ram, size = guest_ram.held(fd), args.mib * MIB
    one: list[float] = []
    many: list[float] = []
    ratios: list[float] = []
    failed = 0
    try:
        for pair in range(args.pairs):
            results: dict[int, tuple[float, bytes]] = {}
            for threads in abba(pair, 1, args.threads):
                results[threads] = timed(ram, size, threads)
            (ms1, d1), (msn, dn) = results[1], results[args.threads]
            ok = d1 == dn
            print(f"  pair {pair}: 1 thread {ms1:.1f} ms, {args.threads} threads "
                  f"{msn:.1f} ms{'' if ok else ', DIGESTS DIFFER: failed'}", flush=True)
            if not ok:
                failed += 1
                continue
            one.append(ms1)
            many.append(msn)
            ratios.append(msn / ms1)
    finally:
        os.close(fd)
    print("\n| threads | runs | median ms | min ms | max ms |\n|---:|---:|---:|---:|---:|")
    for n, times in ((1, one), (args.threads, many)):
        print(f"| {n} | {len(times)} | {fmt(median(times), 1)} | "
              f"{fmt(min(times, default=None), 1)} | {fmt(max(times, default=None), 1)} |")
    print(f"\n{args.mib} MiB RAM, {args.data_mib} MiB of data; ratio: median of per-pair "
          f"{args.threads}-thread / 1-thread times")
    print(f"threads={args.threads} one_ms={fmt(median(one), 1)} many_ms={fmt(median(many), 1)} "
          f"ratio={fmt(median(ratios))} pairs={args.pairs} failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
