"""The live migration as a persisted state machine (vMotion's three stages).

    PENDING → CHECKING → PREPARING_TARGET → [DISK_COPY] → PRECOPY ─→ SWITCHOVER → RESUMING_TARGET
                                                             │                          │
                                                             └→ POSTCOPY ──→ COMPLETED ←┘
    every phase ──→ ROLLING_BACK (of one RollbackKind) → FAILED

- DISK_COPY (only without shared storage): the disks are mirrored to the target.
- PRECOPY is entered once the source accepted the outgoing stream: from then on its
  QEMU's migration status is about this migration (never an earlier incoming one).
- SWITCHOVER waits for the source to finish and the (paused, -S) destination to hold the
  whole state; RESUMING_TARGET is entered with the store recording the VM on the target,
  and only then does the destination run. From there on the source is never resumed.
- POSTCOPY: execution moved to the target before all memory did. It is never cancelled
  and never rolled back to the source; link faults are waited out within the recovery
  window, and a post-copy QEMU paused on a broken link is reconnected (migrate-recover on
  the destination, migrate with resume on the source) once the link is back.

A phase only moves along an arrow; `transition` refuses anything else, so a resumed
control plane cannot skip a step by accident. What a restarted control plane does in
each phase is the RESUME table; how each phase is undone is ROLLBACK_FOR.
"""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import Field, model_validator

from ferry.domain.errors import Conflict
from ferry.domain.memory_check import VerifyMemory
from ferry.domain.specs import Frozen
from ferry.domain.streams import Encryption


class Phase(StrEnum):
    PENDING = "pending"
    CHECKING = "checking"
    PREPARING_TARGET = "preparing_target"
    DISK_COPY = "disk_copy"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    SWITCHOVER = "switchover"
    RESUMING_TARGET = "resuming_target"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED)

    @property
    def cancellable(self) -> bool:
        return self in (Phase.PENDING, Phase.CHECKING, Phase.PREPARING_TARGET,
                        Phase.DISK_COPY, Phase.PRECOPY)


_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.CHECKING, Phase.ROLLING_BACK}),
    Phase.CHECKING: frozenset({Phase.PREPARING_TARGET, Phase.ROLLING_BACK}),
    Phase.PREPARING_TARGET: frozenset({Phase.DISK_COPY, Phase.PRECOPY, Phase.ROLLING_BACK}),
    Phase.DISK_COPY: frozenset({Phase.PRECOPY, Phase.ROLLING_BACK}),
    Phase.PRECOPY: frozenset({Phase.SWITCHOVER, Phase.POSTCOPY, Phase.ROLLING_BACK}),
    Phase.POSTCOPY: frozenset({Phase.COMPLETED, Phase.ROLLING_BACK}),
    Phase.SWITCHOVER: frozenset({Phase.RESUMING_TARGET, Phase.ROLLING_BACK}),
    Phase.RESUMING_TARGET: frozenset({Phase.COMPLETED, Phase.ROLLING_BACK}),
    Phase.ROLLING_BACK: frozenset({Phase.FAILED}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
}


class RollbackKind(StrEnum):
    """How a migration is ended when it cannot go on; recorded with ROLLING_BACK so a
    restarted control plane finishes the same one."""

    ABANDON = "abandon"  # nothing was touched yet: only the record ends
    UNDO = "undo"  # before the switch: the target goes, the source runs (resumed if paused)
    UNRESOLVED = "unresolved"  # where the guest runs is not known: touch nothing, VM unknown
    # Post-copy cannot finish (its memory is split), or the destination died after it
    # ran: no copy may run.
    LOST = "lost"
    # The switch was recorded, but the destination's QEMU exited without ever having
    # been told to run (its agent says so): the paused source holds the whole guest, so
    # it is resumed and recorded again, as UNDO does.
    REVERT = "revert"


