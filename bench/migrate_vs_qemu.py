"""Ferry's live migration against a raw QMP migration between two hand-started QEMUs.

Method
------
The benchmark brings up its own 2-host lab (prefix "fb", 198.18.212.0/24, control plane
on port 8712, in a temporary directory or --lab-dir; see bench/common.py for the
environment overrides) and always tears it down at the end. For every dirty rate it runs
--runs pairs of one Ferry and one raw migration, in ABBA order (pair 0: Ferry then raw,
pair 1: raw then Ferry, ...; bench/common.py abba), so neither kind always runs first;
both runs of pair i go the same direction (host1 -> host2 for even i, host2 -> host1 for
odd i). Every run boots a fresh probe guest (same kernel, initrd, command line, 256 MiB,
Nehalem, pc-i440fx-7.2, TCG) on the source host and migrates it as soon as the probe's
heartbeat reaches seq >= 3, so both kinds start from a guest that has run its probe for
the same time. Only one guest runs at a time.

Both kinds of guest have one NIC on the lab's VM network `vmnet` (VXLAN between the
hosts, a Linux bridge fyb<vni> in every host namespace) with the same static address
(lab vm_ip(0), kernel `ip=`), each kind its own MAC (Ferry 52:54:00:de:00:01, raw
52:54:00:de:01:01); the guest answers UDP and TCP echo on port 7. The client's view: the
lab's echo client (ferry/lab/echo.py, bench/client_view.py) runs in the lab's client
namespace from just before the clock starts (it first waits for its first UDP reply and
its TCP connection; the client's ARP entry for the address is flushed before, as the
MAC changes between runs) until 1 s after the migration was seen to end. It sends a
UDP request every 1 ms and streams 16-byte messages over one TCP connection. Client gap
= the longest interval between consecutive UDP replies; TCP broken = a reset, EOF, or any
lost, reordered or corrupted byte in the echoed stream (no reconnect).

- Ferry: the VM is created through the control plane (POST /v1/vms). The clock starts
  just before POST /v1/migrations and stops when the migration's event stream shows a
  terminal phase (COMPLETED means Ferry confirmed the destination runs). Downtime and
  bytes sent come from the migration record.
  The client's view is also recorded on the migration (PUT .../client-view).
- Raw: two QEMUs started by this script, one per lab host namespace (`ip netns exec`),
  argv from ferry.hypervisor.argv.build_argv, QMP through ferry.hypervisor.monitor.
  The script makes the NIC's tap itself, as Ferry's agent does (`ip tuntap add`, MTU of
  the network, on its bridge) in both hosts' namespaces, and removes both after the run,
  also when it failed (a tap left behind fails the run). QEMU's default self-announce
  after an incoming migration stays on, as Ferry's announce does.
  The clock starts before launching the destination QEMU (-incoming defer) and covers
  the QMP connect, migrate-incoming on tcp:<dest ip>:<port>, the stream settings Ferry
  starts with (events=on, downtime-limit 300 ms, max-bandwidth 1 TiB/s), migrate on the
  source, polling query-migrate every 50 ms until completed, polling query-status
  on the destination until 'running', then `quit` on the source until its QEMU exited:
  both clocks end with the source gone (Ferry's COMPLETED comes after its agent stopped
  the source). Downtime and bytes sent (ram.transferred) come from the source's final
  query-migrate, taken out of the clock.

Ferry's default "ferry" convergence policy starts with a lower downtime limit (a
twentieth of its 500 ms maximum) than raw QEMU's 300 ms and raises it only when pre-copy would not
otherwise finish in its budget; it may also throttle the guest; raw QEMU does none of
that. `--ferry-policy qemu` makes Ferry run exactly the raw stream settings, so the
difference is orchestration alone (with Ferry's memory check, on under TCG; add
`--ferry-verify-memory off` to leave it out too). Each Ferry run records the levers its
policy pulled (JSON: ferry_levers, throttle_pct, downtime_limit_ms).

After every migration the destination must print a heartbeat with seq > seq_before + 1;
its mem_errors + disk_errors count as integrity errors. A run fails when its migration
fails, the echo client cannot start, or the checks after fail; a broken TCP connection
alone does not fail a run, it is counted in tcp_broken.

Summary: per rate, medians over the runs; the wall ratio and downtime delta are medians
of per-pair values (Ferry run i vs raw run i of that rate). A pair with a failed side is
counted as failed and left out of the ratios (and said so); a run whose downtime QEMU
had not filled in is left out of the downtime delta only, and counted. The last line
gives the same pairwise medians over ALL pairs of all rates, `pairs=<n> failed=<n>`, and
the total of integrity errors. A second table gives per rate, side by side for Ferry
and raw: QEMU's downtime (median), the client gap (median, max), TCP connections that
survived (k/n watched runs), the median per-pair gap delta (Ferry - raw) and UDP requests
lost. Last line: `wall_ratio=<median> downtime_delta_ms=<median>
client_gap_ferry_ms=<max> client_gap_raw_ms=<max> tcp_broken=<n> pairs=<n> failed=<n>
integrity_errors=<n>`; the gaps are maxima over the runs whose migration completed,
tcp_broken counts runs of either kind.
Needs root (namespaces, bridge). Run: .venv/bin/python bench/migrate_vs_qemu.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client_view import View, VmNet, raw_taps, tap_exists, vm_network, watching
from common import (
    BOOT_TIMEOUT_S,
    MIB,
    abba,
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
from ferry.domain.memory_check import VerifyMemory
from ferry.domain.migration import Phase, PolicyKind, SourceStatus
from ferry.domain.probe import Heartbeat, last_heartbeat
from ferry.domain.specs import VmSpec
from ferry.hypervisor.argv import RunPaths, build_argv
from ferry.hypervisor.monitor import Monitor
from ferry.hypervisor.process import ProcessState, QemuProcess
from ferry.lab.config import NETWORK, LabConfig

MACHINE = "pc-i440fx-7.2"
MIN_SEQ = 3  # migrate once the probe has printed this many heartbeats
MIGRATE_TIMEOUT_S = 300.0
POLL_S = 0.05
RAW_PORT_BASE = 21000  # below the ephemeral range Ferry's agents pick from
NIC = "nic0"  # probe_spec's one NIC, on the lab's VM network
FERRY_MAC, RAW_MAC = "52:54:00:de:00:01", "52:54:00:de:01:01"
PHASES = ("pending", "checking", "preparing_target", "precopy", "switchover", "completed")


@dataclass
class Run:
    kind: str  # "ferry" or "raw"
    rate: int
    index: int
    source: str
    target: str
    ok: bool = False
    wall_s: float | None = None
    downtime_ms: float | None = None
    sent_bytes: int | None = None
    qemu_total_ms: float | None = None
    seq_before: int | None = None
    seq_after: int | None = None
    integrity_errors: int = 0
    error: str | None = None
    ferry_levers: list[str] = field(default_factory=list)
    throttle_pct: int = 0
    downtime_limit_ms: int | None = None
    late_stats: bool = False  # query-migrate said completed before total-time/downtime were set
    migrated: bool = False  # the migration itself completed (the checks after may still fail)
    view: View | None = None  # what the lab's echo client saw around the migration
    steps_s: dict[str, float] = field(default_factory=dict)  # where the wall time went


# --- Ferry ------------------------------------------------------------------------
def ferry_run(client: Client, config: LabConfig, args: argparse.Namespace, run: Run) -> None:
    vm = f"fb-{run.rate}-{run.index}"
    spec = probe_spec(config, vm, args.memory, args.probe_mib, run.rate, mac=FERRY_MAC,
                      ip=config.vm_ip(0))
    client.call("POST", "/v1/vms", {"spec": spec, "host": run.source})
    try:
        before = ferry_heartbeat(client, vm, MIN_SEQ - 1)
        run.seq_before = before.seq
        # Raw QEMU streams in the clear; so does Ferry here unless asked otherwise
        # (bench/tls_cost.py measures what TLS costs).
        options: dict[str, Any] = {"encryption": args.ferry_encryption,
                                   "verify_memory": args.ferry_verify_memory}
        if args.ferry_policy:
            options["policy"] = args.ferry_policy
        request: dict[str, Any] = {"vm": vm, "target": run.target, "options": options}
        with watching(config, config.vm_ip(0)) as watch:
            t0, epoch0 = time.perf_counter(), time.time()
            rec: dict[str, Any] = client.call("POST", "/v1/migrations", request)
            for event in client.events(f"/v1/migrations/{rec['id']}/events"):
                rec = event
                if Phase(rec["phase"]).terminal:
                    break
            run.wall_s, epoch1 = time.perf_counter() - t0, time.time()
            run.view = watch.stop(time.monotonic())
        if rec["phase"] != Phase.COMPLETED:
            raise FerryError(f"migration {rec['phase']}: {rec['reason']}")
        run.migrated = True
        with contextlib.suppress(FerryError):  # `ferry migration show` shows it too
            client.call("PUT", f"/v1/migrations/{rec['id']}/client-view", run.view.record())
        run.downtime_ms, run.sent_bytes = rec["downtime_ms"], rec["transferred_bytes"]
        run.qemu_total_ms = rec["total_ms"]
        run.ferry_levers = list(dict.fromkeys(a["kind"] for a in rec.get("actions", ())))
        run.throttle_pct = rec.get("throttle_pct", 0)
        run.downtime_limit_ms = rec.get("downtime_limit_ms")
        if not rec["total_ms"]:  # Ferry read QEMU's stats too early: downtime not measured
            run.late_stats, run.downtime_ms = True, None
        times = rec["phase_times"]
        run.steps_s["request"] = times["pending"] - epoch0
        for a, b in itertools.pairwise(PHASES):
            if a in times and b in times:
                run.steps_s[a] = times[b] - times[a]
        run.steps_s["notify"] = epoch1 - times["completed"]
        after = ferry_heartbeat(client, vm, before.seq + 1)
        run.seq_after, run.integrity_errors = after.seq, after.integrity_errors
        run.ok = True
    finally:
        remove_vm(client, vm)


# --- raw QEMU ---------------------------------------------------------------------
async def serial_heartbeat(proc: QemuProcess, after_seq: int) -> Heartbeat:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOT_TIMEOUT_S
    while loop.time() < deadline:
        try:
            text = proc.paths.serial_log.read_text(errors="replace")
        except OSError:
            text = ""
        hb = last_heartbeat(text.splitlines())
        if hb is not None and hb.seq > after_seq:
            return hb
        if proc.state is not ProcessState.RUNNING:
            raise FerryError(f"raw QEMU {proc.name} exited: {proc.log_tail()}")
        await asyncio.sleep(0.2)
    raise FerryError(f"raw QEMU {proc.name}: no probe heartbeat past seq {after_seq}")


def raw_process(config: LabConfig, host: str, spec: VmSpec, directory: Path,
                incoming: bool, vmnet: VmNet) -> QemuProcess:
    paths = RunPaths(directory)
    # The boot files live on the lab's shared datastore, as for Ferry's agents; the NIC
    # is the tap raw_taps made on the VM network's bridge.
    argv = build_argv(spec, machine=MACHINE, accel="tcg", paths=paths,
                      datastores={"shared": str(config.shared_datastore)}, incoming=incoming,
                      network_mtus={NETWORK: vmnet.mtu})
    # Raw QEMU's own behaviour: the destination runs as soon as the stream ends (Ferry
    # starts it paused with -S and resumes it once the switch is recorded).
    argv = [a for a in argv if a != "-S"]
    return QemuProcess(f"{spec.name}@{host}", ["ip", "netns", "exec", config.netns(host),
                                                *argv], paths)


async def raw_migrate(src: Monitor, src_proc: QemuProcess, dst_proc: QemuProcess, uri: str,
                      run: Run) -> Monitor:
    """Everything inside the clock, from launching the destination to it running and the
    source QEMU gone (Ferry's clock also ends once its agent stopped the source)."""
    t0 = time.perf_counter()
    dst = await dst_proc.start()
    t1 = time.perf_counter()
    await dst.set_migration_capabilities({"events": True})
    await dst.migrate_incoming(uri)
    await src.set_migration_capabilities({"events": True})
    await src.set_migration_parameters({"downtime-limit": 300, "max-bandwidth": 1 << 40})
    await src.migrate(uri)
    t2 = time.perf_counter()
    while True:
        progress = await src.query_migrate()
        if progress.status is SourceStatus.COMPLETED:
            break
        if progress.status.finished or time.perf_counter() - t2 > MIGRATE_TIMEOUT_S:
            raise FerryError(f"raw migration {progress.status}: {progress.error}")
        await asyncio.sleep(POLL_S)
    t3 = time.perf_counter()
    while (state := await dst.runstate()) != "running":
        if time.perf_counter() - t3 > 30:
            raise FerryError(f"raw destination stayed {state}")
        await asyncio.sleep(0.01)
    t4 = time.perf_counter()
    run.late_stats = not progress.elapsed_ms
    for _ in range(100):  # outside the clock: wait for QEMU to fill in total-time/downtime
        if progress.elapsed_ms:
            break
        await asyncio.sleep(0.01)
        progress = await src.query_migrate()
    t4b = time.perf_counter()
    await src.quit()
    if not await src_proc.wait(30.0):
        raise FerryError("the raw source QEMU did not exit after quit")
    t5 = time.perf_counter()
    run.wall_s = (t4 - t0) + (t5 - t4b)
    run.downtime_ms, run.sent_bytes = progress.downtime_ms, progress.transferred_bytes
    run.qemu_total_ms = progress.elapsed_ms
    run.steps_s = {"launch_dest": t1 - t0, "incoming+migrate": t2 - t1,
                   "migrate_done": t3 - t2, "confirm": t4 - t3, "source_quit": t5 - t4b}
    return dst


async def raw_run(config: LabConfig, args: argparse.Namespace, run: Run, workdir: Path,
                  port: int, vmnet: VmNet) -> None:
    # Its own MAC, the same address as Ferry's guest (only one of them runs at a time).
    spec = VmSpec.model_validate(probe_spec(config, f"raw-{run.rate}-{run.index}",
                                            args.memory, args.probe_mib, run.rate,
                                            mac=RAW_MAC, ip=config.vm_ip(0)))
    base = workdir / f"raw-{run.rate}-{run.index}"
    src_proc = raw_process(config, run.source, spec, base / "src", False, vmnet)
    dst_proc = raw_process(config, run.target, spec, base / "dst", True, vmnet)
    monitors: list[Monitor] = []
    hosts = [run.source, run.target]
    with raw_taps(config, hosts, spec.uuid, NIC, vmnet) as tap:
        try:
            monitors.append(await src_proc.start())
            before = await serial_heartbeat(src_proc, MIN_SEQ - 1)
            run.seq_before = before.seq
            with watching(config, config.vm_ip(0)) as watch:
                monitors.append(await raw_migrate(
                    monitors[0], src_proc, dst_proc,
                    f"tcp:{config.host_ip(run.target)}:{port}", run))
                run.migrated = True
                run.view = await asyncio.to_thread(watch.stop, time.monotonic())
            await src_proc.kill()
            after = await serial_heartbeat(dst_proc, before.seq + 1)
            run.seq_after, run.integrity_errors = after.seq, after.integrity_errors
            run.ok = True
        finally:
            for mon in monitors:
                await mon.close()
            await src_proc.kill()
            await dst_proc.kill()
            if run.ok:  # a failed run keeps its serial and QEMU logs (in the kept lab dir)
                shutil.rmtree(base, ignore_errors=True)
    if left := [h for h in hosts if tap_exists(config, h, tap)]:
        raise FerryError(f"raw tap {tap} still on {left} after the run")


# --- the benchmark ----------------------------------------------------------------
def attempt(run: Run, body: Callable[[], object]) -> Run:
    try:
        body()
    except Exception as exc:  # one broken run is reported, the benchmark goes on
        run.ok = False
        run.error = problem(exc)
    status = "ok" if run.ok else f"FAILED: {run.error}"
    wall = f"{run.wall_s:.2f} s" if run.wall_s is not None else "-"
    v = run.view
    seen = "no client view" if v is None else (
        f"client gap {v.gap_ms:.1f} ms, TCP {'BROKEN' if v.tcp_broken else 'ok'} "
        f"({v.tcp_bytes_echoed}/{v.tcp_bytes_sent} B echoed), UDP lost {v.udp_lost}"
        + (f" ({v.tcp_error})" if v.tcp_error else ""))
    print(f"  {run.kind:5} rate={run.rate:<3} #{run.index} {run.source}->{run.target}: "
          f"wall {wall}, downtime {run.downtime_ms} ms, {seen}, "
          f"{(run.sent_bytes or 0) / MIB:.0f} MiB, seq {run.seq_before}->{run.seq_after}, "
          f"errors {run.integrity_errors}; {status}"
          + (f"; levers {run.ferry_levers}" if run.ferry_levers else ""), flush=True)
    return run


def benchmark(config: LabConfig, args: argparse.Namespace) -> list[Run]:
    client = lab_client(config, timeout_s=120)
    hosts = [h.name for h in config.hosts]
    workdir = config.directory / "bench-raw"  # inside the lab dir: `lab down` kills leftovers
    vmnet = vm_network(client)
    runs: list[Run] = []
    for rate in args.rates:
        for i in range(args.runs):
            src, dst = (hosts[0], hosts[1]) if i % 2 == 0 else (hosts[1], hosts[0])
            for kind in abba(i, "ferry", "raw"):
                run = Run(kind, rate, i, src, dst)
                if kind == "ferry":
                    runs.append(attempt(run, functools.partial(
                        ferry_run, client, config, args, run)))
                else:
                    port = RAW_PORT_BASE + len(runs)
                    runs.append(attempt(run, functools.partial(
                        asyncio.run, raw_run(config, args, run, workdir, port, vmnet))))
    return runs


def all_pairs(runs: list[Run], rate: int | None = None) -> list[tuple[bool, bool]]:
    """Every pair's (Ferry ok, raw ok), failed ones included."""
    by = {(r.kind, r.rate, r.index): r.ok for r in runs}
    keys = sorted({(r.rate, r.index) for r in runs if rate is None or r.rate == rate})
    return [(by.get(("ferry", *k), False), by.get(("raw", *k), False)) for k in keys]


def pairs(runs: list[Run], rate: int | None = None) -> list[tuple[Run, Run]]:
    """The pairs whose two sides both succeeded: the only ones in the ratios."""
    ferry = {(r.rate, r.index): r for r in runs if r.kind == "ferry" and r.ok}
    return [(ferry[(r.rate, r.index)], r) for r in runs
            if r.kind == "raw" and r.ok and (r.rate, r.index) in ferry
            and (rate is None or r.rate == rate)]


def ratios(ps: list[tuple[Run, Run]]) -> list[float]:  # wall, Ferry / raw
    return [f.wall_s / r.wall_s for f, r in ps if f.wall_s and r.wall_s]


def deltas(ps: list[tuple[Run, Run]]) -> list[float]:  # downtime, Ferry - raw
    return [f.downtime_ms - r.downtime_ms for f, r in ps
            if f.downtime_ms is not None and r.downtime_ms is not None]


def gaps(runs: list[Run], kind: str, rate: int | None = None) -> list[float]:
    """Client-visible gaps of the runs whose migration completed."""
    return [r.view.gap_ms for r in runs if r.kind == kind and r.migrated
            and r.view is not None and (rate is None or r.rate == rate)]


def gap_deltas(ps: list[tuple[Run, Run]]) -> list[float]:  # client gap, Ferry - raw
    return [f.view.gap_ms - r.view.gap_ms for f, r in ps
            if f.view is not None and r.view is not None]


def tcp_broken(runs: list[Run]) -> int:
    return sum(1 for r in runs if r.view is not None and r.view.tcp_broken)


def survived(runs: list[Run], kind: str, rate: int) -> str:
    """`k/n`: runs whose TCP connection survived, of those the echo client watched."""
    seen = [r for r in runs if r.kind == kind and r.rate == rate and r.view is not None]
    return f"{sum(1 for r in seen if r.view and not r.view.tcp_broken)}/{len(seen)}"


def client_table(runs: list[Run], rates: list[int]) -> tuple[list[dict[str, Any]], str]:
    """Per rate, side by side: QEMU's downtime, the client-visible gap, TCP survival."""
    rows: list[dict[str, Any]] = []
    for rate in rates:
        row: dict[str, Any] = {"rate": rate, "gap_delta_ms": median(gap_deltas(pairs(runs, rate)))}
        for kind in ("ferry", "raw"):
            down = [float(r.downtime_ms) for r in runs if r.kind == kind and r.rate == rate
                    and r.migrated and r.downtime_ms is not None]
            g = gaps(runs, kind, rate)
            row |= {f"{kind}_downtime_ms": median(down), f"{kind}_gap_ms": median(g),
                    f"{kind}_gap_max_ms": max(g) if g else None,
                    f"{kind}_tcp_survived": survived(runs, kind, rate),
                    f"{kind}_udp_lost": sum(r.view.udp_lost for r in runs if r.kind == kind
                                            and r.rate == rate and r.view is not None)}
        rows.append(row)
    head = ("| rate MiB/s | Ferry QEMU downtime ms | Ferry client gap ms (max) "
            "| Ferry TCP survived | raw QEMU downtime ms | raw client gap ms (max) "
            "| raw TCP survived | gap delta ms | UDP lost Ferry / raw |\n|"
            + "---:|" * 8 + "---:|")
    table = "\n".join([head] + [
        f"| {w['rate']} | {fmt(w['ferry_downtime_ms'], 0)} | {fmt(w['ferry_gap_ms'], 1)} "
        f"({fmt(w['ferry_gap_max_ms'], 1)}) | {w['ferry_tcp_survived']} "
        f"| {fmt(w['raw_downtime_ms'], 0)} | {fmt(w['raw_gap_ms'], 1)} "
        f"({fmt(w['raw_gap_max_ms'], 1)}) | {w['raw_tcp_survived']} "
        f"| {fmt(w['gap_delta_ms'], 1)} | {w['ferry_udp_lost']} / {w['raw_udp_lost']} |"
        for w in rows])
    return rows, table


def summarize(runs: list[Run], rates: list[int]) -> tuple[list[dict[str, Any]], str, str]:
    rows: list[dict[str, Any]] = []
    for rate in rates:
        def col(kind: str, attr: str, rate: int = rate) -> float | None:
            return median([float(getattr(r, attr)) for r in runs if r.kind == kind
                           and r.rate == rate and r.ok and getattr(r, attr) is not None])
        ps = pairs(runs, rate)
        sent = {k: col(k, "sent_bytes") for k in ("ferry", "raw")}
        rows.append({
            "rate": rate, "ferry_wall_s": col("ferry", "wall_s"),
            "raw_wall_s": col("raw", "wall_s"),
            "wall_ratio": median(ratios(ps)), "ferry_downtime_ms": col("ferry", "downtime_ms"),
            "raw_downtime_ms": col("raw", "downtime_ms"), "downtime_delta_ms": median(deltas(ps)),
            "ferry_mib": None if sent["ferry"] is None else sent["ferry"] / MIB,
            "raw_mib": None if sent["raw"] is None else sent["raw"] / MIB,
            "integrity_errors": sum(r.integrity_errors for r in runs if r.rate == rate),
            "pair_fields": pair_fields(all_pairs(runs, rate))})
    head = ("| rate MiB/s | Ferry wall s | raw wall s | wall ratio | Ferry downtime ms "
            "| raw downtime ms | downtime delta ms | Ferry MiB sent | raw MiB sent "
            "| integrity errors | pairs |\n|" + "---:|" * 10 + "---|")
    table = "\n".join([head] + [
        f"| {w['rate']} | {fmt(w['ferry_wall_s'])} | {fmt(w['raw_wall_s'])} "
        f"| {fmt(w['wall_ratio'])} | {fmt(w['ferry_downtime_ms'], 0)} "
        f"| {fmt(w['raw_downtime_ms'], 0)} | {fmt(w['downtime_delta_ms'], 0)} "
        f"| {fmt(w['ferry_mib'], 0)} | {fmt(w['raw_mib'], 0)} | {w['integrity_errors']} "
        f"| {w['pair_fields']} |" for w in rows])
    steps = "\n".join(
        f"  {kind:5} median s: " + ", ".join(
            f"{k} {fmt(median([r.steps_s[k] for r in runs if r.kind == kind and r.ok]), 3)}"
            for k in next((r.steps_s for r in runs if r.kind == kind and r.ok), {}))
        for kind in ("ferry", "raw"))
    return rows, table, steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_guest_args(p, "0,20,60")
    p.add_argument("--runs", type=int, default=5, help="Ferry/raw pairs per rate")
    p.add_argument("--ferry-policy", choices=[k.value for k in PolicyKind],
                   help="override Ferry's convergence policy (default: the cluster's)")
    p.add_argument("--ferry-encryption", choices=("disabled", "required"),
                   default="disabled", help="Ferry's stream encryption (default disabled, "
                   "as raw QEMU; bench/tls_cost.py measures TLS)")
    p.add_argument("--ferry-verify-memory", choices=[v.value for v in VerifyMemory],
                   default=VerifyMemory.AUTO.value,
                   help="Ferry's memory check before the guest runs on the target "
                   "(default auto: on under TCG; off measures what it costs)")
    args = p.parse_args(argv)
    check_guest_args(p, args)
    if args.runs < 1:
        p.error("need --runs >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = run_in_lab(
        "bench/migrate_vs_qemu.py", args.lab_dir, 2, prefix="fb", subnet_octet=212,
        control_port=8712,
        banner=lambda lab: (f"rates {args.rates} MiB/s, {args.runs} runs each, "
                            f"{args.memory} MiB guest, probe {args.probe_mib} MiB"),
        body=lambda config: benchmark(config, args),
        failed=lambda runs: any(not r.ok for r in runs) or not runs)
    if isinstance(runs, int):
        return runs
    rows, table, steps = summarize(runs, args.rates)
    view_rows, view_table = client_table(runs, args.rates)
    ps = pairs(runs)
    wall_ratio, delta = median(ratios(ps)), median(deltas(ps))
    errors = sum(r.integrity_errors for r in runs)
    gap = {k: max(gaps(runs, k), default=None) for k in ("ferry", "raw")}
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "lab_dir")},
            "runs": [asdict(r) for r in runs], "medians": rows, "client_view": view_rows,
            "overall": {"wall_ratio": wall_ratio, "downtime_delta_ms": delta,
                        "client_gap_ferry_ms": gap["ferry"], "client_gap_raw_ms": gap["raw"],
                        "tcp_broken": tcp_broken(runs),
                        "integrity_errors": errors, "pairs": len(all_pairs(runs)),
                        "complete_pairs": len(ps)}}, indent=2))
    print("\n" + table + "\n")
    print("the client's view (medians over the runs whose migration completed; max in "
          "brackets; gap delta: median of Ferry - raw over complete pairs):\n"
          + view_table + "\n")
    print("where the time goes (medians over all rates):\n" + steps)
    failures = sum(1 for r in runs if not r.ok)
    late = {k: sum(1 for r in runs if r.kind == k and r.late_stats) for k in ("ferry", "raw")}
    if any(late.values()):
        print(f"query-migrate said 'completed' before QEMU had set total-time/downtime in "
              f"{late['ferry']} Ferry runs (downtime left out) and {late['raw']} raw runs "
              "(re-queried after the clock)")
    if failures:
        print(f"{failures} of {len(runs)} runs FAILED: their pairs are counted as failed "
              "and left out of the ratios and medians")
    no_delta = len(ps) - len(deltas(ps))
    if no_delta:
        print(f"{no_delta} complete pairs left out of downtime_delta_ms (no downtime read)")
    print("wall_ratio and downtime_delta_ms: medians over the Ferry/raw pairs where both "
          "sides succeeded")
    print("client_gap_*_ms: the longest client-visible gap over all runs of that kind whose "
          "migration completed; tcp_broken: runs (either kind) whose TCP connection broke")
    print(f"wall_ratio={fmt(wall_ratio)} downtime_delta_ms={fmt(delta, 0)} "
          f"client_gap_ferry_ms={fmt(gap['ferry'], 1)} client_gap_raw_ms={fmt(gap['raw'], 1)} "
          f"tcp_broken={tcp_broken(runs)} "
          f"{pair_fields(all_pairs(runs))} integrity_errors={errors}")
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
