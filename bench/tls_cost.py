"""What encrypting a migration costs: the same live migration with TLS off and on.

Brings up its own 2-host lab (prefix "fx", 198.18.217.0/24, control plane on port
8717; environment overrides in bench/common.py), boots one probe VM and migrates it back
and forth between the two hosts. Each pair is one cleartext (`encryption: disabled`) and
one encrypted (`required`, the default) migration, in ABBA order (bench/common.py abba)
so that neither kind always runs on a warmer machine. After every migration the probe
must keep counting with zero integrity errors, or the run counts as failed.

Per kind the table gives the medians of wall time (request to COMPLETED, as the client
sees it), QEMU's downtime and the stream's throughput (bytes sent / QEMU's total time);
the ratio column is encrypted / cleartext. The last line:

    tls_wall_ratio=<median of per-pair on/off> tls_downtime_delta_ms=<median on-off>
    pairs=<n> failed=<n>

A pair with a failed side, or not run because an earlier migration failed (the VM's
state is then in doubt and the benchmark stops), is a failed pair, left out of the
ratios.

Usage (root): .venv/bin/python bench/tls_cost.py [--pairs 5] [--rate 10] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    abba,
    ferry_heartbeat,
    fmt,
    median,
    pair_fields,
    problem,
    remove_vm,
    run_in_lab,
)

from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec
from ferry.domain.migration import Phase
from ferry.lab.config import LabConfig

VM = "tls-bench"
KINDS = ("disabled", "required")


@dataclass
class Run:
    pair: int
    encryption: str
    source: str
    target: str
    ok: bool = False
    wall_s: float | None = None
    downtime_ms: int | None = None
    throughput_mib_s: float | None = None
    encrypted: bool | None = None
    integrity_errors: int = 0
    error: str | None = None


def migrate(client: Client, run: Run, seq: int, multifd: int | None) -> int:
    """One migration; returns the probe's heartbeat sequence after it."""
    t0 = time.perf_counter()
    options: dict[str, Any] = {"encryption": run.encryption}
    if multifd is not None:
        options["multifd_channels"] = multifd
    rec: dict[str, Any] = client.call("POST", "/v1/migrations", {
        "vm": VM, "target": run.target, "options": options})
    for event in client.events(f"/v1/migrations/{rec['id']}/events"):
        rec = event
        if Phase(rec["phase"]).terminal:
            break
    run.wall_s = time.perf_counter() - t0
    if rec["phase"] != Phase.COMPLETED:
        raise RuntimeError(f"migration {rec['phase']}: {rec['reason']}")
    run.downtime_ms, run.encrypted = rec["downtime_ms"], rec["encrypted"]
    if rec["total_ms"]:
        run.throughput_mib_s = rec["transferred_bytes"] / (1 << 20) / (rec["total_ms"] / 1000)
    after = ferry_heartbeat(client, VM, seq + 1)
    run.integrity_errors = after.integrity_errors
    if after.integrity_errors:
        raise RuntimeError(f"probe reports {after.integrity_errors} integrity errors")
    run.ok = True
    return after.seq


def body(config: LabConfig, args: argparse.Namespace) -> list[Run]:
    client = lab_client(config, timeout_s=120)
    hosts = [h.name for h in config.hosts]
    client.call("POST", "/v1/vms", {"spec": probe_spec(config, VM, args.memory,
                                                       args.probe_mib, args.rate),
                                    "host": hosts[0]})
    runs: list[Run] = []
    try:
        seq = ferry_heartbeat(client, VM, 2).seq
        where = 0
        for pair in range(args.pairs):
            for kind in abba(pair, *KINDS):
                run = Run(pair, kind, hosts[where], hosts[1 - where])
                runs.append(run)
                try:
                    seq = migrate(client, run, seq, args.multifd)
                    where = 1 - where
                except Exception as exc:
                    run.error = problem(exc)
                    print(f"pair {pair} {kind}: FAILED {run.error}", flush=True)
                    return runs  # the VM's state is in doubt: stop here
                print(f"pair {pair} {kind:>8}: wall {run.wall_s:.2f} s, downtime "
                      f"{run.downtime_ms} ms, {fmt(run.throughput_mib_s, 1)} MiB/s",
                      flush=True)
    finally:
        remove_vm(client, VM)
    return runs


def report(runs: list[Run], args: argparse.Namespace) -> int:
    ok = [r for r in runs if r.ok]
    done = {(r.pair, r.encryption) for r in ok}
    sides = [((i, KINDS[0]) in done, (i, KINDS[1]) in done) for i in range(args.pairs)]
    failed = sum(1 for a, b in sides if not (a and b))
    by = {k: [r for r in ok if r.encryption == k] for k in KINDS}
    pairs: dict[int, dict[str, Run]] = {}
    for r in ok:
        pairs.setdefault(r.pair, {})[r.encryption] = r
    full = [p for p in pairs.values() if len(p) == 2]
    wall_ratios = [on / off for p in full
                   if (on := p["required"].wall_s) is not None and (off := p["disabled"].wall_s)]
    deltas = [p["required"].downtime_ms - p["disabled"].downtime_ms for p in full
              if p["required"].downtime_ms is not None and p["disabled"].downtime_ms is not None]

    def col(kind: str, key: str) -> float | None:
        return median([float(getattr(r, key)) for r in by[kind] if getattr(r, key) is not None])

    print()
    print("| measure | cleartext | TLS | ratio TLS/clear |")
    print("|---|---:|---:|---:|")
    for label, key, digits in (("wall s", "wall_s", 2), ("downtime ms", "downtime_ms", 0),
                               ("throughput MiB/s", "throughput_mib_s", 1)):
        off, on = col("disabled", key), col("required", key)
        ratio = on / off if on is not None and off else None
        print(f"| {label} | {fmt(off, digits)} | {fmt(on, digits)} | {fmt(ratio)} |")
    print(f"| runs ok | {len(by['disabled'])} | {len(by['required'])} | |")
    print()
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    print(f"tls_wall_ratio={fmt(median(wall_ratios))} "
          f"tls_downtime_delta_ms={fmt(median([float(d) for d in deltas]), 0)} "
          f"{pair_fields(sides)}")
    return 0 if failed == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="cleartext/TLS pairs (default 5)")
    p.add_argument("--rate", type=int, default=10, help="probe dirty rate, MiB/s")
    p.add_argument("--memory", type=int, default=256, help="guest memory, MiB")
    p.add_argument("--probe-mib", type=int, default=128, help="memory the probe uses")
    p.add_argument("--multifd", type=int, help="multifd channels for both kinds "
                   "(default: the cluster policy's)")
    p.add_argument("--lab-dir", type=Path, help="lab directory (default: a fresh temp dir)")
    p.add_argument("--json", type=Path, help="write every run here")
    args = p.parse_args()
    if args.pairs < 1 or args.probe_mib > args.memory - 72:
        p.error("need --pairs >= 1 and --probe-mib <= --memory - 72")
    out = run_in_lab("bench/tls_cost.py", args.lab_dir, 2, prefix="fx", subnet_octet=217,
                     control_port=8717,
                     banner=lambda lab: f"{args.pairs} pairs, probe at {args.rate} MiB/s",
                     body=lambda config: body(config, args),
                     failed=lambda runs: not runs or not all(r.ok for r in runs))
    if isinstance(out, int):
        return out
    return report(out, args)


if __name__ == "__main__":
    sys.exit(main())
