"""Maintenance mode's evacuation against the physical limit, with 1 and 8 parallel moves.

Method
------
The benchmark brings up its own 3-host lab (prefix "fe", 198.18.226.0/24, control plane
on port 8726, in a temporary directory or --lab-dir; see bench/common.py for the
environment overrides) and always tears it down at the end. It measures two link
configurations, one after the other:

- shaped: host1's link limited to --rate-mbit (default 200 Mbit/s, tbf both ways,
  ferry.lab.net.shape), so the link is the bottleneck;
- unshaped: no limit (the lab's veth pair), so the link is not the bottleneck (CPU, QEMU
  and Ferry's own steps are); skipped with --no-unshaped.

For each configuration it first runs one reference migration: a fresh probe VM of the
same size (--memory, --probe-mib) with dirty rate 0 is booted on host1 and migrated
host1 -> host2 alone (POST /v1/migrations with the cluster's default options, as the
evacuation uses). The bytes QEMU reported transferred for it (the migration record's
transferred_bytes, QEMU's ram.transferred: non-zero pages in full plus a few bytes per
zero page, without TCP/IP or TLS framing) is the estimate of one VM's non-zero memory.
The physical limit of a run is then

  shaped:   limit = N x reference bytes / (rate / 8)   (the link's rate in bytes/s;
            TCP/IP headers also count against tbf's rate, so ~4 % of the link is not
            payload and the limit is slightly optimistic for Ferry);
  unshaped: limit = N x reference bytes / reference stream rate = N x the reference's
            QEMU total time, i.e. as fast as moving them one after another at the speed
            one lone QEMU stream reached on this machine, with none of Ferry's steps.

Then --runs pairs of evacuations, one with PATCH /v1/drs/settings {"per_host_limit": 1}
and one with 8, in ABBA order (bench/common.py abba: pair 0 runs 1 then 8, pair 1 runs
8 then 1, ...). Every run boots --vms fresh probe VMs on host1 (probe_spec, distinct
MACs, --dirty MiB/s) and waits for each probe's heartbeat to reach seq >= 3; the clock
starts just before POST /v1/hosts/host1/maintenance and stops at the latest
`completed` phase time of the migrations that request started (all of them must end
COMPLETED, one per VM, polled through GET /v1/migrations/ID). Afterwards every VM must
be off host1 and its probe print a heartbeat with seq > seq_before + 1 and the same
boot id (not rebooted); its mem_errors + disk_errors count as integrity errors. Then
POST /v1/hosts/host1/maintenance?on=false and the VMs are deleted, so every run starts
from freshly booted VMs (as the reference's, whose non-zero memory it estimates).

Summary: per configuration and limit, medians over the successful runs; the ratio
time/limit is the median of per-run ratios, the parallel speedup the median over
complete pairs of time(1 move) / time(8 moves). A run that fails (a move refused or
failed, a VM left on host1, a probe not advancing or rebooted) is counted and kept out
of the medians; a pair with a failed side is failed (`pairs=<n> failed=<n>`). The last
line gives the shaped link's figures: evac_ratio (8 parallel moves, the default, time /
limit), parallel_speedup, every integrity error of every run, the shaped link's pairs
(`pairs=<n> failed=<n>`) and failed_runs = failed runs, references included. The goal
(issue 12) is evac_ratio <= 1.1; the unshaped figures are printed on the line before.
Needs root (namespaces, bridge, tc). Run: .venv/bin/python bench/evacuate.py
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    MIB,
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
from ferry.domain.errors import FerryError
from ferry.domain.migration import Phase
from ferry.domain.probe import Heartbeat
from ferry.lab.config import LabConfig
from ferry.lab.net import shape

SOURCE = "host1"
MIN_SEQ = 3  # evacuate once every probe has printed this many heartbeats
EVAC_TIMEOUT_S = 900.0
POLL_S = 0.2
LIMITS = (1, 8)
_macs = itertools.count(1)


def next_mac() -> str:
    n = next(_macs)
    return f"52:54:00:fe:{n >> 8:02x}:{n & 0xFF:02x}"


@dataclass
class Reference:
    link: str
    ok: bool = False
    sent_bytes: int | None = None
    total_ms: int | None = None
    wall_s: float | None = None
    error: str | None = None


@dataclass
class Run:
    link: str  # "shaped" or "unshaped"
    limit: int  # per_host_limit
    index: int
    ok: bool = False
    evac_s: float | None = None
    limit_s: float | None = None
    moves: int = 0
    sent_bytes: int = 0
    # When the first and the last stream began pre-copy, seconds after the request.
    first_precopy_s: float | None = None
    last_precopy_s: float | None = None
    targets: dict[str, str] = field(default_factory=dict)
    integrity_errors: int = 0
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.evac_s / self.limit_s if self.evac_s and self.limit_s else None


# --- one VM, one migration -----------------------------------------------------------
def boot(client: Client, config: LabConfig, args: argparse.Namespace, names: list[str],
         dirty: int) -> dict[str, Heartbeat]:
    """Create the VMs on host1 at once, then wait for each probe to be well under way."""
    for name in names:
        spec = probe_spec(config, name, args.memory, args.probe_mib, dirty, mac=next_mac())
        client.call("POST", "/v1/vms", {"spec": spec, "host": SOURCE})
    return {name: ferry_heartbeat(client, name, MIN_SEQ - 1) for name in names}


def wait_ended(client: Client, ids: list[str]) -> list[dict[str, Any]]:
    pending: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + EVAC_TIMEOUT_S
    while len(pending) < len(ids):
        if time.monotonic() > deadline:
            raise FerryError(f"migrations still running after {EVAC_TIMEOUT_S:.0f} s")
        for mid in ids:
            if mid not in pending:
                rec: dict[str, Any] = client.call("GET", f"/v1/migrations/{mid}")
                if Phase(rec["phase"]).terminal:
                    pending[mid] = rec
        time.sleep(POLL_S)
    return [pending[mid] for mid in ids]


def reference(client: Client, config: LabConfig, args: argparse.Namespace,
              ref: Reference) -> None:
    """One idle probe VM (dirty rate 0) of the same size migrated alone host1 -> host2."""
    name = f"fe-ref-{ref.link}"
    try:
        boot(client, config, args, [name], dirty=0)
        t0 = time.perf_counter()
        rec: dict[str, Any] = client.call("POST", "/v1/migrations",
                                          {"vm": name, "target": "host2"})
        (rec,) = wait_ended(client, [rec["id"]])
        ref.wall_s = time.perf_counter() - t0
        if rec["phase"] != Phase.COMPLETED:
            raise FerryError(f"reference migration {rec['phase']}: {rec['reason']}")
        ref.sent_bytes, ref.total_ms = rec["transferred_bytes"], rec["total_ms"]
        if not ref.sent_bytes or not ref.total_ms:
            raise FerryError("the reference migration recorded no bytes or total time")
        ref.ok = True
    except Exception as exc:  # reported; the runs of this link then have no limit
        ref.error = problem(exc)
    finally:
        remove_vm(client, name)
    print(f"  reference ({ref.link}): {(ref.sent_bytes or 0) / MIB:.1f} MiB sent, QEMU "
          f"{fmt((ref.total_ms or 0) / 1000)} s, wall {fmt(ref.wall_s)} s"
          + ("" if ref.ok else f"; FAILED: {ref.error}"), flush=True)


def physical_limit(args: argparse.Namespace, ref: Reference) -> float | None:
    if not ref.ok or ref.sent_bytes is None or ref.total_ms is None:
        return None
    if ref.link == "shaped":
        return float(args.vms * ref.sent_bytes / (args.rate_mbit * 1_000_000 / 8))
    return float(args.vms * ref.total_ms / 1000)


# --- one evacuation -----------------------------------------------------------------
def evacuate(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> None:
    names = [f"fe-{run.link[0]}{run.limit}-{run.index}-{i}" for i in range(args.vms)]
    entered = False
    try:
        client.call("PATCH", "/v1/drs/settings", {"per_host_limit": run.limit})
        before = boot(client, config, args, names, args.dirty)
        t0 = time.time()
        result: dict[str, Any] = client.call("POST", f"/v1/hosts/{SOURCE}/maintenance",
                                             on=True)
        entered = True
        evac = result["evacuation"]
        ids = [r["migration_id"] for r in evac["results"] if r.get("migration_id")]
        refused = [f"{r['move']['vm']}: {r['error']}" for r in evac["results"]
                   if not r.get("migration_id")]
        done = wait_ended(client, ids)
        run.moves = len(done)
        ends = [r["phase_times"].get("completed") for r in done]
        run.evac_s = max((e for e in ends if e is not None), default=time.time()) - t0
        run.sent_bytes = sum(r["transferred_bytes"] or 0 for r in done)
        starts = [r["phase_times"]["precopy"] - t0 for r in done
                  if "precopy" in r["phase_times"]]
        if starts:
            run.first_precopy_s, run.last_precopy_s = min(starts), max(starts)
        failed = [f"{r['vm']}: {r['phase']} ({r['reason']})" for r in done
                  if r["phase"] != Phase.COMPLETED]
        if refused or failed:
            raise FerryError("evacuation incomplete: " + "; ".join(refused + failed))
        placed = {v["spec"]["name"]: v["host"] for v in client.call("GET", "/v1/vms")}
        run.targets = {n: placed.get(n, "?") for n in names}
        left = [n for n, h in run.targets.items() if h == SOURCE or h == "?"]
        if left or run.moves != len(names):
            raise FerryError(f"{run.moves} moves for {len(names)} VMs; still on {SOURCE} "
                             f"or gone: {left}")
        problems = []
        for name, hb in before.items():
            after = ferry_heartbeat(client, name, hb.seq + 1)
            run.integrity_errors += after.integrity_errors
            if after.boot_id != hb.boot_id:
                problems.append(f"{name} rebooted ({hb.boot_id} -> {after.boot_id})")
        if problems or run.integrity_errors:
            raise FerryError(f"probes not intact: {run.integrity_errors} integrity "
                             "errors; " + "; ".join(problems))
        run.ok = True
    finally:
        if entered:
            with contextlib.suppress(FerryError):
                client.call("POST", f"/v1/hosts/{SOURCE}/maintenance", on=False)
        if not run.ok:
            keep_serial_logs(config, names)
        for name in names:
            remove_vm(client, name)


def keep_serial_logs(config: LabConfig, names: list[str]) -> None:
    """A failed run's guest consoles, copied to the lab's logs (kept on failure) before
    the VMs are deleted with their run directories."""
    for name in names:
        for log in config.directory.glob(f"hosts/*/**/{name}/serial.log"):
            host = log.relative_to(config.directory).parts[1]
            with contextlib.suppress(OSError):
                shutil.copyfile(log, config.logs_dir / f"{name}.{host}.serial.log")


def attempt(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> Run:
    try:
        evacuate(client, config, args, run)
    except Exception as exc:  # one broken run is reported, the benchmark goes on
        run.ok = False
        run.error = problem(exc)
    spread = ", ".join(f"{h}: {list(run.targets.values()).count(h)}"
                       for h in sorted(set(run.targets.values())))
    print(f"  {run.link:8} limit={run.limit} #{run.index}: evacuation "
          f"{fmt(run.evac_s)} s (limit {fmt(run.limit_s)} s, ratio {fmt(run.ratio)}), "
          f"{run.moves} moves (pre-copy began {fmt(run.first_precopy_s)}-"
          f"{fmt(run.last_precopy_s)} s), {run.sent_bytes / MIB:.0f} MiB sent, [{spread}], "
          f"integrity errors {run.integrity_errors}; "
          + ("ok" if run.ok else f"FAILED: {run.error}"), flush=True)
    return run


def benchmark(config: LabConfig, args: argparse.Namespace,
              refs: list[Reference]) -> list[Run]:
    client = lab_client(config, timeout_s=120)
    if args.encryption:
        client.call("PATCH", "/v1/policy", {"encryption": args.encryption})
    runs: list[Run] = []
    links = ["shaped"] + ([] if args.no_unshaped else ["unshaped"])
    try:
        for link in links:
            shape(config, SOURCE, args.rate_mbit * 1_000_000 if link == "shaped" else None)
            print(f"{link}: host1's link "
                  + (f"{args.rate_mbit} Mbit/s" if link == "shaped" else "unlimited"),
                  flush=True)
            ref = Reference(link)
            reference(client, config, args, ref)
            refs.append(ref)
            limit_s = physical_limit(args, ref)
            for i in range(args.runs):
                for limit in abba(i, *LIMITS):
                    runs.append(attempt(client, config, args,
                                        Run(link, limit, i, limit_s=limit_s)))
    finally:
        shape(config, SOURCE, None)
    return runs


# --- the summary --------------------------------------------------------------------
def all_pairs(runs: list[Run], link: str) -> list[tuple[bool, bool]]:
    by = {(r.limit, r.index): r.ok for r in runs if r.link == link}
    return [(by.get((1, i), False), by.get((8, i), False))
            for i in sorted({r.index for r in runs if r.link == link})]


def speedups(runs: list[Run], link: str) -> list[float]:
    ok = {(r.limit, r.index): r for r in runs if r.link == link and r.ok}
    return [s.evac_s / p.evac_s for (limit, i), p in ok.items()
            if limit == 8 and (s := ok.get((1, i))) and s.evac_s and p.evac_s]


def ratios(runs: list[Run], link: str, limit: int) -> list[float]:
    return [r.ratio for r in runs if r.link == link and r.limit == limit and r.ok
            and r.ratio is not None]


def table(runs: list[Run], refs: list[Reference], args: argparse.Namespace) -> str:
    ref_of = {r.link: r for r in refs}
    head = ("| link | parallel moves | evacuation s | limit s | time / limit "
            "| MiB sent | non-zero MiB (est.) | integrity errors | runs ok | pairs |\n|"
            + "---|" + "---:|" * 8 + "---|")
    lines = [head]
    for link in dict.fromkeys(r.link for r in runs):
        ref = ref_of.get(link)
        nonzero = (args.vms * ref.sent_bytes / MIB if ref and ref.sent_bytes else None)
        name = f"{args.rate_mbit} Mbit" if link == "shaped" else "unshaped"
        for limit in LIMITS:
            mine = [r for r in runs if r.link == link and r.limit == limit]
            ok = [r for r in mine if r.ok]
            lines.append(
                f"| {name} | {limit} | {fmt(median([r.evac_s for r in ok if r.evac_s]))} "
                f"| {fmt(median([r.limit_s for r in ok if r.limit_s]))} "
                f"| {fmt(median(ratios(runs, link, limit)))} "
                f"| {fmt(median([r.sent_bytes / MIB for r in ok]), 0)} | {fmt(nonzero, 0)} "
                f"| {sum(r.integrity_errors for r in mine)} | {len(ok)}/{len(mine)} "
                f"| {pair_fields(all_pairs(runs, link))} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=2, help="pairs (1 and 8 moves) per link")
    p.add_argument("--vms", type=int, default=6, help="probe VMs on host1 per run")
    p.add_argument("--memory", type=int, default=192, help="guest memory in MiB")
    p.add_argument("--probe-mib", type=int, default=64,
                   help="memory the probe dirties and checks (at most ~memory-72)")
    p.add_argument("--dirty", type=int, default=1, help="probe dirty rate, MiB/s")
    p.add_argument("--rate-mbit", type=int, default=200, help="host1's shaped link")
    p.add_argument("--no-unshaped", action="store_true",
                   help="skip the configuration where the link is not the bottleneck")
    p.add_argument("--encryption", choices=("required", "opportunistic", "disabled"),
                   help="set the cluster's default stream encryption first (default: "
                        "leave it, i.e. required, TLS)")
    p.add_argument("--lab-dir", type=Path, help="lab directory (default: a fresh temp dir)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.vms < 1:
        p.error("need --runs >= 1 and --vms >= 1")
    if args.probe_mib > args.memory - 72:
        p.error(f"--probe-mib must be at most --memory - 72 ({args.memory - 72})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refs: list[Reference] = []
    runs = run_in_lab(
        "bench/evacuate.py", args.lab_dir, 3, prefix="fe", subnet_octet=226,
        control_port=8726,
        banner=lambda lab: (f"{args.vms} VMs of {args.memory} MiB (probe {args.probe_mib} "
                            f"MiB, {args.dirty} MiB/s) on {SOURCE}, {args.runs} pairs "
                            f"per link"),
        body=lambda config: benchmark(config, args, refs),
        failed=lambda runs: not runs or any(not r.ok for r in runs)
        or any(not r.ok for r in refs))
    if isinstance(runs, int):
        return runs
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "references": [asdict(r) for r in refs],
            "runs": [asdict(r) | {"ratio": r.ratio} for r in runs]}, indent=2))
    print("\n" + table(runs, refs, args) + "\n")
    failed = sum(1 for r in runs if not r.ok) + sum(1 for r in refs if not r.ok)
    if failed:
        print(f"{failed} runs FAILED (references included): left out of the medians")
    errors = sum(r.integrity_errors for r in runs)
    if any(r.link == "unshaped" for r in runs):
        print(f"unshaped: evac_ratio={fmt(median(ratios(runs, 'unshaped', 8)))} "
              f"parallel_speedup={fmt(median(speedups(runs, 'unshaped')))} "
              f"{pair_fields(all_pairs(runs, 'unshaped'))}")
    print(f"shaped: {pair_fields(all_pairs(runs, 'shaped'))}; evac_ratio is the median "
          "time/limit with 8 parallel moves, parallel_speedup the median time(1)/time(8)")
    print(f"evac_ratio={fmt(median(ratios(runs, 'shaped', 8)))} "
          f"parallel_speedup={fmt(median(speedups(runs, 'shaped')))} "
          f"integrity_errors={errors} {pair_fields(all_pairs(runs, 'shaped'))} "
          f"failed_runs={failed}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
