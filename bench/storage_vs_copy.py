"""Ferry's live disk move (Storage vMotion) against an offline `qemu-img convert`.

Method
------
The benchmark brings up its own 1-host lab (prefix "fs", 198.18.214.0/24, control plane
on port 8714, in a temporary directory or --lab-dir; environment overrides in
bench/common.py) and always tears it down at the end,
also on Ctrl-C / SIGTERM. Every run boots a fresh probe VM (192 MiB, TCG) on host1 whose
only disk is a new thin qcow2 image of --disk-mib MiB on the datastore "shared". The
probe's disk region is half of it (ferry.disk_mib = disk_mib/2): the probe writes the
whole region once at boot, so about 50 % of the image is allocated (checked with
`qemu-img info` actual-size and reported). Two cases: idle (ferry.disk_mib_s=0, the
probe only verifies its region) and busy (ferry.disk_mib_s=--write-mib-s, rewriting
random 4 KiB blocks at that rate). Per case --runs pairs of one Ferry and one qemu-img
run, in ABBA order (pair 0: Ferry then qemu-img, pair 1: qemu-img then Ferry, ...;
bench/common.py abba), so neither kind always runs first. Only one VM runs at a time;
VM and images are removed after each run.

- Ferry: once the probe has run >= 6 s after its initial fill, POST /v1/relocations
  {datastore: "local-host1", format: qcow2, provisioning: thin}. The clock starts just
  before the POST and stops when the relocation's event stream shows a terminal phase,
  so it includes checking, the mirror copy, the pivot (job-complete) and the removal of
  the old image. Afterwards QEMU must report the new file (GET /v1/vms/VM/disk-files),
  and the probe must print a heartbeat with disk_passes >= passes_before + 2 (a full
  verify pass of the region that started after the move); its disk_errors + mem_errors
  are the run's integrity errors.
- qemu-img: the same VM is booted and run for the same time, then stopped (QMP quit,
  so QEMU flushes the image). The clock covers only
  `qemu-img convert -t none -T none -O qcow2 shared/VM/root.qcow2 local-host1/VM/root.qcow2`
  (thin, no preallocation) and an fsync of the new image: the same cache conditions as
  Ferry's mirror, whose target is opened with cache none (O_DIRECT) like the VM's disk,
  and which flushes the target before it completes. (qemu-img's default destination
  cache mode is `unsafe`, which skips every flush: it would time the page cache.)

MiB/s = allocated MiB of the source image (qemu-img info actual-size, taken just before
the move / the convert; it includes qcow2 metadata) / seconds. The ratio per case is the
median of per-pair ratios Ferry run i / qemu-img run i, for idle and busy each; a pair
with a failed side is counted as failed and left out of the ratio.

Guest write share (busy only): the probe's disk write rate during the move divided by its
rate before, both from heartbeat disk_written deltas (4 KiB blocks) over guest uptime_ms
read from the serial console (GET /v1/vms/VM/serial). Before: from the heartbeat ~5 s
before the request to the last heartbeat before it. During: from that last heartbeat to
the first heartbeat printed after the completed event (so the window is up to ~1 s
longer than the move on each side; heartbeats come once per second).

All datastores are directories on the same host filesystem. The VM's disk uses Ferry's
default cache mode, none (O_DIRECT), so neither kind finds the image in the page cache;
both start right after a `sync`, so neither competes with writeback of earlier runs.
The machine has 2 cores: numbers are noisy. Needs root (namespaces, bridge).
Run: .venv/bin/python bench/storage_vs_copy.py [--runs 3] [--disk-mib 1024]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import MIB, abba, fmt, median, pair_fields, problem, remove_vm, run_in_lab

from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec
from ferry.domain.errors import FerryError
from ferry.domain.probe import Heartbeat, heartbeats
from ferry.domain.storage import RelocationPhase
from ferry.lab.config import LabConfig

HOST = "host1"
SOURCE_DS, TARGET_DS = "shared", f"local-{HOST}"
BASELINE_S = 5.0  # write rate "before" the move: over this much guest time
BOOT_TIMEOUT_S = 600.0  # boot + the probe's initial fill of its disk region
PASS_TIMEOUT_S = 600.0
BLOCK = 4096  # disk_written counts 4 KiB blocks
SERIAL_LINES = 1000
STEPS = ("pending", "checking", "copying", "pivoting", "completed")


@dataclass
class Run:
    kind: str  # "ferry" or "qemu-img"
    case: str  # "idle" or "busy"
    index: int
    ok: bool = False
    seconds: float | None = None
    virtual_bytes: int | None = None
    allocated_bytes: int | None = None  # source image actual-size, before the copy
    target_allocated_bytes: int | None = None  # the copy's actual-size, after
    mirror_total_bytes: int | None = None  # Ferry: the mirror job's length
    write_before_mib_s: float | None = None
    write_during_mib_s: float | None = None
    passes_before: int | None = None
    passes_after: int | None = None
    integrity_errors: int = 0
    error: str | None = None
    steps_s: dict[str, float] = field(default_factory=dict)

    @property
    def mib_s(self) -> float | None:
        if not self.seconds or self.allocated_bytes is None:
            return None
        return self.allocated_bytes / MIB / self.seconds

    @property
    def write_share(self) -> float | None:
        if self.write_during_mib_s is None or not self.write_before_mib_s:
            return None
        return self.write_during_mib_s / self.write_before_mib_s


# --- helpers ----------------------------------------------------------------------
def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(path)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return dict(json.loads(out))


def serial_beats(client: Client, vm: str) -> list[Heartbeat]:
    lines = client.call("GET", f"/v1/vms/{vm}/serial", lines=SERIAL_LINES)["lines"]
    return heartbeats(lines)


def wait_beat(client: Client, vm: str, done: Callable[[Heartbeat], bool], timeout_s: float,
              what: str) -> tuple[Heartbeat, list[Heartbeat]]:
    """The first heartbeat (oldest first) satisfying `done`, and all the beats seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beats = serial_beats(client, vm)
        hit = next((hb for hb in beats if done(hb)), None)
        if hit is not None:
            return hit, beats
        time.sleep(0.25)
    raise FerryError(f"VM {vm}: no probe heartbeat with {what} within {timeout_s:.0f} s")


