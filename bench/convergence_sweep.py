"""Convergence sweep: QEMU's defaults, Nova's policy and Ferry's over a shaped link.

Method
------
The benchmark brings up its own 2-host lab (prefix "fc", 198.18.213.0/24, control plane
on port 8713, in a temporary directory or --lab-dir; see bench/common.py for the
environment overrides) and always tears it down at the end. For every probe dirty rate
(default 0,6,12,24,48 MiB/s; the default link of 200 Mbit/s carries ~23.8 MiB/s, so the
top rate is ~2x the link) it runs --runs groups of one migration per policy, the order
reversed from one group to the next (ABBA, bench/common.py abba_order), so that Ferry
runs before and after each baseline equally often. Every policy is a Ferry convergence
policy (ferry/domain/convergence.py), so the same orchestrator runs them all and only
the decisions differ; none of them is raw QMP (bench/migrate_vs_qemu.py compares with
raw QMP):

- qemu-defaults: {"policy": "qemu", max_downtime_ms 300, no post-copy, no throttle}:
  QEMU's defaults, a fixed 300 ms downtime limit and nothing else, then abort at the cap;
- nova: {"policy": "nova", max_downtime_ms 500, no post-copy, no throttle}: current Nova
  defaults: the limit ramps 50 -> 500 ms in 10 steps of 75 s per GiB (at least 2 GiB),
  live_migration_completion_timeout 800 s per GiB, then the timeout action `abort`;
- nova-legacy: the same ramp with post-copy allowed, switching to post-copy once the
  remaining memory shrinks by less than 10 % per pass (older Nova);
- kubevirt: {"policy": "kubevirt", allowPostCopy, completionTimeoutPerGiB 150 s,
  progressTimeout 150 s}: QEMU's 300 ms limit; post-copy once the completion timeout
  (150 s x whole GB, rounded up) passes; abort after 150 s without progress;
- ferry: {"policy": "ferry", max_downtime_ms 500}: Ferry's defaults (post-copy off, as
  for a user who does not ask for it); `ferry-postcopy` (not in the default set) is the
  same with post-copy allowed.

Each policy keeps its own per-GiB completion budget (Ferry 800 s, Nova 800 s, KubeVirt
150 s, QEMU none: Ferry's 800 s), but no run may last longer than --cap-s (default 120 s):
the per-GiB budget is lowered so that the policy's deadline is at most the cap (the
options, per policy, are in the JSON). At its deadline each policy takes its own timeout
action (abort, or post-copy where the policy does so).

Each run boots a fresh probe VM (256 MiB, probe region 128 MiB) on host1 through the
control plane, waits for probe heartbeat seq >= 4, shapes host1's link both ways to
--link-mbit (tbf, ferry.lab.net.shape), reads the source's serial log, and asks for a
migration to host2; it follows the migration's event stream to a terminal phase, then
lifts the shaping, waits for a new heartbeat wherever the VM now runs, and deletes it.

The probe VM has the static address vm_ip(0) on the lab's VM network; the lab's echo
client (ferry/lab/echo.py via bench/client_view.py: UDP every 1 ms plus one TCP stream,
from the client namespace) runs from after the shaping is set, just before the "before"
serial read and the request, until 1 s after the migration reached its terminal phase.
Its traffic reaches host1 over the same shaped link as the migration stream (the VXLAN
tunnel runs over the lab's management network), as a client's would on a shared link.
Client gap = the longest interval between UDP replies, reported for completed runs only
("-" where the policy aborted); TCP broken = reset, EOF or any lost/reordered byte.

Measured per run: completed (phase), total time (phase_times completed/failed minus
pending), downtime_ms, MiB sent (QEMU's ram.transferred; after post-copy it counts both
phases), the levers the policy pulled (distinct action kinds), and the guest's write
share: the probe's write rate during the migration over its rate before.
- before: pages_written delta / uptime_ms delta over the last ~3 s of heartbeats on the
  source, read just before the request;
- during: from that last source heartbeat to the first heartbeat printed after the
  migration ended (on the destination, or on the source if it failed), same formula.
uptime_ms is the guest's CLOCK_MONOTONIC, which stops while the VM is paused: the share
is the write rate per second of guest run time, so it shows throttling and post-copy
page-fault stalls, not the switchover pause (reported as downtime). JSON also holds
wall_share, the same delta over host wall time (+/- ~1 s at each end), pauses included.
At rate 0 the share is undefined ("-").
Integrity: the heartbeat after the migration must have seq > before + 1; its
mem_errors + disk_errors count as integrity errors.

Last line: per policy completed/runs; ferry_max_downtime_ms and
ferry_max_client_gap_ms (over Ferry's completed runs); `pairs=<n> failed=<n>` for Ferry
vs Nova (a cell where either did not complete, or could not be measured, is a failed
pair and stays out of the ratios); ferry_lowest_downtime=<k>/<n>: of the n cells where
every policy run in the group completed, k where Ferry's QEMU-reported downtime was the
lowest (ties count); ferry_lowest_client_gap=<k>/<n> the same for the client's gap;
then over the cells where both Ferry and Nova completed:
bytes_vs_nova = median of Ferry MiB sent / Nova MiB sent; slowdown_vs_nova = median of
(max(0, 1 - Ferry share) + 0.05) / (max(0, 1 - Nova share) + 0.05), rates with a share
left out; the 0.05 keeps two near-zero slowdowns (noise) from making a wild ratio.
Also printed (not in the last line): writes lost = (rate before - rate during) x window in
guest seconds, the slowdown's total; the share is its average over a window whose length
depends on the policy, so a policy that ends sooner shows a lower share for the same loss.
Needs root. Run: .venv/bin/python bench/convergence_sweep.py [--rates 0,48 --cap-s 60]
    [--runs 1] [--policies qemu-defaults,nova,kubevirt,ferry]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from client_view import View, watching
from common import (
    MIB,
    abba_order,
    add_guest_args,
    check_guest_args,
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
from ferry.domain.migration import Phase, PolicyKind, StreamOptions, budget_gib
from ferry.domain.probe import Heartbeat, heartbeats
from ferry.lab import net
from ferry.lab.config import LabConfig

MIN_SEQ = 4  # heartbeats 1..4 span the 3 s "before" window
PAGE = 4096
EPS = 0.05  # slowdown floor in slowdown_vs_nova (5 points of write share)
AFTER_TIMEOUT_S = 60.0
SOURCE, TARGET = "host1", "host2"
# Cleartext for all, as raw QEMU streams: the policies are compared here, not TLS
# (bench/tls_cost.py measures what encryption costs).
POLICIES: dict[str, dict[str, Any]] = {
    "qemu-defaults": {"policy": "qemu", "max_downtime_ms": 300, "allow_postcopy": False,
                      "allow_throttle": False},
    "nova": {"policy": "nova", "max_downtime_ms": 500, "allow_postcopy": False,
             "allow_throttle": False, "completion_budget_s_per_gib": 800},
    "nova-legacy": {"policy": "nova-legacy", "max_downtime_ms": 500, "allow_postcopy": True,
                    "allow_throttle": False, "completion_budget_s_per_gib": 800},
    "kubevirt": {"policy": "kubevirt", "allow_postcopy": True, "allow_throttle": False,
                 "completion_budget_s_per_gib": 150, "progress_timeout_s": 150},
    # Ferry's defaults, as a user gets them (post-copy is off unless asked for).
    "ferry": {"policy": "ferry", "max_downtime_ms": 500},
    # Ferry with post-copy allowed (`--allow-postcopy`): not in the default set.
    "ferry-postcopy": {"policy": "ferry", "max_downtime_ms": 500, "allow_postcopy": True},
}
DEFAULT_POLICIES = "qemu-defaults,nova,kubevirt,ferry"


@dataclass
class Run:
    rate: int
    group: int
    policy: str
    vm: str
    migration: str | None = None
    phase: str | None = None
    completed: bool = False
    postcopy: bool = False
    reason: str | None = None
    total_s: float | None = None
    downtime_ms: int | None = None
    sent_bytes: int | None = None
    levers: list[str] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)  # pre-copy passes
    before_mib_s: float | None = None  # probe writes per second of guest time
    during_mib_s: float | None = None
    write_share: float | None = None
    wall_share: float | None = None
    window_s: float | None = None  # guest time from the last beat before to the first after
    seq_before: int | None = None
    seq_after: int | None = None
    integrity_errors: int = 0
    vm_after: str | None = None  # "<state>@<host>" once the migration ended
    view: View | None = None  # what the lab's echo client saw around the migration
    error: str | None = None  # the benchmark could not measure something
    serial_tail: list[str] = field(default_factory=list)  # when the guest went silent

    @property
    def sent_mib(self) -> float | None:
        return None if self.sent_bytes is None else self.sent_bytes / MIB

    @property
    def gap_ms(self) -> float | None:
        """The client-visible gap, of a migration that completed only."""
        return self.view.gap_ms if self.completed and self.view is not None else None

    @property
    def lost_mib(self) -> float | None:
        """Writes the guest did not make in the window, at its rate before: the
        slowdown's total, where the share is its average over a window whose length
        depends on the policy."""
        if self.before_mib_s is None or self.during_mib_s is None or not self.window_s:
            return None
        return max(0.0, self.before_mib_s - self.during_mib_s) * self.window_s


def serial(client: Client, vm: str, lines: int = 40) -> list[Heartbeat]:
    """Heartbeats in the serial log of the host the VM is on now."""
    return heartbeats(client.call("GET", f"/v1/vms/{vm}/serial", lines=lines)["lines"])


def mib_s(a: Heartbeat, b: Heartbeat) -> float | None:
    """The probe's write rate between two heartbeats, per second of guest time."""
    dt = (b.uptime_ms - a.uptime_ms) / 1000
    return (b.pages_written - a.pages_written) * PAGE / MIB / dt if dt > 0 else None


