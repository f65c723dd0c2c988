"""Storage vMotion: a disk's live move to another datastore, as a persisted state machine.

    PENDING → CHECKING → COPYING → PIVOTING → COMPLETED
                 │          │         │
                 └──────────┴─────────┴──→ ROLLING_BACK → FAILED

COPYING runs QEMU's blockdev-mirror in background mode (guest writes complete at once
and are copied after; the guest barely notices). A copy that stops gaining on the
guest's writes for progress_timeout_s is rolled back (CopyWatch). PIVOTING is
job-complete, after which the VM runs on the new image. The source image is removed only
after the pivot, and only if not asked to keep it.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from ferry.domain.errors import Conflict
from ferry.domain.specs import DatastoreInfo, DiskFormat, DiskSpec, Frozen, Provisioning

DEFAULT_COPY_PROGRESS_TIMEOUT_S = 150  # as a migration's default progress timeout
STOPPED_STATUSES = ("concluded", "aborting", "null")  # QEMU job statuses past running


class RelocationPhase(StrEnum):
    PENDING = "pending"
    CHECKING = "checking"
    COPYING = "copying"
    PIVOTING = "pivoting"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RelocationPhase.COMPLETED, RelocationPhase.FAILED)


_NEXT: dict[RelocationPhase, frozenset[RelocationPhase]] = {
    RelocationPhase.PENDING: frozenset({RelocationPhase.CHECKING,
                                        RelocationPhase.ROLLING_BACK}),
    RelocationPhase.CHECKING: frozenset({RelocationPhase.COPYING,
                                         RelocationPhase.ROLLING_BACK}),
    RelocationPhase.COPYING: frozenset({RelocationPhase.PIVOTING,
                                        RelocationPhase.ROLLING_BACK}),
    RelocationPhase.PIVOTING: frozenset({RelocationPhase.COMPLETED,
                                         RelocationPhase.ROLLING_BACK}),
    RelocationPhase.ROLLING_BACK: frozenset({RelocationPhase.FAILED}),
    RelocationPhase.COMPLETED: frozenset(),
    RelocationPhase.FAILED: frozenset(),
}


def relocation_transition(current: RelocationPhase, new: RelocationPhase) -> RelocationPhase:
    if new not in _NEXT[current]:
        raise Conflict(f"a relocation cannot go from {current} to {new}")
    return new


class ImageInfo(Frozen):
    """What qemu-img / query-block say about an image."""

    path: str
    format: DiskFormat
    virtual_size: int
    allocated: int
    backing: str | None = None  # the backing file an image header names, if any


class MirrorProgress(Frozen):
    """One reading of a mirror job (query-jobs)."""

    job_id: str
    status: str  # QEMU's job status: created, running, ready, concluded, ...
    offset: int = 0
    length: int = 0
    ready: bool = False
    error: str | None = None

    @property
    def missing(self) -> bool:
        return self.status == "absent"

    @property
    def stopped(self) -> bool:
        """The job is gone, failed or ending: it will never become ready."""
        return self.missing or bool(self.error) or self.status in STOPPED_STATUSES


class RelocationRecord(Frozen):
    id: str
    version: int = 0  # the store's compare-and-set counter
    vm: str
    host: str
    disk: str
    source: DiskSpec
    target: DiskSpec
    phase: RelocationPhase
    keep_source: bool = False
    speed_bytes_s: int = 0  # cap for the background copy (0: as fast as it goes)
    reason: str | None = None
    created_at: float
    phase_times: dict[str, float] = Field(default_factory=dict)
    copied_bytes: int = 0
    total_bytes: int = 0
    rate_bytes_s: float = 0.0
    progress_timeout_s: int = DEFAULT_COPY_PROGRESS_TIMEOUT_S


class CopyWatch(Frozen):
    """Whether a background copy still gains on the guest's writes.

    `left` is what the copy still has to do (the mirror's total minus its offset; the
    total grows with every guest write). The copy gains while `left` reaches new lows;
    when it has not for the timeout, the guest writes faster than the copy can go."""

    best_left: int | None = None
    best_at: float = 0.0

    def observe(self, now: float, left: int) -> CopyWatch:
        if self.best_left is None or left < self.best_left:
            return CopyWatch(best_left=left, best_at=now)
        return self

    def stalled(self, now: float, timeout_s: float) -> bool:
        return self.best_left is not None and now - self.best_at > timeout_s


def needed_bytes(image: ImageInfo, provisioning: Provisioning) -> int:
    """Space the copy will take: the full virtual size if thick, else what is allocated."""
    return image.virtual_size if provisioning is Provisioning.THICK else image.allocated


def check_relocation(disk: DiskSpec, target: DiskSpec, image: ImageInfo,
                     datastore: DatastoreInfo | None, target_exists: bool) -> list[str]:
    """Every reason the move cannot start; empty when it can."""
    reasons: list[str] = []
    if datastore is None:
        reasons.append(f"the host does not see datastore {target.datastore}; "
                       "pick one listed by `ferry host list`")
    else:
        if (problem := datastore.cache_problem(target)) is not None:
            reasons.append(problem)
        need = needed_bytes(image, target.provisioning)
        if datastore.free_bytes < need:
            reasons.append(f"datastore {target.datastore} has {datastore.free_bytes >> 20} "
                           f"MiB free, the {target.provisioning} copy needs {need >> 20} MiB; "
                           "free space there or choose thin provisioning")
    if (disk.datastore, disk.path) == (target.datastore, target.path):
        reasons.append(f"disk {disk.name} already is {disk.datastore}:{disk.path}")
    elif target_exists:
        reasons.append(f"{target.datastore}:{target.path} already exists; "
                       "remove it or pick another path")
    return reasons
