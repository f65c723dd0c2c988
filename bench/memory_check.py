"""What the memory check saves and costs: migrations with `verify_memory` on (Ferry's
default on TCG) against off (what raw QEMU and libvirt do: no comparison), side by side.

Method
------
A 2-host lab of its own (prefix "fm", 198.18.227.0/24, control plane on 8727; torn
down at the end; the logs kept when a run failed). One probe VM (--memory MiB, the probe
sweeping --probe-mib and dirtying --dirty MiB/s) with a static address, so the lab's
client machine can echo it (UDP, 1 ms) during each migration; --neighbours busy probe
VMs (128 MiB, same dirty rate, spread over both hosts) share the two cores with it, as
VMs do on a real host (the lost write needs a vCPU preempted at the wrong moment, i.e.
contention: with the machine idle it is rare). --pairs pairs of
migrations back and forth, one with {"verify_memory": "on"} and one with "off", ABBA
order (bench/common.py abba). Per run:

- the migration must complete (else the run failed: counted, kept out of the medians);
- the guest is judged as the tests judge it (ferry.domain.probe.judge_intact): the
  heartbeats printed after the migration, until a full memory pass that began after it
  completed (or --judge-s), must advance, keep the boot id and report zero integrity
  errors. A guest that does not is "broken" (the measured outcome, not a failed run);
  it is then replaced by a fresh VM so the next run starts from an intact guest;
- recorded: whether the check found stale pages and how many it copied again, the
  check's time, QEMU's downtime and the client's longest echo gap.

Summary per side: runs, broken guests, runs where stale pages were repaired, medians of
client gap, QEMU downtime and check time. Last line:
`broken_on=<n>/<runs> broken_off=<n>/<runs> repaired_runs=<n> gap_on_ms=<median>
gap_off_ms=<median> check_ms=<median> pairs=<n> failed=<n>` (failed: runs whose
migration did not complete or could not be measured).
Needs root. Run: .venv/bin/python bench/memory_check.py [--pairs 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import abba, fmt, median, pair_fields, problem, remove_vm, run_in_lab

from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.probe import Heartbeat, judge_intact
from ferry.lab.config import LabConfig
from ferry.lab.watch import current_heartbeat, heartbeats_from_now, watched_migration


@dataclass
class Run:
    pair: int
    verify: bool
    source: str
    target: str
    ok: bool = False
    broken: bool = False
    problems: list[str] = field(default_factory=list)
    repaired_pages: int | None = None
    check_ms: int | None = None
    gap_ms: float | None = None
    downtime_ms: int | None = None
    error: str | None = None


def judge(client: Client, vm: str, before: Heartbeat, judge_s: float) -> list[str]:
    """judge_intact over the heartbeats from now until a full pass after the first."""
    return judge_intact(before, heartbeats_from_now(client, vm, judge_s))


class Bench:
    def __init__(self, lab: LabConfig, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.client = lab_client(lab, timeout_s=120)
        self.hosts = [h.name for h in lab.hosts]
        self.generation = 0

    @property
    def vm(self) -> str:
        return f"memchk{self.generation}"

    def boot(self, host: str) -> None:
        spec = probe_spec(self.lab, self.vm, self.args.memory, self.args.probe_mib,
                          self.args.dirty, mac=f"52:54:00:a1:00:{self.generation % 250 + 1:02x}",
                          ip=self.lab.vm_ip(0))
        self.client.call("POST", "/v1/vms", {"spec": spec, "host": host})
        wait_heartbeat(self.client, self.vm, timeout_s=120)

    def replace(self) -> str:
        """A fresh VM on the first host after a broken or lost one."""
        remove_vm(self.client, self.vm)
        self.generation += 1
        self.boot(self.hosts[0])
        return self.hosts[0]

    def one(self, run: Run) -> None:
        try:
            before = current_heartbeat(self.client, self.vm)
            if before is None:
                raise RuntimeError("no heartbeat before the migration")
            rec, report = watched_migration(
                self.client, self.lab, self.vm, run.target, tcp=False,
                options={"verify_memory": "on" if run.verify else "off"})
            if rec["phase"] != "completed":
                raise RuntimeError(f"migration {rec['phase']}: {rec.get('reason')}")
            check: dict[str, Any] | None = rec.get("memory_check")
            if check is not None:
                run.repaired_pages, run.check_ms = check["repaired_pages"], check["ms"]
            run.gap_ms, run.downtime_ms = report.max_gap_ms, rec["downtime_ms"]
            run.problems = judge(self.client, self.vm, before, self.args.judge_s)
            run.broken = bool(run.problems)
            run.ok = True
        except Exception as exc:  # one broken run is reported, the benchmark goes on
            run.error = problem(exc)
        print(f"  pair {run.pair} verify={'on ' if run.verify else 'off'} "
              f"{run.source}->{run.target}: "
              + (f"FAILED: {run.error}" if run.error else
                 f"{'BROKEN ' + '; '.join(run.problems) if run.broken else 'intact'}, "
                 f"repaired {run.repaired_pages if run.verify else '-'} pages, "
                 f"gap {fmt(run.gap_ms, 0)} ms, downtime {run.downtime_ms} ms, "
                 f"check {run.check_ms if run.verify else '-'} ms"), flush=True)

    def neighbours(self) -> list[str]:
        """Busy VMs that share the two cores with the migrating one (the race that loses
        a write needs its vCPU thread preempted at the wrong moment: contention)."""
        names = []
        for i in range(self.args.neighbours):
            name = f"busy{i}"
            spec = probe_spec(self.lab, name, 128, 48, self.args.dirty,
                              mac=f"52:54:00:a2:00:{i + 1:02x}")
            self.client.call("POST", "/v1/vms", {"spec": spec,
                                                 "host": self.hosts[i % len(self.hosts)]})
            names.append(name)
        for name in names:
            wait_heartbeat(self.client, name, timeout_s=120)
        return names

    def run(self) -> list[Run]:
        runs: list[Run] = []
        busy = self.neighbours()
        self.boot(self.hosts[0])
        where = self.hosts[0]
        try:
            for pair in range(self.args.pairs):
                for verify in abba(pair, True, False):
                    target = self.hosts[1] if where == self.hosts[0] else self.hosts[0]
                    run = Run(pair, verify, where, target)
                    self.one(run)
                    runs.append(run)
                    # a broken or lost guest is replaced by a fresh one on the first host
                    where = target if run.ok and not run.broken else self.replace()
        finally:
            for name in (self.vm, *busy):
                remove_vm(self.client, name)
        return runs


def summary(runs: list[Run], pairs: int) -> tuple[str, list[tuple[bool, bool]]]:
    by = {(r.pair, r.verify): r for r in runs}
    sides = [(by.get((i, True), Run(i, True, "", "")).ok,
              by.get((i, False), Run(i, False, "", "")).ok) for i in range(pairs)]
    print("\n| verify_memory | runs | guests broken | runs repaired | pages repaired "
          "| client gap ms (median) | QEMU downtime ms (median) | check ms (median) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    fields: dict[str, str] = {}
    for flag in (True, False):
        mine = [r for r in runs if r.verify is flag and r.ok]
        broken = sum(1 for r in mine if r.broken)
        gap = median([r.gap_ms for r in mine if r.gap_ms is not None])
        repaired = [r for r in mine if r.repaired_pages]
        checks = [float(r.check_ms) for r in mine if r.check_ms is not None]
        print(f"| {'on (Ferry)' if flag else 'off (as QEMU/libvirt)'} | {len(mine)} "
              f"| {broken} | {len(repaired) if flag else '-'} "
              f"| {sum(r.repaired_pages or 0 for r in mine) if flag else '-'} "
              f"| {fmt(gap, 0)} "
              f"| {fmt(median([float(r.downtime_ms) for r in mine if r.downtime_ms]), 0)} "
              f"| {fmt(median(checks), 0) if flag else '-'} |")
        side = "on" if flag else "off"
        fields[f"broken_{side}"] = f"{broken}/{len(mine)}"
        fields[f"gap_{side}_ms"] = fmt(gap, 0)
        if flag:
            fields["repaired_runs"] = str(len(repaired))
            fields["check_ms"] = fmt(median(checks), 0)
    order = ("broken_on", "broken_off", "repaired_runs", "gap_on_ms", "gap_off_ms",
             "check_ms")
    return " ".join(f"{k}={fields[k]}" for k in order), sides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--pairs", type=int, default=10, help="on/off pairs")
    p.add_argument("--memory", type=int, default=192, help="VM memory, MiB")
    p.add_argument("--probe-mib", type=int, default=64, help="memory the probe sweeps")
    p.add_argument("--dirty", type=int, default=60, help="probe's dirty rate, MiB/s")
    p.add_argument("--neighbours", type=int, default=4,
                   help="busy probe VMs (128 MiB, same dirty rate) sharing the hosts")
    p.add_argument("--judge-s", type=float, default=60.0,
                   help="how long the guest is watched after each migration at most")
    p.add_argument("--lab-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs = run_in_lab(
        "bench/memory_check.py", args.lab_dir, 2, prefix="fm", subnet_octet=227,
        control_port=8727, banner=lambda lab: f"{args.pairs} pairs, dirty {args.dirty} MiB/s, "
                                  f"{args.neighbours} busy neighbours",
        body=lambda lab: Bench(lab, args).run(), failed=lambda rs: any(not r.ok for r in rs))
    if isinstance(runs, int):
        return runs
    line, sides = summary(runs, args.pairs)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    print(f"\n{line} {pair_fields(sides)}")
    return 0 if all(all(s) for s in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
