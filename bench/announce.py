"""What the destination's announcement saves: how long the old path keeps getting a
client's frames after a live migration when nobody tells the network the VM moved.

Method
------
A 3-host lab (its own, torn down at the end) with the lab's VM network and client
machine (docs/networks.md). One probe VM with a static address, no memory dirtied. The
client (ferry/lab/echo.py) sends a UDP echo request every 1 ms and keeps NO TCP stream:
then the guest sends nothing unasked, so after the switch only an announcement (QEMU's
self-announce RARP and the virtio-net guest's gratuitous ARP) re-points the VXLAN and
bridge forwarding tables; without it the client's requests go on to the old host until
its ARP entry for the guest goes stale and is probed again by broadcast.

--pairs pairs of migrations around the ring, one with announce (Ferry's default) and one
with `announce: false`, in ABBA order. Per run: the client-visible gap (the longest
interval between two echo replies), QEMU's downtime, whether the echo was answered again
before --settle-s after the migration ended (a run that never is counted, with its gap
as measured so far), and the old path itself: a packet socket on the source host's
VXLAN device records every frame for the guest's MAC that arrives there from the
network; those arriving after the switch was recorded (phase `resuming_target`, just
before `cont`) went the old way: how many, and how long after the switch the last one
came (0 when none did). The last line: `announce_gap_ms=<median>
no_announce_gap_ms=<median> old_path_ms=<median of per-pair gap differences>
old_path_on_ms=<median> old_path_off_ms=<median> old_frames_on=<median>
old_frames_off=<median> unanswered=<n> pairs=<n> failed=<n>`.
Needs root. Run: .venv/bin/python bench/announce.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import abba, fmt, median, pair_fields, problem, remove_vm, run_in_lab

from ferry.cli.client import lab_client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.networks import vxlan_name
from ferry.lab.config import NETWORK, LabConfig
from ferry.lab.watch import watched_migration

VM = "announce1"
MAC = "52:54:00:a0:00:01"
# Frames for MAC that arrive on DEV (not those the host sends): one epoch time per line.
SNIFFER = """
import socket, sys, time
dev, mac, out = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((dev, 0))
with open(out, "w") as f:
    while True:
        frame, addr = s.recvfrom(65535)
        if frame[:6] == mac and addr[2] != socket.PACKET_OUTGOING:
            print(f"{time.time():.6f}", file=f, flush=True)
"""


@dataclass
class Run:
    pair: int
    announce: bool
    source: str
    target: str
    ok: bool = False
    gap_ms: float | None = None
    downtime_ms: float | None = None
    answered_again: bool = False
    old_path_ms: float | None = None  # the last frame the old host got after the switch
    old_frames: int | None = None
    error: str | None = None


@contextlib.contextmanager
def arrivals(lab: LabConfig, host: str, device: str) -> Iterator[Path]:
    """A file filling with the arrival times of frames for MAC at `host`'s `device`."""
    with tempfile.TemporaryDirectory(prefix="ferry-bench-sniff-") as tmp:
        out = Path(tmp) / "arrivals"
        proc = subprocess.Popen(["ip", "netns", "exec", lab.netns(host), sys.executable,
                                 "-c", SNIFFER, device, MAC, str(out)])
        try:
            yield out
        finally:
            proc.kill()
            proc.wait()


def times(path: Path) -> list[float]:
    try:
        return [float(line) for line in path.read_text().split()]
    except OSError:
        return []


def one(client: Any, lab: LabConfig, run: Run, settle_s: float) -> None:
    try:
        vni = int(client.call("GET", f"/v1/networks/{NETWORK}")["spec"]["vni"])
        with arrivals(lab, run.source, vxlan_name(vni)) as seen:
            rec, report = watched_migration(client, lab, VM, run.target, tcp=False,
                                            options={"announce": run.announce},
                                            settle_s=settle_s)
            came = times(seen)
        if rec["phase"] != "completed":
            raise RuntimeError(f"migration {rec['phase']}: {rec.get('reason')}")
        switched = float(rec["phase_times"]["resuming_target"])
        late = [t for t in came if t > switched]
        run.old_frames = len(late)
        run.old_path_ms = (max(late) - switched) * 1000 if late else 0.0
        run.gap_ms, run.downtime_ms = report.max_gap_ms, rec["downtime_ms"]
        end = report.started_at + report.duration_s
        run.answered_again = report.max_gap_start + report.max_gap_ms / 1000 < end
        run.ok = True
    except Exception as exc:  # one broken run is reported, the benchmark goes on
        run.error = problem(exc)
    print(f"  pair {run.pair} announce={run.announce!s:5} {run.source}->{run.target}: "
          f"gap {fmt(run.gap_ms, 0)} ms, QEMU downtime {fmt(run.downtime_ms, 0)} ms, "
          f"answered again: {run.answered_again}, old host got {run.old_frames} frames "
          f"after the switch, the last {fmt(run.old_path_ms, 0)} ms after it"
          + (f"; FAILED: {run.error}" if run.error else ""), flush=True)