# The rollback a failure in each phase gets. UNDO is allowed only before the switch: a
# destination started paused (-S) has never run the guest until RESUMING_TARGET/POSTCOPY.
ROLLBACK_FOR: dict[Phase, RollbackKind] = {
    Phase.PENDING: RollbackKind.ABANDON,
    Phase.CHECKING: RollbackKind.ABANDON,
    Phase.PREPARING_TARGET: RollbackKind.UNDO,
    Phase.DISK_COPY: RollbackKind.UNDO,
    Phase.PRECOPY: RollbackKind.UNDO,
    Phase.SWITCHOVER: RollbackKind.UNDO,
    Phase.POSTCOPY: RollbackKind.UNRESOLVED,
    Phase.RESUMING_TARGET: RollbackKind.UNRESOLVED,
}
_EXTRA_ROLLBACKS: dict[Phase, frozenset[RollbackKind]] = {
    # REVERT in post-copy too: a destination that never ran requested no page and ran
    # nothing, so the paused source still holds the whole, current guest.
    Phase.POSTCOPY: frozenset({RollbackKind.LOST, RollbackKind.REVERT}),
    # REVERT only with the destination agent's word that its QEMU exited and never ran;
    # LOST with its word that the QEMU exited after it was sent `cont`.
    Phase.RESUMING_TARGET: frozenset({RollbackKind.REVERT, RollbackKind.LOST}),
}
_ALLOWED_ROLLBACKS: dict[Phase, frozenset[RollbackKind]] = {
    phase: frozenset({kind, RollbackKind.UNRESOLVED}) | _EXTRA_ROLLBACKS.get(phase, frozenset())
    for phase, kind in ROLLBACK_FOR.items()}


def rollback_kind(phase: Phase, wanted: RollbackKind | None, switched: bool = False
                  ) -> RollbackKind:
    """The rollback a failure in `phase` gets: `wanted` if that phase allows it, else the
    phase's own (an UNDO asked for after the switch becomes UNRESOLVED, never UNDO). Once
    the switch is recorded (`switched`) no UNDO resumes the source, whatever the phase."""
    kind = ROLLBACK_FOR.get(phase, RollbackKind.UNRESOLVED)
    if wanted is not None and wanted in _ALLOWED_ROLLBACKS.get(phase, frozenset()):
        kind = wanted
    if switched and kind is RollbackKind.UNDO:
        return RollbackKind.UNRESOLVED
    return kind


class TargetStream(StrEnum):
    """The destination's end of the memory stream, as its agent reports it."""

    RECEIVING = "receiving"  # still loading (-incoming)
    COMPLETE = "complete"  # loaded all of it and waits paused (-S): it has run nothing
    BROKEN = "broken"  # gone, exited or crashed
    SILENT = "silent"  # its agent cannot be asked


class SilentSource(StrEnum):
    """What PRECOPY does when the source's agent does not answer (killed, frozen)."""

    WAIT = "wait"  # ask the destination again (bounded by the caller)
    SWITCH = "switch"  # go on to SWITCHOVER without the source
    ROLL_BACK = "roll_back"  # the phase's rollback, as for any failed call


def when_source_silent(target: TargetStream, options: StreamOptions) -> SilentSource:
    """A destination that loaded the whole stream proves the source sent all of it, so
    the source QEMU has stopped the guest (it sits in `postmigrate`) and runs it again
    only if its agent is told to `cont`, which no one does once the switch is recorded.
    That holds without a return path: QEMU's source restarts the guest on its own only
    when the end of the stream fails, and without a return path it cannot fail after
    the destination got the last byte. A return path (opened for post-copy) can still
    fail after that, so with post-copy allowed the source must answer first."""
    if target is TargetStream.RECEIVING:
        return SilentSource.WAIT
    if target is TargetStream.COMPLETE and not options.allow_postcopy:
        return SilentSource.SWITCH
    return SilentSource.ROLL_BACK


class ResumeAction(StrEnum):
    CONTINUE = "continue"  # the phase's step again: each is idempotent from its start
    ROLL_BACK = "roll_back"  # end it with the phase's rollback (ROLLBACK_FOR)


# What a restarted control plane does with a migration it finds in each phase.
RESUME: dict[Phase, ResumeAction] = {
    # Not started yet (or queued): nothing was touched; start it again if still wanted.
    Phase.PENDING: ResumeAction.ROLL_BACK,
    Phase.CHECKING: ResumeAction.ROLL_BACK,
    # A half-prepared target or a disk copy without its watcher: undone, the source runs.
    Phase.PREPARING_TARGET: ResumeAction.ROLL_BACK,
    Phase.DISK_COPY: ResumeAction.ROLL_BACK,
    # QEMU kept migrating meanwhile: watch it again.
    Phase.PRECOPY: ResumeAction.CONTINUE,
    Phase.POSTCOPY: ResumeAction.CONTINUE,
    Phase.SWITCHOVER: ResumeAction.CONTINUE,
    Phase.RESUMING_TARGET: ResumeAction.CONTINUE,
    Phase.ROLLING_BACK: ResumeAction.CONTINUE,  # the recorded RollbackKind, again
}