def write_rate(a: Heartbeat, b: Heartbeat) -> float:
    """Guest disk writes in MiB/s between two heartbeats (guest time)."""
    ms = b.uptime_ms - a.uptime_ms
    return (b.disk_written - a.disk_written) * BLOCK / MIB / (ms / 1000) if ms > 0 else 0.0


def boot(client: Client, config: LabConfig, args: argparse.Namespace, run: Run,
         vm: str) -> tuple[Path, list[Heartbeat]]:
    """Create the image on the source datastore and boot the probe VM on it; return the
    image and the heartbeats once the probe has run > BASELINE_S after its fill."""
    rel = f"{vm}/root.qcow2"
    image = config.shared_datastore / rel
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image),
                    f"{args.disk_mib}M"], check=True, timeout=60)
    rate = args.write_mib_s if run.case == "busy" else 0
    mac = f"52:54:00:d6:{run.index % 256:02x}:{(run.kind == 'ferry') * 2 + (rate > 0):02x}"
    spec = probe_spec(config, vm, 192, 16, 0, mac=mac)
    spec["kernel"]["append"] += (f" ferry.disk=/dev/vda ferry.disk_mib={args.disk_mib // 2}"
                                 f" ferry.disk_mib_s={rate}")
    spec["disks"] = [{"name": "root", "datastore": SOURCE_DS, "path": rel,
                      "format": "qcow2", "provisioning": "thin"}]
    client.call("POST", "/v1/vms", {"spec": spec, "host": HOST})
    _, beats = wait_beat(client, vm, lambda hb: hb.uptime_ms >= (BASELINE_S + 1) * 1000,
                         BOOT_TIMEOUT_S, f"uptime >= {BASELINE_S + 1:.0f} s")
    return image, beats


def cleanup(client: Client, config: LabConfig, vm: str) -> None:
    remove_vm(client, vm)
    for ds in (config.shared_datastore, config.local_datastore(HOST)):
        shutil.rmtree(ds / vm, ignore_errors=True)


