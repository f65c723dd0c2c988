"""Convergence sweep: QEMU's defaults, Nova's policy and Ferry's over a shaped link.

Method
------
The benchmark brings up its own 2-host lab (prefix "fc", 10.213.0.0/24, control plane on
port 8713, in a temporary directory or --lab-dir) and always tears it down at the end.
For every probe dirty rate (default 0,6,12,24,48 MiB/s; the default link of 200 Mbit/s
carries ~23.8 MiB/s, so the top rate is ~2x the link) it runs the three policies, one
migration each, rotating their order from one rate to the next. All three are Ferry
convergence policies, so the same orchestrator runs them and only the decisions differ:

- raw:   {"policy": "qemu", max_downtime_ms 300, no post-copy, no throttle}: QEMU's
         defaults, a fixed downtime limit and nothing else;
- nova:  {"policy": "nova", max_downtime_ms 500, post-copy allowed, no throttle};
- ferry: {"policy": "ferry", max_downtime_ms 500, post-copy allowed}.

All three get completion_budget_s_per_gib = cap * 1024 / memory (480 s/GiB: a 120 s cap
for 256 MiB; Ferry never allows less than 60 s), counted from the start of pre-copy. At
the cap the raw policy aborts (the VM stays on its source); Nova and Ferry, with post-copy
allowed, switch to post-copy instead.

Each run boots a fresh probe VM (256 MiB, probe region 128 MiB) on host1 through the
control plane, waits for probe heartbeat seq >= 4, shapes host1's link both ways to
--link-mbit (tbf, ferry.lab.net.shape), reads the source's serial log, and asks for a
migration to host2; it follows the migration's event stream to a terminal phase, then
lifts the shaping, waits for a new heartbeat wherever the VM now runs, and deletes it.

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

Last line, over the rates where both Ferry and Nova completed:
bytes_vs_nova = median of Ferry MiB sent / Nova MiB sent; slowdown_vs_nova = median of
(max(0, 1 - Ferry share) + 0.05) / (max(0, 1 - Nova share) + 0.05), rates with a share
left out; the 0.05 keeps two near-zero slowdowns (noise) from making a wild ratio.
Also printed (not in the last line): writes lost = (rate before - rate during) x window in
guest seconds, the slowdown's total; the share is its average over a window whose length
depends on the policy, so a policy that ends sooner shows a lower share for the same loss.
Needs root. Run: .venv/bin/python bench/convergence_sweep.py [--rates 0,48 --cap-s 60]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from common import (
    MIB,
    add_guest_args,
    check_guest_args,
    ferry_heartbeat,
    fmt,
    median,
    problem,
    remove_vm,
    run_in_lab,
)

from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec
from ferry.domain.errors import FerryError
from ferry.domain.migration import Phase
from ferry.domain.probe import Heartbeat, heartbeats
from ferry.lab import net
from ferry.lab.config import LabConfig

MIN_SEQ = 4  # heartbeats 1..4 span the 3 s "before" window
PAGE = 4096
EPS = 0.05  # slowdown floor in slowdown_vs_nova (5 points of write share)
AFTER_TIMEOUT_S = 60.0
SOURCE, TARGET = "host1", "host2"
POLICIES: dict[str, dict[str, Any]] = {
    "raw": {"policy": "qemu", "max_downtime_ms": 300, "allow_postcopy": False,
            "allow_throttle": False, "encryption": "disabled"},
    "nova": {"policy": "nova", "max_downtime_ms": 500, "allow_postcopy": True,
             "allow_throttle": False, "encryption": "disabled"},
    # Cleartext for all three, as raw QEMU streams: the policies are compared here, not
    # TLS (bench/tls_cost.py measures what encryption costs).
    "ferry": {"policy": "ferry", "max_downtime_ms": 500, "allow_postcopy": True,
              "encryption": "disabled"},
}


@dataclass
class Run:
    rate: int
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
    error: str | None = None  # the benchmark could not measure something
    serial_tail: list[str] = field(default_factory=list)  # when the guest went silent

    @property
    def sent_mib(self) -> float | None:
        return None if self.sent_bytes is None else self.sent_bytes / MIB

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
    budget = math.ceil(args.cap_s * 1024 / args.memory)
    return POLICIES[policy] | {"completion_budget_s_per_gib": budget}


def migrate(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> None:
    spec = probe_spec(config, run.vm, args.memory, args.probe_mib, run.rate)
    client.call("POST", "/v1/vms", {"spec": spec, "host": SOURCE})
    try:
        ferry_heartbeat(client, run.vm, MIN_SEQ - 1)
        net.shape(config, SOURCE, args.link_mbit * 1_000_000)
        try:
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
        finally:
            net.shape(config, SOURCE, None)
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
    print(f"  rate={run.rate:<3} {run.policy:5} {run.migration}: {run.phase}"
          f"{' (post-copy)' if run.postcopy else ''} in {fmt(run.total_s, 1)} s, "
          f"downtime {run.downtime_ms} ms, {fmt(run.sent_mib, 0)} MiB, levers "
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
    for i, rate in enumerate(args.rates):
        k = i % len(args.policies)
        for policy in args.policies[k:] + args.policies[:k]:
            runs.append(attempt(client, config, args, Run(rate, policy, f"fc-{rate}-{policy}")))
    return runs


# --- the summary ------------------------------------------------------------------
def levers(run: Run) -> str:
    return ", ".join(run.levers) or "none"


def table(runs: list[Run]) -> str:
    head = ("| rate MiB/s | policy | completed | total s | downtime ms | MiB sent | levers "
            "| writes MiB/s before -> during | write share | writes lost MiB |\n"
            "|---:|---|---|---:|---:|---:|---|---:|---:|---:|")
    rows = [f"| {r.rate} | {r.policy} | "
            f"{'error' if r.phase is None else 'yes' if r.completed else 'NO'}"
            f"{' (post-copy)' if r.postcopy else ''} | {fmt(r.total_s, 1)} "
            f"| {r.downtime_ms if r.downtime_ms is not None else '-'} | {fmt(r.sent_mib, 0)} "
            f"| {levers(r)} | {fmt(r.before_mib_s, 1)} -> {fmt(r.during_mib_s, 1)} "
            f"| {fmt(r.write_share)} | {fmt(r.lost_mib, 0)} |" for r in runs]
    return "\n".join([head, *rows])


def slowdown(share: float) -> float:
    return max(0.0, 1 - share) + EPS


def summarize(runs: list[Run], rates: list[int]) -> dict[str, Any]:
    def of(policy: str) -> list[Run]:
        return [r for r in runs if r.policy == policy]

    def at(policy: str, rate: int) -> Run | None:
        return next((r for r in of(policy) if r.rate == rate), None)

    both = [(f, n) for rate in rates if (f := at("ferry", rate)) and (n := at("nova", rate))
            and f.completed and n.completed]
    downtimes = [r.downtime_ms for r in of("ferry") if r.completed and r.downtime_ms is not None]
    return {
        **{f"{p}_completed": [sum(r.completed for r in of(p)), len(of(p))] for p in POLICIES},
        "ferry_max_downtime_ms": max(downtimes) if downtimes else None,
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
        "rates_both_completed": [f.rate for f, _ in both]}


def last_line(s: dict[str, Any]) -> str:
    def frac(key: str) -> str:
        return "{}/{}".format(*s[key])

    def num(key: str, digits: int = 2) -> str:
        return "n/a" if s[key] is None else f"{s[key]:.{digits}f}"

    return (f"ferry_completed={frac('ferry_completed')} "
            f"ferry_max_downtime_ms={num('ferry_max_downtime_ms', 0)} "
            f"raw_completed={frac('raw_completed')} nova_completed={frac('nova_completed')} "
            f"bytes_vs_nova={num('bytes_vs_nova')} slowdown_vs_nova={num('slowdown_vs_nova')} "
            f"integrity_errors={s['integrity_errors']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_guest_args(p, "0,6,12,24,48")
    p.add_argument("--link-mbit", type=int, default=200,
                   help="rate of host1's link during each migration, Mbit/s (default 200)")
    p.add_argument("--cap-s", type=int, default=120,
                   help="completion cap per migration in s (default 120; Ferry's floor: 60)")
    p.add_argument("--policies", default="raw,nova,ferry",
                   type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="which of raw,nova,ferry to run (default all three)")
    args = p.parse_args(argv)
    check_guest_args(p, args)
    if len(args.rates) != len(set(args.rates)):
        p.error("--rates: each rate once")
    if not args.policies or not set(args.policies) <= set(POLICIES):
        p.error(f"--policies: a comma-separated subset of {','.join(POLICIES)}")
    if args.link_mbit < 1 or args.cap_s < 1:
        p.error("--link-mbit and --cap-s must be positive")
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
    summary = summarize(runs, args.rates)
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "lab_dir")}
            | {"options": {p: options(args, p) for p in args.policies}},
            "runs": [asdict(r) for r in runs], "summary": summary}, indent=2))
    print("\n" + table(runs) + "\n")
    print("write share: probe writes per second of guest run time during the migration / "
          "before it (pauses excluded; see the docstring). bytes_vs_nova and "
          f"slowdown_vs_nova: medians over rates {summary['rates_both_completed']} where "
          f"Ferry and Nova both completed; slowdown = max(0, 1 - share) + {EPS}.")
    print("writes lost: (rate before - rate during) x the window in guest seconds; "
          "lost_vs_nova = median of (Ferry + 1 MiB) / (Nova + 1 MiB) over the same rates "
          f"(rates with a share): {fmt(summary['lost_vs_nova'])}")
    if summary["bench_errors"]:
        print(f"{summary['bench_errors']} runs could not be measured fully (BENCH ERROR above)")
    print(last_line(summary))
    return 1 if summary["bench_errors"] or summary["integrity_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