def can_transition(current: Phase, new: Phase) -> bool:
    return new in _NEXT[current]


def transition(current: Phase, new: Phase) -> Phase:
    if not can_transition(current, new):
        raise Conflict(f"a migration cannot go from {current} to {new}")
    return new


class SourceStatus(StrEnum):
    """QEMU's migration status on the source (query-migrate 'status'), typed."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    WAIT_UNPLUG = "wait-unplug"
    COLO = "colo"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    # Any status a newer QEMU adds: the stream is somewhere in progress, keep watching.
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> SourceStatus:
        return cls.UNKNOWN

    @property
    def finished(self) -> bool:
        return self in (SourceStatus.COMPLETED, SourceStatus.FAILED, SourceStatus.CANCELLED)

    @property
    def in_progress(self) -> bool:
        """A stream runs (or is paused mid-way): neither never started nor ended."""
        return not self.finished and self is not SourceStatus.NONE

    @property
    def postcopy_fault(self) -> bool:
        """Post-copy lost its link: QEMU waits for it to be recovered (never cancel)."""
        return self in (SourceStatus.POSTCOPY_PAUSED, SourceStatus.POSTCOPY_RECOVER_SETUP,
                        SourceStatus.POSTCOPY_RECOVER)


class Progress(Frozen):
    """One reading of a migration's progress, from query-migrate on the source."""

    status: SourceStatus
    qemu_status: str = ""  # QEMU's own word, kept when status is UNKNOWN
    elapsed_ms: int = 0
    dirty_sync_count: int = 0
    remaining_bytes: int = 0
    transferred_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0
    page_size: int = 4096
    mbps: float = 0.0
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    error: str | None = None
    throttle_pct: int = 0
    postcopy_requests: int = 0

    @property
    def dirty_rate_bytes_s(self) -> int:
        return self.dirty_pages_rate * self.page_size

    @property
    def throughput_bytes_s(self) -> float:
        return self.mbps * 1_000_000 / 8


class PolicyKind(StrEnum):
    """Which convergence policy drives the stream (see domain/convergence.py)."""

    FERRY = "ferry"  # low downtime first, SDPS-style throttling, post-copy if allowed
    NOVA = "nova"  # OpenStack Nova today: downtime ramp, abort (or post-copy) at the timeout
    NOVA_LEGACY = "nova-legacy"  # older Nova: the ramp plus post-copy once progress stalls
    KUBEVIRT = "kubevirt"  # KubeVirt: fixed limit, post-copy (or abort) at the timeout
    QEMU = "qemu"  # QEMU's defaults: fixed downtime limit, nothing else


class Compression(StrEnum):
    NONE = "none"
    ZLIB = "zlib"
    ZSTD = "zstd"


DEFAULT_BUDGET_S_PER_GIB = 800  # Nova's live_migration_completion_timeout
KUBEVIRT_BUDGET_S_PER_GIB = 150  # KubeVirt's completionTimeoutPerGiB