# --- the two kinds ----------------------------------------------------------------
def ferry_run(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> None:
    vm = f"fs-{run.case}-{run.index}"
    try:
        image, beats = boot(client, config, args, run, vm)
        info = image_info(image)
        run.virtual_bytes, run.allocated_bytes = info["virtual-size"], info["actual-size"]
        beats = serial_beats(client, vm)
        last = beats[-1]  # the last heartbeat before the request
        pre = [hb for hb in beats if hb.uptime_ms <= last.uptime_ms - BASELINE_S * 1000]
        run.write_before_mib_s = write_rate(pre[-1] if pre else beats[0], last)
        run.passes_before = last.disk_passes
        os.sync()
        t0, epoch0 = time.perf_counter(), time.time()
        rec: dict[str, Any] = client.call("POST", "/v1/relocations", {
            "vm": vm, "datastore": TARGET_DS, "format": "qcow2", "provisioning": "thin"})
        for event in client.events(f"/v1/relocations/{rec['id']}/events"):
            rec = event
            if RelocationPhase(rec["phase"]).terminal:
                break
        run.seconds, epoch1 = time.perf_counter() - t0, time.time()
        if rec["phase"] != RelocationPhase.COMPLETED:
            raise FerryError(f"relocation {rec['phase']}: {rec['reason']}")
        seen = serial_beats(client, vm)[-1].seq
        after, _ = wait_beat(client, vm, lambda hb: hb.seq > seen, 30, f"seq > {seen}")
        run.write_during_mib_s = write_rate(last, after)
        run.mirror_total_bytes = rec["total_bytes"]
        times = rec["phase_times"]
        run.steps_s["request"] = times["pending"] - epoch0
        for a, b in itertools.pairwise(STEPS):
            if a in times and b in times:
                run.steps_s[a] = times[b] - times[a]
        run.steps_s["notify"] = epoch1 - times["completed"]
        target = config.local_datastore(HOST) / vm / "root.qcow2"
        live = client.call("GET", f"/v1/vms/{vm}/disk-files")["root"]
        if live != str(target):
            raise FerryError(f"after the move QEMU uses {live}, not {target}")
        run.target_allocated_bytes = image_info(target)["actual-size"]
        want = last.disk_passes + 2
        done, _ = wait_beat(client, vm, lambda hb: hb.disk_passes >= want
                            or hb.integrity_errors > 0, PASS_TIMEOUT_S,
                            f"disk_passes >= {want}")
        run.passes_after, run.integrity_errors = done.disk_passes, done.integrity_errors
        run.ok = run.integrity_errors == 0
        if not run.ok:
            run.error = f"integrity errors in heartbeat {done}"
    finally:
        cleanup(client, config, vm)


def qemu_img_run(client: Client, config: LabConfig, args: argparse.Namespace,
                 run: Run) -> None:
    vm = f"fs-{run.case}-{run.index}-q"
    try:
        image, beats = boot(client, config, args, run, vm)
        run.integrity_errors = beats[-1].integrity_errors
        client.call("POST", f"/v1/vms/{vm}/stop", force=True)  # QMP quit: QEMU flushes
        info = image_info(image)
        run.virtual_bytes, run.allocated_bytes = info["virtual-size"], info["actual-size"]
        target = config.local_datastore(HOST) / vm / "root.qcow2"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-t", "none", "-T", "none", "-O", "qcow2",
                        str(image), str(target)], check=True, capture_output=True,
                       timeout=3600)
        fd = os.open(target, os.O_RDONLY)  # the copy is done once it is on the disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        run.seconds = time.perf_counter() - t0
        run.target_allocated_bytes = image_info(target)["actual-size"]
        run.ok = run.integrity_errors == 0
    finally:
        cleanup(client, config, vm)


# --- the benchmark ----------------------------------------------------------------
def attempt(run: Run, body: Callable[[], object]) -> Run:
    try:
        body()
    except Exception as exc:  # one broken run is reported, the benchmark goes on
        run.ok = False
        run.error = run.error or (problem(exc) if not isinstance(
            exc, subprocess.CalledProcessError) else f"{exc}: {exc.stderr!r}")
    mib = "-" if run.allocated_bytes is None else f"{run.allocated_bytes / MIB:.0f}"
    extra = "" if run.kind != "ferry" else (
        f", guest writes {fmt(run.write_before_mib_s)} -> {fmt(run.write_during_mib_s)} "
        f"MiB/s, passes {run.passes_before}->{run.passes_after}, steps "
        + " ".join(f"{k}={v:.2f}" for k, v in run.steps_s.items()))
    print(f"  {run.kind:8} {run.case} #{run.index}: {fmt(run.seconds)} s, {mib} MiB "
          f"allocated, {fmt(run.mib_s, 1)} MiB/s{extra}, errors {run.integrity_errors}; "
          + ("ok" if run.ok else f"FAILED: {run.error}"), flush=True)
    return run


def benchmark(config: LabConfig, args: argparse.Namespace) -> list[Run]:
    client = lab_client(config, timeout_s=120)
    runs: list[Run] = []
    kinds = {"ferry": ferry_run, "qemu-img": qemu_img_run}
    for case in ("idle", "busy"):
        for i in range(args.runs):
            for kind in abba(i, "ferry", "qemu-img"):
                run = Run(kind, case, i)
                runs.append(attempt(run, functools.partial(kinds[kind], client, config,
                                                           args, run)))
    return runs


def all_pairs(runs: list[Run], case: str) -> list[tuple[bool, bool]]:
    """Every pair's (Ferry ok, qemu-img ok), failed ones included."""
    by = {(r.kind, r.index): r.ok for r in runs if r.case == case}
    return [(by.get(("ferry", i), False), by.get(("qemu-img", i), False))
            for i in sorted({r.index for r in runs if r.case == case})]


def pair_ratios(runs: list[Run], case: str) -> list[float]:
    q = {r.index: r.seconds for r in runs if r.kind == "qemu-img" and r.case == case
         and r.ok and r.seconds}
    return [f.seconds / qs for f in runs if f.kind == "ferry" and f.case == case and f.ok
            and f.seconds and (qs := q.get(f.index))]