def next_heartbeat(client: Client, vm: str, after_seq: int) -> tuple[Heartbeat, float]:
    """The first heartbeat with seq > after_seq on the VM's current host, and when seen."""
    deadline = time.monotonic() + AFTER_TIMEOUT_S
    while time.monotonic() < deadline:
        found = [hb for hb in serial(client, vm, 10) if hb.seq > after_seq]
        if found:
            return found[0], time.time()
        time.sleep(0.25)
    raise FerryError(f"VM {vm}: no probe heartbeat past seq {after_seq} after the migration")


def options(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    """The policy's options, its per-GiB budget lowered so its deadline fits the cap."""
    base = POLICIES[policy] | {"encryption": "disabled"}
    own = StreamOptions.model_validate(base).budget_per_gib_s
    capped = max(1, math.floor(args.cap_s / budget_gib(args.memory, PolicyKind(base["policy"]))))
    return base | {"completion_budget_s_per_gib": min(own, capped)}


def migrate(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> None:
    spec = probe_spec(config, run.vm, args.memory, args.probe_mib, run.rate,
                      ip=config.vm_ip(0))
    client.call("POST", "/v1/vms", {"spec": spec, "host": SOURCE})
    try:
        ferry_heartbeat(client, run.vm, MIN_SEQ - 1)
        net.shape(config, SOURCE, args.link_mbit * 1_000_000)
        try:
            with watching(config, config.vm_ip(0)) as watch:
                hbs = serial(client, run.vm)
                last, t_before = hbs[-1], time.time()
                first = next(hb for hb in hbs if hb.seq >= last.seq - 3)
                run.seq_before, run.before_mib_s = last.seq, mib_s(first, last)
                rec: dict[str, Any] = client.call("POST", "/v1/migrations", {
                    "vm": run.vm, "target": TARGET, "options": options(args, run.policy)})
                run.migration = rec["id"]
                for event in client.events(f"/v1/migrations/{rec['id']}/events"):
                    rec = event
                    if Phase(rec["phase"]).terminal:
                        break
                run.view = watch.stop(time.monotonic())
        finally:
            net.shape(config, SOURCE, None)
        if rec["phase"] == Phase.COMPLETED:  # `ferry migration show` shows it too
            with contextlib.suppress(FerryError):
                client.call("PUT", f"/v1/migrations/{rec['id']}/client-view",
                            run.view.record())
        run.phase, run.reason = rec["phase"], rec.get("reason")
        run.completed, run.postcopy = rec["phase"] == Phase.COMPLETED, rec["postcopy_started"]
        times = rec["phase_times"]
        run.total_s = times[rec["phase"]] - times["pending"]
        run.downtime_ms, run.sent_bytes = rec.get("downtime_ms"), rec.get("transferred_bytes")
        run.actions, run.iterations = list(rec["actions"]), list(rec["iterations"])
        run.levers = list(dict.fromkeys(a["kind"] for a in run.actions))
        vm = client.call("GET", f"/v1/vms/{run.vm}")
        run.vm_after = f"{vm['state']}@{vm['host']}"
        seen = max([hb.seq for hb in serial(client, run.vm)] + [last.seq + 1])
        try:
            after, t_after = next_heartbeat(client, run.vm, seen)
        except FerryError:
            # keep what the guest printed last: the VM and its log go with remove_vm
            run.serial_tail = client.call("GET", f"/v1/vms/{run.vm}/serial",
                                          lines=15)["lines"]
            raise
        run.seq_after, run.integrity_errors = after.seq, after.integrity_errors
        run.during_mib_s = mib_s(last, after)
        run.window_s = (after.uptime_ms - last.uptime_ms) / 1000
        if run.before_mib_s and run.during_mib_s is not None:
            run.write_share = run.during_mib_s / run.before_mib_s
            wall = (after.pages_written - last.pages_written) * PAGE / MIB / (t_after - t_before)
            run.wall_share = wall / run.before_mib_s
    finally:
        remove_vm(client, run.vm)


def attempt(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> Run:
    try:
        migrate(client, config, args, run)
    except Exception as exc:  # one broken run is reported, the sweep goes on
        run.error = problem(exc)
    print(f"  rate={run.rate:<3} #{run.group} {run.policy:13} {run.migration}: {run.phase}"
          f"{' (post-copy)' if run.postcopy else ''} in {fmt(run.total_s, 1)} s, "
          f"downtime {run.downtime_ms} ms, client gap {fmt(run.gap_ms, 1)} ms, TCP "
          f"{'-' if run.view is None else 'BROKEN' if run.view.tcp_broken else 'ok'}, "
          f"{fmt(run.sent_mib, 0)} MiB, levers "
          f"{run.levers or 'none'}, writes {fmt(run.before_mib_s, 1)} -> "
          f"{fmt(run.during_mib_s, 1)} MiB/s, seq {run.seq_before}->{run.seq_after}, "
          f"errors {run.integrity_errors}, VM {run.vm_after}"
          + (f"; reason: {run.reason}" if run.reason else "")
          + (f"; BENCH ERROR: {run.error}" if run.error else ""), flush=True)
    for line in run.serial_tail:
        print(f"    serial: {line}", flush=True)
    return run


def sweep(config: LabConfig, args: argparse.Namespace) -> list[Run]:
    client = lab_client(config, timeout_s=120)
    runs: list[Run] = []
    group = 0  # counted across rates, so the order flips from every group to the next
    for rate in args.rates:
        for g in range(args.runs):
            for policy in abba_order(group, args.policies):
                vm = f"fc-{rate}-{g}-{policy}"
                runs.append(attempt(client, config, args, Run(rate, g, policy, vm)))
            group += 1
    return runs


# --- the summary ------------------------------------------------------------------
def levers(run: Run) -> str:
    return ", ".join(run.levers) or "none"


def table(runs: list[Run]) -> str:
    head = ("| rate MiB/s | # | policy | completed | total s | downtime ms | client gap ms "
            "| TCP | MiB sent | levers | writes MiB/s before -> during | write share "
            "| writes lost MiB |\n|---:|---:|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|")
    rows = [f"| {r.rate} | {r.group} | {r.policy} | "
            f"{'error' if r.phase is None else 'yes' if r.completed else 'NO'}"
            f"{' (post-copy)' if r.postcopy else ''} | {fmt(r.total_s, 1)} "
            f"| {r.downtime_ms if r.downtime_ms is not None else '-'} | {fmt(r.gap_ms, 1)} "
            f"| {'-' if r.view is None else 'broken' if r.view.tcp_broken else 'ok'} "
            f"| {fmt(r.sent_mib, 0)} "
            f"| {levers(r)} | {fmt(r.before_mib_s, 1)} -> {fmt(r.during_mib_s, 1)} "
            f"| {fmt(r.write_share)} | {fmt(r.lost_mib, 0)} |" for r in runs]
    return "\n".join([head, *rows])


def slowdown(share: float) -> float:
    return max(0.0, 1 - share) + EPS


def summarize(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    cells = sorted({(r.rate, r.group) for r in runs})

    def at(policy: str, cell: tuple[int, int]) -> Run | None:
        return next((r for r in runs if r.policy == policy and (r.rate, r.group) == cell),
                    None)

    def good(r: Run | None) -> bool:
        return r is not None and r.completed and r.error is None

    vs_nova = [(good(at("ferry", c)), good(at("nova", c))) for c in cells
               if "ferry" in args.policies and "nova" in args.policies]
    both = [(f, n) for c in cells if good(f := at("ferry", c)) and good(n := at("nova", c))
            and f is not None and n is not None]
    # Cells where every policy completed: was Ferry's QEMU downtime (client gap) lowest?
    lowest: list[bool] = []
    lowest_gap: list[bool] = []
    for c in cells:
        group = [r for p in args.policies if good(r := at(p, c)) and r is not None]
        if "ferry" not in args.policies or len(group) < len(args.policies):
            continue
        if all(r.downtime_ms is not None for r in group):
            times = {r.policy: r.downtime_ms or 0 for r in group}
            lowest.append(times["ferry"] <= min(times.values()))
        if all(r.gap_ms is not None for r in group):
            gaps = {r.policy: r.gap_ms or 0.0 for r in group}
            lowest_gap.append(gaps["ferry"] <= min(gaps.values()))
    of = {p: [r for r in runs if r.policy == p] for p in args.policies}
    downtimes = [r.downtime_ms for r in of.get("ferry", []) if r.completed
                 and r.downtime_ms is not None]
    ferry_gaps = [r.gap_ms for r in of.get("ferry", []) if r.gap_ms is not None]
    return {
        **{f"{p}_completed": [sum(r.completed for r in of[p]), len(of[p])]
           for p in args.policies},
        "ferry_max_downtime_ms": max(downtimes) if downtimes else None,
        "ferry_max_client_gap_ms": max(ferry_gaps) if ferry_gaps else None,
        "tcp_broken": sum(1 for r in runs if r.view is not None and r.view.tcp_broken),
        "ferry_lowest_downtime": [sum(lowest), len(lowest)],
        "ferry_lowest_client_gap": [sum(lowest_gap), len(lowest_gap)],
        "pairs_vs_nova": vs_nova,
        "bytes_vs_nova": median([f.sent_bytes / n.sent_bytes for f, n in both
                                 if f.sent_bytes and n.sent_bytes]),
        "slowdown_vs_nova": median([slowdown(f.write_share) / slowdown(n.write_share)
                                    for f, n in both if f.write_share is not None
                                    and n.write_share is not None]),
        "lost_vs_nova": median([(f.lost_mib + 1) / (n.lost_mib + 1) for f, n in both
                                if f.lost_mib is not None and n.lost_mib is not None
                                and f.write_share is not None]),
        "integrity_errors": sum(r.integrity_errors for r in runs),
        "bench_errors": sum(1 for r in runs if r.error),
        "cells_both_completed": [[f.rate, f.group] for f, _ in both]}


def last_line(s: dict[str, Any], policies: list[str]) -> str:
    def frac(key: str) -> str:
        return "{}/{}".format(*s[key])

    def num(key: str, digits: int = 2) -> str:
        return "n/a" if s[key] is None else f"{s[key]:.{digits}f}"

    done = " ".join(f"{p}_completed={frac(p + '_completed')}" for p in policies)
    return (f"{done} ferry_max_downtime_ms={num('ferry_max_downtime_ms', 0)} "
            f"ferry_max_client_gap_ms={num('ferry_max_client_gap_ms', 1)} "
            f"ferry_lowest_downtime={frac('ferry_lowest_downtime')} "
            f"ferry_lowest_client_gap={frac('ferry_lowest_client_gap')} "
            f"bytes_vs_nova={num('bytes_vs_nova')} slowdown_vs_nova={num('slowdown_vs_nova')} "
            f"{pair_fields(s['pairs_vs_nova'])} integrity_errors={s['integrity_errors']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_guest_args(p, "0,6,12,24,48")
    p.add_argument("--link-mbit", type=int, default=200,
                   help="rate of host1's link during each migration, Mbit/s (default 200)")
    p.add_argument("--cap-s", type=int, default=120,
                   help="completion cap per migration in s (default 120; Ferry's floor: 60)")
    p.add_argument("--runs", type=int, default=1, help="groups of runs per rate (default 1)")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help=f"which of {','.join(POLICIES)} to run (default {DEFAULT_POLICIES})")
    args = p.parse_args(argv)
    check_guest_args(p, args)
    if len(args.rates) != len(set(args.rates)):
        p.error("--rates: each rate once")
    if not args.policies or not set(args.policies) <= set(POLICIES):
        p.error(f"--policies: a comma-separated subset of {','.join(POLICIES)}")
    if args.link_mbit < 1 or args.cap_s < 1 or args.runs < 1:
        p.error("--link-mbit, --cap-s and --runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = run_in_lab(
        "bench/convergence_sweep.py", args.lab_dir, 2, prefix="fc", subnet_octet=213,
        control_port=8713,
        banner=lambda lab: (
            f"link {args.link_mbit} Mbit/s (~{args.link_mbit * 1e6 / 8 / MIB:.1f} MiB/s), "
            f"rates {args.rates} MiB/s, policies {args.policies}, {args.memory} MiB guest, "
            f"probe {args.probe_mib} MiB, cap {args.cap_s} s"),
        body=lambda config: sweep(config, args),
        failed=lambda runs: any(r.error or r.integrity_errors for r in runs))
    if isinstance(runs, int):
        return runs
    summary = summarize(runs, args)
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "lab_dir")}
            | {"options": {p: options(args, p) for p in args.policies}},
            "runs": [asdict(r) for r in runs], "summary": summary}, indent=2))
    print("\n" + table(runs) + "\n")
    print("write share: probe writes per second of guest run time during the migration / "
          "before it (pauses excluded; see the docstring). bytes_vs_nova and "
          f"slowdown_vs_nova: medians over the (rate, group) cells "
          f"{summary['cells_both_completed']} where Ferry and Nova both completed; slowdown "
          f"= max(0, 1 - share) + {EPS}.")
    print("writes lost: (rate before - rate during) x the window in guest seconds; "
          "lost_vs_nova = median of (Ferry + 1 MiB) / (Nova + 1 MiB) over the same rates "
          f"(rates with a share): {fmt(summary['lost_vs_nova'])}")
    total, failed = len(summary["pairs_vs_nova"]), sum(
        1 for a, b in summary["pairs_vs_nova"] if not (a and b))
    if failed:
        print(f"{failed} of {total} Ferry/Nova cells had a side that did not complete or "
              "could not be measured: counted as failed pairs, left out of the ratios")
    if summary["bench_errors"]:
        print(f"{summary['bench_errors']} runs could not be measured fully (BENCH ERROR above)")
    print(last_line(summary, args.policies))
    return 1 if summary["bench_errors"] or summary["integrity_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