class StreamOptions(Frozen):
    """How a migration's memory stream is run and kept converging.

    Cluster defaults come from `ferry policy`, a migration may override each field.
    """

    policy: PolicyKind = PolicyKind.FERRY
    max_downtime_ms: int = Field(default=500, ge=10, le=60_000)
    # 0: unlimited. QEMU refuses 2**64 and more (the stream then failed to start as a
    # QMP error); an int64 is also what every store and client can hold.
    max_bandwidth_bytes_s: int = Field(default=0, ge=0, le=2**63 - 1)
    # None: the policy's own (budget_per_gib_s).
    completion_budget_s_per_gib: int | None = Field(default=None, ge=1, le=100_000)
    progress_timeout_s: int = Field(default=150, ge=1, le=100_000)
    allow_throttle: bool = True
    max_throttle_pct: int = Field(default=99, ge=1, le=99)
    # Post-copy moves execution to the target before all memory is there: if the source
    # or the destination QEMU dies after the switch, the VM is lost. Off unless asked for.
    allow_postcopy: bool = False
    # How long a post-copy whose link (or source agent) is gone is waited for before its
    # VM is reported unknown; QEMU keeps it paused meanwhile, never cancelled.
    postcopy_recovery_window_s: int = Field(default=600, ge=1, le=86_400)
    multifd_channels: int = Field(default=0, ge=0, le=16)
    compression: Compression = Compression.NONE
    # TLS for the memory and NBD streams; `required` refuses hosts that cannot do it.
    encryption: Encryption = Encryption.REQUIRED
    # The destination announces the guest's MACs after the switch (QEMU's self-announce),
    # so the network learns its new port at once; off only to measure what that saves.
    announce: bool = True
    # Compare the paused destination's RAM with the source's before it runs and repair
    # what differs (domain/memory_check.py: TCG can lose a write during pre-copy).
    verify_memory: VerifyMemory = VerifyMemory.AUTO

    @model_validator(mode="after")
    def _compression_needs_multifd(self) -> StreamOptions:
        if self.compression is not Compression.NONE and self.multifd_channels == 0:
            raise ValueError("compression works only with multifd: set multifd_channels "
                             "(e.g. 4) or compression none")
        return self

    @property
    def throttles(self) -> bool:
        """Only Ferry's policy slows the guest; Nova's and QEMU's defaults do not."""
        return self.allow_throttle and self.policy is PolicyKind.FERRY

    @property
    def initial_downtime_ms(self) -> int:
        return min(300, self.max_downtime_ms)  # QEMU's default limit, if allowed

    @property
    def budget_per_gib_s(self) -> int:
        """The completion budget per GiB: the one set, else the policy's own (KubeVirt's
        current completionTimeoutPerGiB 150 s, Nova's 800)."""
        if self.completion_budget_s_per_gib is not None:
            return self.completion_budget_s_per_gib
        return KUBEVIRT_BUDGET_S_PER_GIB if self.policy is PolicyKind.KUBEVIRT \
            else DEFAULT_BUDGET_S_PER_GIB


class Iteration(Frozen):
    """A pre-copy pass as recorded: what the source reported when the pass began."""

    number: int
    at_ms: int
    remaining_bytes: int
    transferred_bytes: int
    dirty_rate_bytes_s: int
    throughput_bytes_s: float
    expected_downtime_ms: int | None


def record_iteration(iterations: list[Iteration], progress: Progress,
                     at_ms: int) -> Iteration | None:
    """A new Iteration if `progress` starts a pass not yet recorded, else None."""
    last = iterations[-1].number if iterations else 0
    if progress.dirty_sync_count <= last:
        return None
    return Iteration(number=progress.dirty_sync_count, at_ms=at_ms,
                     remaining_bytes=progress.remaining_bytes,
                     transferred_bytes=progress.transferred_bytes,
                     dirty_rate_bytes_s=progress.dirty_rate_bytes_s,
                     throughput_bytes_s=progress.throughput_bytes_s,
                     expected_downtime_ms=progress.expected_downtime_ms)


def budget_gib(memory_mib: int, policy: PolicyKind) -> float:
    """The size the per-GiB completion budget is multiplied by, counted as each peer
    counts it: Nova at least 2 GiB; KubeVirt in whole decimal GB, rounded up."""
    if policy in (PolicyKind.NOVA, PolicyKind.NOVA_LEGACY):
        return max(memory_mib / 1024, 2.0)
    if policy is PolicyKind.KUBEVIRT:
        return float(max(1, math.ceil(memory_mib * (1 << 20) / 1e9)))
    return memory_mib / 1024


def completion_deadline_s(memory_mib: int, options: StreamOptions) -> float:
    """Total time a migration may take before its timeout action (Nova/KubeVirt style);
    Ferry's own policies never allow less than 60 s."""
    budget = options.budget_per_gib_s * budget_gib(memory_mib, options.policy)
    if options.policy in (PolicyKind.FERRY, PolicyKind.QEMU):
        return max(60.0, budget)
    return budget


def abort_reason(elapsed_s: float, since_progress_s: float, memory_mib: int,
                 options: StreamOptions) -> str | None:
    """Why a running pre-copy must be given up now, or None to keep going."""
    deadline = completion_deadline_s(memory_mib, options)
    if elapsed_s > deadline:
        return (f"migration did not complete within its budget of {deadline:.0f} s "
                f"({options.budget_per_gib_s} s per GiB)")
    if since_progress_s > options.progress_timeout_s:
        return (f"no progress for {since_progress_s:.0f} s (remaining memory did not "
                f"shrink); the guest dirties memory faster than the link carries it")
    return None
