"""The inventory as the control plane stores it: hosts, VMs, migrations."""

from __future__ import annotations

from pydantic import Field

from ferry.domain.inventory import HostState, VmState
from ferry.domain.memory_check import MemoryCheck
from ferry.domain.migration import Iteration, Phase, RollbackKind, StreamOptions
from ferry.domain.specs import DiskSpec, Frozen, HostFacts, VmSpec


class HostRecord(Frozen):
    name: str
    url: str
    state: HostState
    maintenance: bool = False
    standby: bool = False
    facts: HostFacts | None = None
    last_seen: float = 0.0

    @property
    def cpus(self) -> int:
        return self.facts.cpus if self.facts else 0

    @property
    def memory_mib(self) -> int:
        return self.facts.memory_mib if self.facts else 0


class VmRecord(Frozen):
    spec: VmSpec
    host: str
    state: VmState

    @property
    def name(self) -> str:
        return self.spec.name


class ActionRecord(Frozen):
    """A convergence decision the control plane applied, with when and why."""

    at_ms: int
    kind: str
    value: int | None = None
    reason: str = ""


class ClientView(Frozen):
    """What a client on the VM's network saw during the migration (measured by the lab's
    echo client, ferry/lab/echo.py): the longest gap between echo replies, whether its
    TCP connection survived intact, and how many echo requests got no answer."""

    gap_ms: float = Field(ge=0, le=86_400_000, strict=True)
    # None: the client kept no TCP connection
    tcp_survived: bool | None = Field(default=None, strict=True)
    udp_lost: int = Field(default=0, ge=0, le=86_400_000, strict=True)  # 1 per ms, a day
    # Whether the destination announced the guest: the migration's own option (what a
    # client sends here is replaced by it).
    announce: bool = Field(default=True, strict=True)
    # Who recorded it: set by the control plane to the caller's token.
    measured_by: str = Field(default="lab echo client", max_length=200)


class MigrationRecord(Frozen):
    id: str
    version: int = 0  # the store's compare-and-set counter
    vm: str
    source: str
    target: str
    phase: Phase
    options: StreamOptions = Field(default_factory=StreamOptions)
    reason: str | None = None
    check_only: bool = False
    cancel_requested: bool = False
    dest_uri: str | None = None
    created_at: float
    phase_times: dict[str, float] = Field(default_factory=dict)
    downtime_ms: int | None = None
    total_ms: int | None = None
    transferred_bytes: int | None = None
    remaining_bytes: int | None = None
    iterations: tuple[Iteration, ...] = ()
    downtime_limit_ms: int | None = None
    throttle_pct: int = 0
    postcopy_started: bool = False
    # The store records the VM on the target (in post-copy this happens inside POSTCOPY).
    switched: bool = False
    rollback: RollbackKind | None = None  # which rollback ROLLING_BACK is doing
    # The destination runs and the source is being torn down: a source found gone after
    # a restart was stopped by us, not lost.
    finishing: bool = False
    postcopy_recoveries: int = 0  # times a paused post-copy was reconnected
    actions: tuple[ActionRecord, ...] = ()
    # Without shared storage: the VM's disks as they will be on the target (empty: all
    # stay where they are), the source-side disks that are copied there, the images this
    # job created on the target (recorded before creating them: a rollback deletes only
    # these), the NBD server there, and the copy's progress.
    target_disks: tuple[DiskSpec, ...] = ()
    moved_disks: tuple[DiskSpec, ...] = ()
    created_images: tuple[DiskSpec, ...] = ()
    # Of those, the ones a rollback could not delete yet (the destination's agent did not
    # answer): deleted once that agent reports again (Orchestrator.reap_orphans).
    images_left: tuple[DiskSpec, ...] = ()
    nbd: str | None = None
    disk_copied_bytes: int = 0
    disk_total_bytes: int = 0
    encrypted: bool = False  # memory and disk streams over TLS (decided at CHECKING)
    client_view: ClientView | None = None  # set afterwards, when the lab measured it
    cause: str | None = None  # who or what started it, and why (a DRS move's reason)
    # The destination's RAM compared with the source's before it ran (TCG by default).
    memory_check: MemoryCheck | None = None

    @property
    def levers(self) -> list[str]:
        """The convergence levers this migration used, in the order first used."""
        seen: list[str] = []
        for a in self.actions:
            if a.kind not in seen:
                seen.append(a.kind)
        return seen