def benchmark(lab: LabConfig, args: argparse.Namespace) -> list[Run]:
    client = lab_client(lab, timeout_s=120)
    hosts = [h.name for h in lab.hosts]
    spec = probe_spec(lab, VM, 192, 32, 0, mac=MAC, ip=lab.vm_ip(0))
    client.call("POST", "/v1/vms", {"spec": spec, "host": hosts[0]})
    runs: list[Run] = []
    try:
        wait_heartbeat(client, VM, timeout_s=120)
        where = 0
        for pair in range(args.pairs):
            for announce in abba(pair, True, False):
                run = Run(pair, announce, hosts[where], hosts[(where + 1) % len(hosts)])
                one(client, lab, run, args.settle_s)
                runs.append(run)
                if run.ok:
                    where = (where + 1) % len(hosts)
                else:  # where the VM is now, as the control plane says
                    host = client.call("GET", f"/v1/vms/{VM}")["host"]
                    where = hosts.index(host)
    finally:
        remove_vm(client, VM)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--pairs", type=int, default=4, help="announce/no-announce pairs")
    p.add_argument("--settle-s", type=float, default=10.0,
                   help="how long the client keeps asking after a migration ends")
    p.add_argument("--lab-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs = run_in_lab(
        "bench/announce.py", args.lab_dir, 3, prefix="fa", subnet_octet=215,
        control_port=8715, banner=lambda lab: f"{args.pairs} pairs",
        body=lambda lab: benchmark(lab, args), failed=lambda rs: any(not r.ok for r in rs))
    if isinstance(runs, int):
        return runs
    by = {(r.pair, r.announce): r for r in runs}
    sides = [(by.get((i, True), Run(i, True, "", "")).ok,
              by.get((i, False), Run(i, False, "", "")).ok) for i in range(args.pairs)]
    on = [r.gap_ms for r in runs if r.announce and r.ok and r.gap_ms is not None]
    off = [r.gap_ms for r in runs if not r.announce and r.ok and r.gap_ms is not None]
    diffs = [by[(i, False)].gap_ms - by[(i, True)].gap_ms  # type: ignore[operator]
             for i in range(args.pairs) if all(sides[i])]
    unanswered = sum(1 for r in runs if r.ok and not r.answered_again)
    print("\n| announce | runs | gap ms (median) | gap ms (max) | QEMU downtime ms (median) "
          "| answered again | old path ms (median / max) | frames at the old host "
          "(median / max) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    old: dict[bool, tuple[float | None, float | None]] = {}
    for flag, gaps in ((True, on), (False, off)):
        mine = [r for r in runs if r.announce is flag and r.ok]
        paths = [r.old_path_ms for r in mine if r.old_path_ms is not None]
        frames = [float(r.old_frames) for r in mine if r.old_frames is not None]
        old[flag] = (median(paths), median(frames))
        print(f"| {'on' if flag else 'off'} | {len(mine)} | {fmt(median(gaps), 0)} "
              f"| {fmt(max(gaps) if gaps else None, 0)} "
              f"| {fmt(median([r.downtime_ms for r in mine if r.downtime_ms]), 0)} "
              f"| {sum(1 for r in mine if r.answered_again)}/{len(mine)} "
              f"| {fmt(median(paths), 0)} / {fmt(max(paths) if paths else None, 0)} "
              f"| {fmt(median(frames), 0)} / {fmt(max(frames) if frames else None, 0)} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    print(f"\nannounce_gap_ms={fmt(median(on), 0)} no_announce_gap_ms={fmt(median(off), 0)} "
          f"old_path_ms={fmt(median(diffs), 0)} old_path_on_ms={fmt(old[True][0], 0)} "
          f"old_path_off_ms={fmt(old[False][0], 0)} old_frames_on={fmt(old[True][1], 0)} "
          f"old_frames_off={fmt(old[False][1], 0)} unanswered={unanswered} "
          f"{pair_fields(sides)}")
    return 0 if all(all(s) for s in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
