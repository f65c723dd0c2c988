"""The migration orchestrator: admits migrations and runs each as a job.

A migration is a persisted state machine (domain/migration.py). A fresh one runs the
step of each phase (migration_steps.STEPS) until it ends; one found unfinished after a
restart is handled by the RESUME table: its step again, or the rollback its phase gets
(migration_rollback.ROLLBACKS, by the kind recorded with ROLLING_BACK). Integrity rule:
the guest executes on at most one host; the destination runs only once the store has
recorded it, and the source is resumed only while the destination never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import NamedTuple

from pydantic import ValidationError

from ferry.agent.models import AgentVmState, VmInfo
from ferry.control import eventlog
from ferry.control import migration_storage as storage
from ferry.control.agents import AgentPool
from ferry.control.events import ChangeBus
from ferry.control.inventory import Inventory
from ferry.control.jobs import JobRunner
from ferry.control.migration_job import Job, RollBack, Slots
from ferry.control.migration_rollback import roll_back
from ferry.control.migration_steps import STEPS
from ferry.domain.compat import Refusal, RefusalReason, check_migration
from ferry.domain.errors import Conflict, FerryError, Incompatible, InvalidInput, NotFound
from ferry.domain.inventory import VmState
from ferry.domain.migration import (
    RESUME,
    Phase,
    ResumeAction,
    RollbackKind,
    StreamOptions,
    transition,
)
from ferry.domain.networks import USER_NETWORK, out_of_step
from ferry.domain.records import ClientView, HostRecord, MigrationRecord, VmRecord
from ferry.domain.specs import DiskSpec, VmSpec
from ferry.domain.streams import encrypt
from ferry.store import Store
from ferry.store.store import VmChange
from ferry.wire import describe_validation

log = logging.getLogger("ferry.migration")

# Until the cluster's DRS settings are read (`ferry drs settings`): per host, in and out
# each (vSphere's figure for 10 GbE), and per cluster.
PER_HOST_LIMIT = 8
CLUSTER_LIMIT = 32

_LEFTOVER_STATES = (AgentVmState.INCOMING, AgentVmState.MIGRATED, AgentVmState.EXITED)


class Orchestrator:
    def __init__(self, store: Store, inventory: Inventory, agents: AgentPool,
                 bus: ChangeBus) -> None:
        self.store = store
        self.inventory = inventory
        self.agents = agents
        self.bus = bus
        self._jobs = JobRunner("migration")
        self._slots = Slots(PER_HOST_LIMIT, CLUSTER_LIMIT)
        # CHECKING and persisting the migration (which reserves the target's memory)
        # happen under this lock, so that two starts cannot both count on the same room.
        self._admit = asyncio.Lock()
        # Failed migrations whose created images are still to be deleted on their target.
        self._images_left: set[str] = set()

    async def _stale_networks(self, spec: VmSpec, target: HostRecord) -> list[Refusal]:
        """A network the target has, but as another segment (a re-create it missed):
        a VM there would not reach its peers."""
        names = {nic.network for nic in spec.nics if nic.network != USER_NETWORK}
        if not names or target.facts is None or not target.facts.network_segments:
            return []
        return [Refusal(reason=RefusalReason.NETWORK_MISSING,
                        message=f"host {target.name} has network {name} as another "
                                "segment (VNI or MTU) than the cluster's: a change not "
                                f"applied there yet; wait until `ferry network show {name}` "
                                "says ready there, or pick another host")
                for name in out_of_step(names, await self.store.networks.all(),
                                        target.facts)]

    # --- requests ----------------------------------------------------------------
    async def check(self, vm_name: str, target: str, datastore: str | None = None,
                    options: StreamOptions | None = None) -> list[Refusal]:
        """Every reason the VM cannot go to `target` (with its disks moved onto
        `datastore` there, when given)."""
        options = options or await self.options_for(None)
        return (await self._check(vm_name, target, datastore, options)).refusals

    async def _check(self, vm_name: str, target: str, datastore: str | None,
                     options: StreamOptions, *, vm: VmRecord | None = None,
                     host: HostRecord | None = None) -> _Plan:
        """`vm` and `host` (the target): as the caller just read them, if it did."""
        vm = vm or await self.store.vm(vm_name)
        host = host or await self.store.host(target)  # NotFound names the known hosts
        snaps, source = await asyncio.gather(self.inventory.snapshots(exclude_vm=vm_name),
                                             self.store.host(vm.host))
        snap = next(s for s in snaps if s.name == target)
        spec = vm.spec
        target_disks: tuple[DiskSpec, ...] = ()
        moved: tuple[DiskSpec, ...] = ()
        if datastore is not None:
            sees = snap.facts is not None and snap.facts.datastore(datastore) is not None
            target_disks, moved = storage.plan_disks(spec, datastore, sees)
            spec = storage.target_spec(spec, target_disks)
        refusals = check_migration(spec, vm.host, snap)
        refusals += await self._stale_networks(spec, host)
        encrypted = encrypt(options.encryption,
                            bool(source.facts and source.facts.migration_tls),
                            bool(host.facts and host.facts.migration_tls))
        if encrypted is None:
            refusals.append(Refusal(
                reason=RefusalReason.NO_TLS,
                message=f"encryption is required but {vm.host} or {target} holds no "
                        "cluster certificate for migration streams (enrol both hosts, or "
                        "set encryption to opportunistic or disabled)"))
        if moved and not refusals:
            refusals = await storage.check_free_paths(
                self.agents.client(host), target, storage.copies(target_disks, moved))
        return _Plan(refusals=refusals, target_disks=target_disks, moved_disks=moved,
                     encrypted=bool(encrypted), hosts=(source, host))

    async def options_for(self, overrides: Mapping[str, object] | None) -> StreamOptions:
        """The cluster's defaults with a migration's overrides; InvalidInput if bad."""
        defaults = await self.store.migration_defaults()
        return merge_options(defaults, overrides)

    async def set_limits(self, per_host: int, cluster: int) -> None:
        """Parallel migrations per host (in and out each) and per cluster."""
        await self._slots.set_limits(per_host, cluster)

    async def start(self, vm_name: str, target: str, options: StreamOptions | None = None,
                    datastore: str | None = None, cause: str | None = None
                    ) -> MigrationRecord:
        """Persist a migration, run CHECKING now, and go on in the background. With
        `datastore`, the disks move too, onto that datastore of the target."""
        # Read side by side; the first error in this order is the one reported.
        vm_read = asyncio.ensure_future(self.store.vm(vm_name))
        migrations_read = asyncio.ensure_future(self.store.migrations(unfinished_only=True))
        relocations_read = asyncio.ensure_future(self.store.relocations(unfinished_only=True))
        target_read = asyncio.ensure_future(self.store.host(target))
        # The cluster's defaults only when no options were given.
        options_read = asyncio.ensure_future(
            self.options_for(None) if options is None else _as_given(options))
        reads = (vm_read, migrations_read, relocations_read, target_read, options_read)
        try:
            vm, migrations = await vm_read, await migrations_read
            relocations = await relocations_read
            host = await target_read
            options = await options_read
        finally:
            for read in reads:
                if read.done() and not read.cancelled():
                    read.exception()  # retrieved: an error after the first is no news
                read.cancel()
        active = [m for m in migrations if m.vm == vm_name]
        if active:
            raise Conflict(f"VM {vm_name} is already being migrated ({active[0].id})",
                           "wait for it to finish or cancel it with "
                           f"`ferry migration cancel {active[0].id}`")
        moving = [r for r in relocations if r.vm == vm_name]
        if moving:
            raise Conflict(f"VM {vm_name} has a disk move running ({moving[0].id})",
                           "wait for it to finish first")
        if vm.state is not VmState.RUNNING:
            raise Conflict(f"VM {vm_name} is {vm.state}, only a running VM migrates live",
                           f"start it with `ferry vm start {vm_name}`")
        async with self._admit:
            rec, hosts = await self._admit_one(vm, host, options, datastore, cause)
        self._spawn(rec.id, admitted=(rec, *hosts))
        return rec

    async def _admit_one(self, vm: VmRecord, host: HostRecord, options: StreamOptions,
                         datastore: str | None, cause: str | None = None
                         ) -> tuple[MigrationRecord, tuple[HostRecord, HostRecord]]:
        """Persist the migration (from here on it reserves the target) and check it; a
        refused one ends FAILED at once and releases the reservation."""
        vm_name, source, target = vm.name, vm.host, host.name
        now = time.time()
        # Stored already CHECKING (PENDING is only the time it was asked for): one write
        # fewer before the target is prepared.
        rec = await self.store.add_migration(MigrationRecord(
            id=uuid.uuid4().hex[:12], vm=vm_name, source=source, target=target,
            phase=Phase.CHECKING, options=options, created_at=now, cause=cause,
            phase_times={Phase.PENDING.value: now, Phase.CHECKING.value: now}))
        log.info("migration %s of %s: %s", rec.id, rec.vm, rec.phase)
        await eventlog.migration_started(self.store, rec)
        await self.bus.changed(rec.id)
        try:
            plan = await self._check(vm_name, target, datastore, options, vm=vm, host=host)
        except FerryError as exc:
            rec = await self._enter(rec, Phase.ROLLING_BACK, reason=exc.problem,
                                    rollback=RollbackKind.ABANDON)
            await self._enter(rec, Phase.FAILED)
            raise
        if plan.refusals:
            reason = "; ".join(r.message for r in plan.refusals)
            rec = await self._enter(rec, Phase.ROLLING_BACK, reason=reason,
                                    rollback=RollbackKind.ABANDON)
            await self._enter(rec, Phase.FAILED)
            raise Incompatible(f"cannot migrate {vm_name} to {target}: {reason}")
        changes: dict[str, object] = {"encrypted": plan.encrypted}
        if plan.moved_disks:
            changes |= {"target_disks": plan.target_disks, "moved_disks": plan.moved_disks}
        rec = await self.store.change_migration(
            rec.id, lambda _: changes, VmChange(name=vm_name, state=VmState.MIGRATING))
        return rec, plan.hosts

    async def cancel(self, migration_id: str) -> MigrationRecord:
        def request(cur: MigrationRecord) -> dict[str, object]:
            # Judged on the record as stored, in the same compare-and-set as the write:
            # a cancel can never land on a migration that just entered post-copy.
            if cur.phase.terminal:
                raise Conflict(f"migration {migration_id} already ended ({cur.phase})")
            if cur.postcopy_started:
                raise Conflict(f"migration {migration_id} is in post-copy: the guest already "
                               "runs on the target and part of its memory is there only",
                               "wait for it to finish; it cannot be cancelled")
            if not cur.phase.cancellable:
                raise Conflict(f"migration {migration_id} is in {cur.phase}; past "
                               "switchover it can no longer be cancelled")
            return {"cancel_requested": True}

        rec = await self.store.change_migration(migration_id, request)
        self._jobs.request_cancel(migration_id)
        await self._slots.wake()  # a queued migration stops waiting
        await self.bus.changed(migration_id)
        return rec

    async def record_client_view(self, migration_id: str, view: ClientView
                                 ) -> MigrationRecord:
        def record(cur: MigrationRecord) -> dict[str, object]:
            if not cur.phase.terminal:
                raise Conflict(f"migration {migration_id} is still {cur.phase}",
                               "record what the client saw once it has ended")
            if cur.client_view is not None:
                raise Conflict(f"migration {migration_id} already has what a client saw "
                               f"(recorded by {cur.client_view.measured_by})",
                               "a measurement is recorded once; it cannot be replaced")
            return {"client_view": view.model_copy(update={"announce": cur.options.announce})}

        await self.store.change_migration(migration_id, record)
        await self.bus.changed(migration_id)
        return await self.store.migration(migration_id)  # with its passes, as GET has

    async def resume_unfinished(self) -> None:
        """After a restart: pick up every migration the store says is unfinished."""
        for rec in await self.store.migrations():
            if rec.phase.terminal:
                if rec.images_left:
                    self._images_left.add(rec.id)
                continue
            if rec.cancel_requested:
                self._jobs.request_cancel(rec.id)
            self._spawn(rec.id, resumed=True)

    async def reap_orphans(self, host: str, reported: tuple[VmInfo, ...]) -> None:
        """Stop leftovers an agent reports: a paused or incoming copy of a VM that the
        inventory places elsewhere and that no unfinished migration involves (e.g. a
        target whose link was down during rollback). A running copy is never touched. Then
        delete images failed migrations created on this host and could not delete."""
        await self._reap_orphans(host, reported)
        if self._images_left:
            await self._delete_images_left(host, reported)

    async def _reap_orphans(self, host: str, reported: tuple[VmInfo, ...]) -> None:
        leftovers = [v for v in reported if v.state in _LEFTOVER_STATES or (
            # a destination that ended its stream but was never resumed (-S)
            v.state is AgentVmState.PAUSED and v.migration_id is not None)]
        if not leftovers:
            return
        busy = {m.vm for m in await self.store.migrations(unfinished_only=True)}
        for info in leftovers:
            try:
                vm = await self.store.vm(info.name)
            except NotFound:
                continue  # not ours to judge: Ferry never kills what it does not know
            if vm.host == host or info.name in busy:
                continue
            log.warning("stopping leftover %s copy of %s on %s", info.state, info.name, host)
            with contextlib.suppress(FerryError):
                await self.agents.client(await self.store.host(host)).stop_vm(
                    info.name, force=True)

    async def _delete_images_left(self, host: str, reported: tuple[VmInfo, ...]) -> None:
        """Only the images the migration recorded as created by it, once no copy of its
        VM is alive on this host (a stale destination is stopped above first)."""
        busy = {m.vm for m in await self.store.migrations(unfinished_only=True)}
        alive = {v.name for v in reported if v.state.alive}
        for migration_id in sorted(self._images_left):
            try:
                rec = await self.store.migration(migration_id)
                if rec.target != host or rec.vm in alive or rec.vm in busy:
                    continue
                client = self.agents.client(await self.store.host(host))
            except FerryError:
                continue  # tried again on the next report
            left = await storage.delete_created(rec.images_left, client)
            await self.store.update_migration(rec.id, images_left=left)
            if not left:
                log.info("migration %s: deleted the images it had left on %s", rec.id, host)
                self._images_left.discard(rec.id)

    async def shutdown(self) -> None:
        """Stop watching; the migrations themselves stay persisted for resume."""
        await self._jobs.shutdown()

    async def wait(self, migration_id: str, timeout_s: float) -> MigrationRecord:
        await self._jobs.wait(migration_id, timeout_s)
        return await self.store.migration(migration_id)

    # --- the runner -------------------------------------------------------------------
    def _spawn(self, migration_id: str, resumed: bool = False,
               admitted: tuple[MigrationRecord, HostRecord, HostRecord] | None = None
               ) -> None:
        """`admitted`: a new migration as just stored, with its source and target
        hosts as read when it was checked (not read again)."""
        self._jobs.start(migration_id, lambda: self._run(migration_id, resumed, admitted))

    async def _enter(self, rec: MigrationRecord, phase: Phase, **changes: object
                     ) -> MigrationRecord:
        """Persist `phase` for a migration not (yet) running as a job."""
        now = time.time()

        def change(cur: MigrationRecord) -> dict[str, object]:
            transition(cur.phase, phase)
            return {"phase": phase, "phase_times": cur.phase_times | {phase.value: now},
                    **changes}

        rec = await self.store.change_migration(rec.id, change)
        log.info("migration %s of %s: %s", rec.id, rec.vm, phase)
        if phase.terminal:
            await eventlog.migration_ended(self.store, rec)
        await self.bus.changed(rec.id)
        return rec

    async def _job(self, rec: MigrationRecord,
                   hosts: tuple[HostRecord, HostRecord] | None = None) -> Job:
        source, target = hosts or await asyncio.gather(self.store.host(rec.source),
                                                       self.store.host(rec.target))
        return Job(id=rec.id, store=self.store, bus=self.bus,
                   source=self.agents.client(source), target=self.agents.client(target),
                   cancelled=self._jobs.cancel_flag(rec.id))

    async def _run(self, migration_id: str, resumed: bool,
                   admitted: tuple[MigrationRecord, HostRecord, HostRecord] | None = None
                   ) -> None:
        if admitted is None:
            rec = await self.store.migration(migration_id)
            job = await self._job(rec)
        else:
            rec, source, target = admitted
            job = await self._job(rec, (source, target))
        # A new migration queues for its slot (cancellable); a resumed one is under way.
        queued = rec.phase is Phase.CHECKING and not resumed
        if not await self._slots.take(rec.source, rec.target, job.cancelled, wait=queued):
            await self._end(job, "cancelled by the user while queued", RollbackKind.ABANDON)
            return
        try:
            await self._drive(job, rec, resumed)
        finally:
            await self._slots.give(rec.source, rec.target)

    async def _drive(self, job: Job, rec: MigrationRecord, resumed: bool) -> None:
        try:
            if resumed and RESUME[rec.phase] is ResumeAction.ROLL_BACK:
                raise RollBack(f"the control plane restarted during {rec.phase}; it was "
                               "undone (start the migration again)")
            while not rec.phase.terminal and rec.phase is not Phase.ROLLING_BACK:
                rec = await STEPS[rec.phase](job, rec)
            if rec.phase is Phase.ROLLING_BACK:  # resumed mid-rollback: finish that one
                await self._end(job, rec.reason or "rollback interrupted", rec.rollback)
        except asyncio.CancelledError:
            raise  # control plane shutting down: the store keeps the phase
        except RollBack as exc:
            await self._end(job, exc.reason, exc.kind)
        except FerryError as exc:
            await self._end(job, exc.problem, None)
        except Exception as exc:
            log.exception("migration %s crashed", job.id)
            await self._end(job, f"internal error: {exc!r}", None)

    async def _end(self, job: Job, reason: str, kind: RollbackKind | None) -> None:
        try:
            if (await roll_back(job, reason, kind)).images_left:
                self._images_left.add(job.id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left in ROLLING_BACK with its kind: the next start of the control plane
            # finishes it.
            log.exception("rollback of migration %s failed", job.id)


async def _as_given(options: StreamOptions) -> StreamOptions:
    return options


class _Plan(NamedTuple):
    refusals: list[Refusal]
    target_disks: tuple[DiskSpec, ...]
    moved_disks: tuple[DiskSpec, ...]
    encrypted: bool
    hosts: tuple[HostRecord, HostRecord]  # source, target as read for the check


def merge_options(base: StreamOptions, overrides: Mapping[str, object] | None
                  ) -> StreamOptions:
    try:
        return StreamOptions.model_validate(base.model_dump() | dict(overrides or {}))
    except ValidationError as exc:
        raise InvalidInput(describe_validation(exc.errors()),
                           "see `ferry policy show` for the fields and their ranges") from None
