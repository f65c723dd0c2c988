"""A watcher, not a snapshot: is any guest ever running on two lab hosts at once?

A background thread samples, every ~50 ms, every QEMU process of the lab: which VM it is
(`-name guest=<vm>,`), which lab host it belongs to (its host directory on the command
line) and how much CPU time its vCPU threads have used (threads named `CPU <n>/TCG`,
`CPU <n>/KVM` or `ALL CPUs/TCG`: the argv sets debug-threads=on). A guest executes on a
host in an interval when that QEMU's vCPU time advanced in it; a paused or incoming
QEMU's vCPU threads sleep. Nothing is asked of QEMU or of Ferry: the agents hold the only
QMP connection, and a watcher that trusted Ferry's own view would prove nothing.

CPU time is read from /proc/<pid>/task/<tid>/schedstat (nanoseconds on CPU, the precise
sum that utime+stime in .../stat rounds to clock ticks), falling back to utime+stime.
The kernel brings that sum up to date at each scheduler tick and whenever the thread
sleeps, so a vCPU that stops (a pause, a switchover) has its last run accounted as it
stops, not later. A vCPU thread also runs a little without executing the guest: when it
starts (measured: ~0.4 ms of CPU for a TCG vCPU of QEMU 7.2 started with -S, before any
`cont`, then nothing), which an incoming QEMU does while the source still runs the guest.
So the first VCPU_STARTUP_NS of each vCPU thread's CPU time are counted as its own
start-up, not as the guest executing. Work QEMU queues on a paused vCPU later (loading
the CPU state at the end of an incoming migration) comes after the source has stopped,
so it cannot make a switchover look like a double run. Nor does a paused QEMU thawed
after a SIGSTOP (the fault matrix's freeze): SIGCONT wakes its vCPU thread for a moment
(measured: ~17 µs of CPU on a paused QEMU 7.2 TCG, then nothing), so an interval that
begins with the process seen stopped counts only if its vCPUs used more than THAW_NS.
A paused vCPU thread is woken for other reasons too (an interrupt raised, work queued on
it): measured 7-83 µs in one interval of a post-copy source paused for seconds, against
milliseconds per 50 ms interval (up to ~40) for the probe guest executing in a QEMU that
holds its RAM. So a QEMU that handed the guest over is said to execute it again only in
an interval where its vCPUs used more than WAKE_NS. And a QEMU that exits is torn down
by the kernel in its last thread, which may be a vCPU thread: measured 16-18 ms of CPU
(state R) in a post-copy source's vCPU thread as it quit, freeing the guest's RAM; a
reading taken while the process exits (PF_EXITING, zombie) ends no interval.

The judgement (`double_runs`, pure) has to cope with sampling. A migration's switchover
stops the source's vCPUs and, milliseconds later, starts the target's; with 50 ms
intervals both QEMUs often advance within the same interval, and since each sample reads
the processes one after the other, even two consecutive intervals can both show both
hosts when the switchover falls between reading one QEMU and the other. Counting
overlapping intervals would flag healthy migrations. What sampling does prove is order:
when QEMU P's vCPU time advanced in an interval that ended (by P's own read times) no
later than an interval in which QEMU Q's advanced began (by Q's read times), P executed
the guest before Q did. A switchover from P to Q only ever proves "P before Q", wherever
the sampling boundaries fall. And a QEMU process that has handed a guest over never
executes it again: Ferry tears the source down after the switch, resumes it after a
failed migration only if the target never ran, and a migration back to P's host starts
a new QEMU there (another process). So a VM is reported when two of its QEMU processes on
different hosts each executed after the other had: both at once, or one copy resumed
after the other ran (a fork of the guest's history, however late). No time window is
assumed. With both executing at once it fires as soon as the one that started first runs
again after a whole interval of the other's (~100 ms); a double run during which one
side's vCPUs stayed idle is not seen.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferry.lab import cluster

PERIOD_S = 0.05
VCPU_STARTUP_NS = 5_000_000  # ~12 times what a vCPU thread's start-up was seen to use
THAW_NS = 1_000_000  # ~60 times what a paused QEMU's vCPU used on SIGCONT
WAKE_NS = 1_000_000  # ~12 times the largest wake-up of a paused vCPU thread seen
_PF_EXITING = 0x4  # the kernel's per-task flag, field 9 of /proc/<pid>/task/<tid>/stat
_VCPU_THREAD = re.compile(r"^(?:CPU \d+|ALL CPUs)/(?:TCG|KVM|HVF|WHPX)$")
_GUEST = re.compile(rb"(?:^|\x00)guest=([^,\x00]+)")
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, order=True)
class Qemu:
    """One QEMU process: the VM it runs and the lab host it belongs to."""

    vm: str
    host: str
    pid: int


@dataclass(frozen=True)
class Reading:
    """The vCPU time of one QEMU, read at some moment within [before, after]."""

    before: float  # time.monotonic() just before reading
    after: float  # and just after
    vcpu_ns: int  # CPU time used by its vCPU threads so far
    stopped: bool = False  # the process was stopped (SIGSTOP), state T
    exiting: bool = False  # the process (or a vCPU thread) was exiting: no guest code ran


@dataclass(frozen=True)
class Sample:
    readings: Mapping[Qemu, Reading]


@dataclass(frozen=True)
class Run:
    """QEMU `qemu` executed its guest at some moment in (start, end]."""

    qemu: Qemu
    start: float
    end: float
    used_ns: int = 0  # the vCPU time it used in that interval


@dataclass(frozen=True)
class DoubleRun:
    """Two QEMUs of one VM, on different hosts, each executed after the other had."""

    vm: str
    first: Qemu  # the one that executed first
    second: Qemu
    proven_at: float  # monotonic time of the end of the interval that proved it
    # What the first used after the second had begun: vCPU time, intervals, and how long
    # after the second's first interval ended the first of them began. A few µs in one
    # interval reads as a wake-up of a paused vCPU thread; milliseconds, as execution.
    again_ns: int = 0
    again_intervals: int = 0
    again_after_s: float = 0.0

    @property
    def hosts(self) -> tuple[str, str]:
        return self.first.host, self.second.host

    def __str__(self) -> str:
        return (f"VM {self.vm} executed on {self.second.host} (QEMU {self.second.pid}) "
                f"and, after that had begun, again on {self.first.host} (QEMU "
                f"{self.first.pid}), which had run it before: on two hosts at once, or "
                f"a copy resumed after another ran ({self.again_ns / 1e6:.3f} ms of vCPU "
                f"time in {self.again_intervals} interval(s), the first "
                f"{self.again_after_s:.2f} s after)")


def runs(samples: Sequence[Sample]) -> list[Run]:
    """Every interval between two consecutive readings of one QEMU process in which its
    vCPU time advanced, widened to the reads' bounds (from before the first read to
    after the second). A process seen once (or first seen) gives no interval."""
    found = []
    for prev, cur in itertools.pairwise(samples):
        for qemu, now in cur.readings.items():
            then = prev.readings.get(qemu)
            if then is None or now.vcpu_ns <= then.vcpu_ns or now.exiting:
                continue
            if then.stopped and now.vcpu_ns - then.vcpu_ns <= THAW_NS:
                continue  # woken by SIGCONT, not executing the guest
            found.append(Run(qemu, then.before, now.after, now.vcpu_ns - then.vcpu_ns))
    return found


def _executing(rs: Sequence[Run]) -> list[Run]:
    """The runs that were the guest executing, not a paused vCPU thread woken."""
    return [r for r in rs if r.used_ns > WAKE_NS]


def _proven_before(first: Sequence[Run], second: Sequence[Run]) -> float | None:
    """When it was first proven that `first`'s QEMU executed before `second`'s did: the
    end of the earliest run of the second that began after a run of the first had
    ended; None if never."""
    if not first:
        return None
    ended = min(r.end for r in first)
    later = [r.end for r in second if r.start >= ended]
    return min(later) if later else None


def double_runs(samples: Sequence[Sample]) -> list[DoubleRun]:
    """Every pair of QEMU processes of one VM, on different hosts, each proven to have
    executed after the other had (see the module docstring), ordered by when proven."""
    by_qemu: dict[Qemu, list[Run]] = defaultdict(list)
    for run in runs(samples):
        by_qemu[run.qemu].append(run)
    found = []
    for p, q in itertools.combinations(sorted(by_qemu), 2):
        if p.vm != q.vm or p.host == q.host:
            continue
        # whichever began first is the one that executed again after the other
        first, second = (p, q) if min(r.end for r in by_qemu[p]) <= \
            min(r.end for r in by_qemu[q]) else (q, p)
        first_then_second = _proven_before(by_qemu[first], by_qemu[second])
        second_then_first = _proven_before(by_qemu[second], _executing(by_qemu[first]))
        if first_then_second is None or second_then_first is None:
            continue
        began = min(r.end for r in by_qemu[second])
        again = [r for r in _executing(by_qemu[first]) if r.start >= began]
        found.append(DoubleRun(
            p.vm, first, second, max(first_then_second, second_then_first),
            again_ns=sum(r.used_ns for r in again), again_intervals=len(again),
            again_after_s=min((r.start for r in again), default=began) - began))
    return sorted(found, key=lambda d: d.proven_at)


# ---- sampling (I/O) ------------------------------------------------------------------


def _exiting(stat: str) -> bool:
    """From a /proc/.../stat line: the task is exiting (or a zombie)."""
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & _PF_EXITING)


def vcpu_ns(pid: int) -> tuple[int, bool] | None:
    """CPU time used so far by the vCPU threads of process `pid` beyond their start-up
    (VCPU_STARTUP_NS each), and whether the process or one of them was exiting; None if
    it is gone or has no vCPU thread (yet)."""
    total, seen, exiting = 0, False, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                if not _VCPU_THREAD.match(f.read().strip()):
                    continue
            try:
                with open(f"{base}/schedstat") as f:
                    used = int(f.read().split()[0])
                with open(f"{base}/stat") as f:
                    stat = f.read()
            except (OSError, ValueError, IndexError):
                with open(f"{base}/stat") as f:
                    stat = f.read()
                fields = stat.rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) * _TICK_NS  # utime, stime
            total += max(0, used - VCPU_STARTUP_NS)
            seen = True
            exiting = exiting or _exiting(stat)
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listing and reading
    if not seen:
        return None
    try:
        exiting = exiting or _exiting(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        exiting = True  # gone meanwhile
    return total, exiting


def lab_qemus(lab_dir: Path, host_dirs: Mapping[str, Path]) -> list[Qemu]:
    """The QEMU processes of the lab in `lab_dir`, each with its VM and host."""
    marks = {host: str(d).encode() + b"/" for host, d in host_dirs.items()}
    found = []
    for pid, argv0 in cluster.processes_of(lab_dir):
        if not argv0.endswith("qemu-system-x86_64"):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        guest = _GUEST.search(cmdline)
        hosts = [h for h, mark in marks.items() if mark in cmdline]
        if guest and len(hosts) == 1:
            found.append(Qemu(guest.group(1).decode(errors="replace"), hosts[0], pid))
    return found


def take_sample(lab_dir: Path, host_dirs: Mapping[str, Path]) -> Sample:
    readings = {}
    for qemu in lab_qemus(lab_dir, host_dirs):
        before = time.monotonic()
        read = vcpu_ns(qemu.pid)
        if read is not None:
            readings[qemu] = Reading(before, time.monotonic(), read[0], stopped(qemu.pid),
                                     exiting=read[1])
    return Sample(readings)


def stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "T"


@dataclass
class Watcher:
    """Samples the lab's QEMUs in a background thread from start() to stop()."""

    lab_dir: Path
    host_dirs: Mapping[str, Path]
    period_s: float = PERIOD_S
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    allowed: set[str] = field(default_factory=set)  # VMs a test runs twice on purpose
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._loop, name="ferry-test-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append(take_sample(self.lab_dir, self.host_dirs))
            except Exception as exc:  # reported at teardown, never lost
                self.errors.append(f"{type(exc).__name__}: {exc}")
            next_at += self.period_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - self.period_s)

    def double_runs(self, vms: Iterable[str] | None = None) -> list[DoubleRun]:
        found = double_runs(list(self.samples))
        wanted = None if vms is None else set(vms)
        return [d for d in found if wanted is None or d.vm in wanted]

    def allow_double_run(self, vm: str) -> None:
        """A test that makes `vm` run twice on purpose (to test this watcher)."""
        self.allowed.add(vm)

    def verdict(self) -> list[str]:
        """What fails the test: double runs (except allowed ones), sampling errors."""
        problems = [str(d) for d in self.double_runs() if d.vm not in self.allowed]
        problems += [f"the watcher could not sample: {e}" for e in self.errors[:3]]
        return problems

    def seen_running(self, vm: str) -> set[str]:
        """The hosts on which `vm` executed at some moment while watched."""
        return {r.qemu.host for r in runs(list(self.samples)) if r.qemu.vm == vm}