def summarize(runs: list[Run]) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    for case in ("idle", "busy"):
        def col(kind: str, get: Callable[[Run], float | None], case: str = case
                ) -> float | None:
            return median([v for r in runs if r.kind == kind and r.case == case and r.ok
                           and (v := get(r)) is not None])
        rows.append({
            "case": case, "ferry_s": col("ferry", lambda r: r.seconds),
            "qemu_img_s": col("qemu-img", lambda r: r.seconds),
            "ratio": median(pair_ratios(runs, case)),
            "ferry_mib_s": col("ferry", lambda r: r.mib_s),
            "qemu_img_mib_s": col("qemu-img", lambda r: r.mib_s),
            "allocated_mib": col("ferry", lambda r: None if r.allocated_bytes is None
                                 else r.allocated_bytes / MIB),
            "write_share": col("ferry", lambda r: r.write_share) if case == "busy" else None,
            "write_before_mib_s": col("ferry", lambda r: r.write_before_mib_s),
            "write_during_mib_s": col("ferry", lambda r: r.write_during_mib_s),
            "integrity_errors": sum(r.integrity_errors for r in runs if r.case == case),
            "pairs": all_pairs(runs, case)})
    head = ("| case | Ferry s | qemu-img s | ratio | Ferry MiB/s | qemu-img MiB/s "
            "| guest write share | pairs |\n|---|" + "---:|" * 6 + "---|")
    return rows, "\n".join([head] + [
        f"| {w['case']} | {fmt(w['ferry_s'])} | {fmt(w['qemu_img_s'])} | {fmt(w['ratio'])} "
        f"| {fmt(w['ferry_mib_s'], 1)} | {fmt(w['qemu_img_mib_s'], 1)} "
        f"| {fmt(w['write_share']) if w['case'] == 'busy' else '-'} "
        f"| {pair_fields(w['pairs'])} |" for w in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--disk-mib", type=int, default=1024,
                   help="virtual size of the disk in MiB; the probe fills half of it")
    p.add_argument("--write-mib-s", type=int, default=4,
                   help="guest disk write rate in the busy case, MiB/s")
    p.add_argument("--runs", type=int, default=3, help="runs of each kind per case")
    p.add_argument("--lab-dir", type=Path, help="lab directory (default: a fresh temp dir)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("need --runs >= 1")
    if args.disk_mib < 16:
        p.error("need --disk-mib >= 16")
    if args.write_mib_s < 1:
        p.error("need --write-mib-s >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = run_in_lab(
        "bench/storage_vs_copy.py", args.lab_dir, 1, prefix="fs", subnet_octet=214,
        control_port=8714,
        banner=lambda lab: (f"{args.disk_mib} MiB qcow2 disk, probe region "
                            f"{args.disk_mib // 2} MiB, busy writes {args.write_mib_s} MiB/s, "
                            f"{args.runs} runs each; {SOURCE_DS} -> {TARGET_DS}"),
        body=lambda config: benchmark(config, args),
        failed=lambda runs: any(not r.ok for r in runs))
    if isinstance(runs, int):
        return runs
    rows, table = summarize(runs)
    idle_ratio, busy_ratio = rows[0]["ratio"], rows[1]["ratio"]
    share = rows[1]["write_share"]
    sides = rows[0]["pairs"] + rows[1]["pairs"]
    errors = sum(r.integrity_errors for r in runs)
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": [asdict(r) | {"mib_s": r.mib_s, "write_share": r.write_share}
                     for r in runs],
            "medians": rows, "overall": {"idle_ratio": idle_ratio, "busy_ratio": busy_ratio,
                                         "busy_write_share": share,
                                         "integrity_errors": errors}}, indent=2))
    print("\n" + table + "\n")
    steps = [r.steps_s for r in runs if r.kind == "ferry" and r.ok]
    if steps:
        print("Ferry, where the time goes (median s): " + ", ".join(
            f"{k} {fmt(median([s[k] for s in steps if k in s]), 3)}" for k in steps[0]))
    alloc = [(r.allocated_bytes or 0) / max(r.virtual_bytes or 1, 1) for r in runs if r.ok]
    if alloc:
        print(f"source allocation: {min(alloc):.0%}..{max(alloc):.0%} of the virtual size "
              "(qemu-img info actual-size); MiB/s = allocated MiB / s")
    print("medians over runs; ratio = median of per-pair Ferry/qemu-img seconds; "
          "shared 2-core machine: noisy")
    if failures := sum(1 for r in runs if not r.ok):
        print(f"{failures} of {len(runs)} runs FAILED: their pairs are counted as failed "
              "and left out of the ratios and medians")
    print(f"idle_ratio={fmt(idle_ratio)} busy_ratio={fmt(busy_ratio)} "
          f"busy_write_share={fmt(share)} {pair_fields(sides)} integrity_errors={errors}")
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
