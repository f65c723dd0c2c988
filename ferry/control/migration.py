"""The migration orchestrator: walks the persisted state machine for each migration.

Every step first persists the phase it enters, then acts, so a restarted control
plane resumes from the store (`resume_unfinished`) and reconciles with what the
agents report. Integrity rule: the source QEMU is torn down only after the
destination reports `running`; the source is resumed only when the destination is
known not to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import NamedTuple

from pydantic import ValidationError

from ferry.agent.client import AgentClient
from ferry.agent.models import AgentVmState, Tune, VmInfo
from ferry.control import migration_storage as storage
from ferry.control.agents import AgentPool
from ferry.control.events import ChangeBus
from ferry.control.inventory import Inventory
from ferry.domain.compat import Refusal, check_migration
from ferry.domain.convergence import (
    Action,
    ActionKind,
    ConvergenceState,
    decide,
    initial_downtime_ms,
)
from ferry.domain.errors import (
    Conflict,
    FerryError,
    HostUnavailable,
    Incompatible,
    InvalidInput,
    NotFound,
)
from ferry.domain.inventory import VmState
from ferry.domain.migration import (
    Iteration,
    Phase,
    SourceStatus,
    StreamOptions,
    record_iteration,
    transition,
)
from ferry.domain.records import ActionRecord, MigrationRecord
from ferry.domain.specs import DiskSpec
from ferry.store import Store
from ferry.store.store import VmChange
from ferry.wire import describe_validation

log = logging.getLogger("ferry.migration")

POLL_WAIT_S = 0.5  # the agent answers earlier when QEMU emits a migration event
CONFIRM_TIMEOUT_S = 30.0
PER_HOST_LIMIT = 2  # outbound and inbound per host, as KubeVirt
CLUSTER_LIMIT = 5


_LEFTOVER_STATES = (AgentVmState.INCOMING, AgentVmState.MIGRATED, AgentVmState.EXITED)


class RollBack(Exception):
    """Raised inside a migration step to end it through ROLLING_BACK → FAILED."""


class Orchestrator:
    def __init__(self, store: Store, inventory: Inventory, agents: AgentPool,
                 bus: ChangeBus) -> None:
        self.store = store
        self.inventory = inventory
        self.agents = agents
        self.bus = bus
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._out: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(PER_HOST_LIMIT))
        self._in: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(PER_HOST_LIMIT))
        self._cluster = asyncio.Semaphore(CLUSTER_LIMIT)
        # CHECKING and persisting the migration (which reserves the target's memory)
        # happen under this lock, so that two starts cannot both count on the same room.
        self._admit = asyncio.Lock()

    # --- requests ----------------------------------------------------------------
    async def check(self, vm_name: str, target: str,
                    datastore: str | None = None) -> list[Refusal]:
        """Every reason the VM cannot go to `target` (with its disks moved onto
        `datastore` there, when given)."""
        return (await self._check(vm_name, target, datastore)).refusals

    async def _check(self, vm_name: str, target: str, datastore: str | None) -> _Plan:
        vm = await self.store.vm(vm_name)
        host = await self.store.host(target)  # NotFound names the known hosts
        snaps = await self.inventory.snapshots(exclude_vm=vm_name)
        snap = next(s for s in snaps if s.name == target)
        spec = vm.spec
        target_disks: tuple[DiskSpec, ...] = ()
        moved: tuple[DiskSpec, ...] = ()
        if datastore is not None:
            sees = snap.facts is not None and snap.facts.datastore(datastore) is not None
            target_disks, moved = storage.plan_disks(spec, datastore, sees)
            spec = storage.target_spec(spec, target_disks)
        refusals = check_migration(spec, vm.host, snap)
        if moved and not refusals:
            refusals = await storage.check_free_paths(
                self.agents.client(host), target, storage.copies(target_disks, moved))
        return _Plan(refusals=refusals, target_disks=target_disks, moved_disks=moved)

    async def options_for(self, overrides: Mapping[str, object] | None) -> StreamOptions:
        """The cluster's defaults with a migration's overrides; InvalidInput if bad."""
        defaults = await self.store.migration_defaults()
        return merge_options(defaults, overrides)

    async def start(self, vm_name: str, target: str, options: StreamOptions | None = None,
                    datastore: str | None = None) -> MigrationRecord:
        """Persist a migration, run CHECKING now, and go on in the background. With
        `datastore`, the disks move too, onto that datastore of the target."""
        vm = await self.store.vm(vm_name)
        active = [m for m in await self.store.migrations(unfinished_only=True)
                  if m.vm == vm_name]
        if active:
            raise Conflict(f"VM {vm_name} is already being migrated ({active[0].id})",
                           "wait for it to finish or cancel it with "
                           f"`ferry migration cancel {active[0].id}`")
        moving = [r for r in await self.store.relocations(unfinished_only=True)
                  if r.vm == vm_name]
        if moving:
            raise Conflict(f"VM {vm_name} has a disk move running ({moving[0].id})",
                           "wait for it to finish first")
        if vm.state is not VmState.RUNNING:
            raise Conflict(f"VM {vm_name} is {vm.state}, only a running VM migrates live",
                           f"start it with `ferry vm start {vm_name}`")
        await self.store.host(target)
        options = options or await self.options_for(None)
        async with self._admit:
            rec = await self._admit_one(vm_name, vm.host, target, options, datastore)
        self._spawn(rec.id)
        return rec

    async def _admit_one(self, vm_name: str, source: str, target: str,
                         options: StreamOptions, datastore: str | None) -> MigrationRecord:
        """Persist the migration (from here on it reserves the target) and check it; a
        refused one ends FAILED at once and releases the reservation."""
        now = time.time()
        rec = await self.store.add_migration(MigrationRecord(
            id=uuid.uuid4().hex[:12], vm=vm_name, source=source, target=target,
            phase=Phase.PENDING, options=options, created_at=now,
            phase_times={Phase.PENDING.value: now}))
        rec = await self._enter(rec, Phase.CHECKING)
        try:
            plan = await self._check(vm_name, target, datastore)
        except FerryError as exc:
            rec = await self._enter(rec, Phase.ROLLING_BACK, reason=exc.problem)
            await self._enter(rec, Phase.FAILED)
            raise
        if plan.refusals:
            reason = "; ".join(r.message for r in plan.refusals)
            rec = await self._enter(rec, Phase.ROLLING_BACK, reason=reason)
            await self._enter(rec, Phase.FAILED)
            raise Incompatible(f"cannot migrate {vm_name} to {target}: {reason}")
        if plan.moved_disks:
            rec = await self.store.update_migration(rec.id, target_disks=plan.target_disks,
                                                    moved_disks=plan.moved_disks)
        await self.store.update_vm(vm_name, state=VmState.MIGRATING)
        return rec

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
        self._cancel[migration_id].set()
        await self.bus.changed(migration_id)
        return rec

    async def resume_unfinished(self) -> None:
        """After a restart: pick up every migration the store says is unfinished."""
        for rec in await self.store.migrations(unfinished_only=True):
            if rec.cancel_requested:
                self._cancel[rec.id].set()
            self._spawn(rec.id)

    async def reap_orphans(self, host: str, reported: tuple[VmInfo, ...]) -> None:
        """Stop leftovers an agent reports: a paused or incoming copy of a VM that the
        inventory places elsewhere and that no unfinished migration involves (e.g. a
        target whose link was down during rollback). A running copy is never touched."""
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

    async def shutdown(self) -> None:
        """Stop watching; the migrations themselves stay persisted for resume."""
        for task in self._tasks.values():
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def wait(self, migration_id: str, timeout_s: float) -> MigrationRecord:
        task = self._tasks.get(migration_id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        return await self.store.migration(migration_id)

    # --- the state machine ---------------------------------------------------------
    def _spawn(self, migration_id: str) -> None:
        task = asyncio.create_task(self._run(migration_id), name=f"migration-{migration_id}")
        self._tasks[migration_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(migration_id, None))

    async def _enter(self, rec: MigrationRecord, phase: Phase, *, vm: VmChange | None = None,
                     **changes: object) -> MigrationRecord:
        """Persist `phase` (and `changes`, and `vm` in the same transaction), checked
        against the phase as stored: it can only move along an arrow, never back."""
        now = time.time()

        def change(cur: MigrationRecord) -> dict[str, object]:
            transition(cur.phase, phase)
            return {"phase": phase, "phase_times": cur.phase_times | {phase.value: now},
                    **changes}

        rec = await self.store.change_migration(rec.id, change, vm)
        log.info("migration %s of %s: %s", rec.id, rec.vm, phase)
        await self.bus.changed(rec.id)
        return rec

    async def _clients(self, rec: MigrationRecord) -> tuple[AgentClient, AgentClient]:
        source = self.agents.client(await self.store.host(rec.source))
        target = self.agents.client(await self.store.host(rec.target))
        return source, target

    async def _run(self, migration_id: str) -> None:
        rec = await self.store.migration(migration_id)
        async with self._cluster, self._out[rec.source], self._in[rec.target]:
            try:
                rec = await self._step(rec)
            except asyncio.CancelledError:
                raise  # control plane shutting down: the store keeps the phase
            except RollBack as exc:
                await self._roll_back(rec.id, str(exc))
            except FerryError as exc:
                await self._roll_back(rec.id, exc.problem)
            except Exception as exc:
                log.exception("migration %s crashed", migration_id)
                await self._roll_back(rec.id, f"internal error: {exc!r}")

    async def _step(self, rec: MigrationRecord) -> MigrationRecord:
        if rec.phase in (Phase.PENDING, Phase.PREPARING_TARGET) and rec.phase_times.get(
                Phase.PREPARING_TARGET.value):
            # Restarted while preparing: a half-prepared target is simply undone.
            raise RollBack("control plane restarted while preparing the target")
        if rec.phase is Phase.PENDING:
            raise RollBack("control plane restarted before the compatibility check ran")
        if rec.phase is Phase.ROLLING_BACK:
            raise RollBack(rec.reason or "rollback interrupted by a restart")
        source, target = await self._clients(rec)
        if rec.phase is Phase.CHECKING:
            self._check_cancel(rec.id)
            rec = await self._enter(rec, Phase.PREPARING_TARGET)
            vm = await self.store.vm(rec.vm)
            disks = await storage.new_disks(source, rec) if rec.moved_disks else ()
            if disks:
                # Recorded before they exist: a rollback deletes these and nothing else.
                rec = await self.store.update_migration(
                    rec.id, created_images=tuple(d.disk for d in disks))
            try:
                ready = await target.prepare_incoming(
                    rec.id, storage.target_spec(vm.spec, rec.target_disks), rec.options, disks)
            except HostUnavailable:
                raise  # unknown whether the agent created them: they stay recorded
            except FerryError:
                # The agent refused and removed whatever it had created itself (e.g. a
                # path that already existed, which is not ours to delete).
                rec = await self.store.update_migration(rec.id, created_images=())
                raise
            self._check_cancel(rec.id)
            downtime = initial_downtime_ms(rec.options, vm.spec.memory_mib)
            rec = await self._enter(rec, Phase.PRECOPY, dest_uri=ready.uri, nbd=ready.nbd,
                                    downtime_limit_ms=downtime)
            if rec.moved_disks:
                await self._copy_disks(rec, source)
            await source.start_outgoing(rec.vm, rec.id, ready.uri, rec.options, downtime)
        if rec.phase is Phase.PRECOPY:
            rec = await self._precopy(rec, source, target)
        if rec.phase is Phase.SWITCHOVER:
            rec = await self._switchover(rec, source, target)
        return rec

    async def _copy_disks(self, rec: MigrationRecord, source: AgentClient) -> None:
        async def report(copied: int, total: int) -> None:
            await self.store.update_migration(rec.id, disk_copied_bytes=copied,
                                              disk_total_bytes=total)
            await self.bus.changed(rec.id)
        try:
            await storage.copy_disks(rec, source, report, self._cancel[rec.id].is_set)
        except storage.DiskCopyFailed as exc:
            raise RollBack(str(exc)) from None

    def _check_cancel(self, migration_id: str) -> None:
        if self._cancel[migration_id].is_set():
            raise RollBack("cancelled by the user")

    async def _precopy(self, rec: MigrationRecord, source: AgentClient,
                       target: AgentClient) -> MigrationRecord:
        began = rec.phase_times.get(Phase.PRECOPY.value, time.time())
        iterations: list[Iteration] = list(rec.iterations)
        best_remaining: int | None = None
        best_at = time.time()
        vm = await self.store.vm(rec.vm)
        while True:
            if self._cancel[rec.id].is_set():
                await source.cancel_migration(rec.vm)
                raise RollBack("cancelled by the user")
            progress, dest = await asyncio.gather(
                source.progress(rec.vm, wait_s=POLL_WAIT_S), target.vm(rec.vm, timeout_s=5.0),
                return_exceptions=True)
            if isinstance(progress, BaseException):
                raise progress
            now = time.time()
            it = record_iteration(iterations, progress, int((now - began) * 1000))
            if it is not None:
                iterations.append(it)
                await self.store.add_iteration(rec.id, it)
            rec = await self.store.update_migration(
                rec.id, remaining_bytes=progress.remaining_bytes,
                transferred_bytes=progress.transferred_bytes)
            await self.bus.changed(rec.id)
            if progress.status is SourceStatus.COMPLETED:
                return await self._enter(
                    rec, Phase.SWITCHOVER, downtime_ms=progress.downtime_ms,
                    total_ms=progress.elapsed_ms, remaining_bytes=0,
                    transferred_bytes=progress.transferred_bytes)
            if progress.status in (SourceStatus.FAILED, SourceStatus.CANCELLED):
                raise RollBack(f"QEMU reported the migration {progress.status}: "
                               f"{progress.error or 'the stream to the target broke'}")
            if progress.status is SourceStatus.NONE:
                raise RollBack("the source never started sending (control plane restarted "
                               "before the memory copy began)")
            if isinstance(dest, BaseException):
                await _cancel_quietly(source, rec.vm)
                raise RollBack(f"lost the destination during pre-copy: {_describe(dest)}")
            if not dest.state.alive or dest.state is AgentVmState.CRASHED:
                await _cancel_quietly(source, rec.vm)
                raise RollBack(f"destination QEMU on {rec.target} is {dest.state}")
            if best_remaining is None or progress.remaining_bytes < best_remaining:
                best_remaining, best_at = progress.remaining_bytes, now
            state = ConvergenceState(
                elapsed_s=now - began, since_progress_s=now - best_at,
                memory_mib=vm.spec.memory_mib, iterations=tuple(iterations),
                progress=progress, postcopy=rec.postcopy_started,
                downtime_ms=rec.downtime_limit_ms or rec.options.initial_downtime_ms,
                throttle_pct=rec.throttle_pct)
            action = decide(state, rec.options)
            if action.kind is ActionKind.THROTTLE and it is None:
                continue  # judge a throttle step only on a fresh pass's numbers
            rec = await self._apply(rec, source, action, int((now - began) * 1000))

    async def _apply(self, rec: MigrationRecord, source: AgentClient, action: Action,
                     at_ms: int) -> MigrationRecord:
        """Pull the lever the policy chose and record it in the migration's history."""
        if action.kind is ActionKind.CONTINUE:
            return rec
        if action.kind is ActionKind.ABORT:
            await _cancel_quietly(source, rec.vm)
            raise RollBack(action.reason)
        log.info("migration %s: %s %s (%s)", rec.id, action.kind, action.value, action.reason)
        entry = ActionRecord(at_ms=at_ms, kind=action.kind.value, value=action.value,
                             reason=action.reason)
        changes: dict[str, object] = {}
        tune = Tune()
        if action.kind is ActionKind.RAISE_DOWNTIME:
            changes["downtime_limit_ms"] = action.value
            tune = Tune(downtime_ms=action.value)
        elif action.kind is ActionKind.THROTTLE:
            changes["throttle_pct"] = action.value
            tune = Tune(throttle_pct=action.value)
        elif action.kind is ActionKind.POSTCOPY:
            # Persist first: from here on a rollback must never resume the source.
            changes["postcopy_started"] = True
            tune = Tune(postcopy=True)

        def pull(cur: MigrationRecord) -> dict[str, object]:
            if tune.postcopy and cur.cancel_requested:
                # The cancel won the race: post-copy must not start.
                raise RollBack("cancelled by the user")
            return {"actions": (*cur.actions, entry), **changes}

        rec = await self.store.change_migration(rec.id, pull)
        await source.tune(rec.vm, tune)
        await self.bus.changed(rec.id)
        if tune.postcopy:
            await self._switch_in_postcopy(rec)
        return rec

    async def _switch_in_postcopy(self, rec: MigrationRecord) -> None:
        """Post-copy moved execution to the target, which stays paused (-S) until told:
        record the VM there, then resume it at once (every ms here is downtime)."""
        target = (await self._clients(rec))[1]
        await self._await_paused_target(rec, target, "when post-copy started")
        vm = await self.store.vm(rec.vm)
        await self.store.update_vm(rec.vm, host=rec.target, state=VmState.RUNNING,
                                   spec=storage.target_spec(vm.spec, rec.target_disks))
        await target.resume_vm(rec.vm)

    async def _switchover(self, rec: MigrationRecord, source: AgentClient,
                          target: AgentClient) -> MigrationRecord:
        """The source has sent everything: confirm the paused destination holds it,
        record the VM there, and only then let it run (RESUMING_TARGET)."""
        if rec.postcopy_started:
            # The switch was recorded (and the target resumed) when post-copy began.
            rec = await self._enter(rec, Phase.RESUMING_TARGET)
            return await self._resume_target(rec, source, target)
        dest = await self._await_paused_target(rec, target, "at switchover")
        vm = await self.store.vm(rec.vm)
        rec = await self._enter(rec, Phase.RESUMING_TARGET, vm=VmChange(
            name=rec.vm, host=rec.target, state=VmState.RUNNING,
            spec=storage.target_spec(vm.spec, rec.target_disks)))
        if dest.state is AgentVmState.RUNNING:
            log.warning("migration %s: destination already running", rec.id)
        return await self._resume_target(rec, source, target)

    async def _await_paused_target(self, rec: MigrationRecord, target: AgentClient,
                                   when: str) -> VmInfo:
        """The destination once it holds the whole state, paused (or already running):
        RollBack if it is gone or stays away; it never ran the guest, so the source may."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIRM_TIMEOUT_S
        while True:
            try:
                dest = await target.vm(rec.vm, timeout_s=5.0)
            except NotFound:
                raise RollBack(f"the destination QEMU vanished {when}") from None
            except HostUnavailable as exc:
                if loop.time() > deadline:
                    raise RollBack(f"cannot reach the destination {when}: {exc.problem}"
                                   ) from None
                await asyncio.sleep(0.2)
                continue
            if dest.state in (AgentVmState.PAUSED, AgentVmState.RUNNING):
                return dest
            if dest.state in (AgentVmState.EXITED, AgentVmState.CRASHED):
                raise RollBack(f"the destination {dest.state} {when}")
            if loop.time() > deadline:
                raise RollBack(f"the destination stayed {dest.state} {when}")
            await asyncio.sleep(0.02)

    async def _resume_target(self, rec: MigrationRecord, source: AgentClient,
                             target: AgentClient) -> MigrationRecord:
        """The store has the VM on the target: run it there (idempotent `cont`), then
        tear down the source. The source is never resumed from here on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIRM_TIMEOUT_S
        while True:
            try:
                info = await target.resume_vm(rec.vm)
                if info.state is AgentVmState.RUNNING:
                    break
                problem = f"it is {info.state} after `cont`"
            except NotFound:
                return await self._fail_unconfirmed(
                    rec, "the destination QEMU vanished after the switch was recorded")
            except FerryError as exc:
                problem = exc.problem
            if loop.time() > deadline:
                return await self._fail_unconfirmed(rec, problem)
            await asyncio.sleep(0.2)
        return await self._finish(rec, source)

    async def _finish(self, rec: MigrationRecord, source: AgentClient) -> MigrationRecord:
        """The destination runs: tear the source down."""
        if rec.moved_disks:
            target = (await self._clients(rec))[1]
            problems = await storage.finish(rec, source, target)
            return await self._enter(rec, Phase.COMPLETED,
                                     reason="; ".join(problems) or None)
        rec = await self._enter(rec, Phase.COMPLETED)
        try:
            await source.stop_vm(rec.vm, force=True)
        except NotFound:
            pass
        except FerryError as exc:
            # The source is paused after switchover; its agent kills it on contact.
            log.warning("migration %s: source teardown failed: %s", rec.id, exc.problem)
        return rec

    async def _fail_unconfirmed(self, rec: MigrationRecord, problem: str) -> MigrationRecord:
        reason = (f"cannot confirm the destination runs ({problem}); the source is kept "
                  f"paused so that the VM never runs twice: check host {rec.target}")
        rec = await self._enter(rec, Phase.ROLLING_BACK, reason=reason)
        await self.store.update_vm(rec.vm, state=VmState.UNKNOWN)
        return await self._enter(rec, Phase.FAILED)

    async def _roll_back(self, migration_id: str, reason: str) -> None:
        """Undo a migration before the switch: the target's QEMU goes, the source keeps
        (or resumes) running. The destination started paused (-S) and is resumed only
        after the switch is recorded, so before that it never ran the guest: resuming
        the source is safe even when the destination cannot be reached."""
        rec = await self.store.migration(migration_id)
        if rec.phase.terminal:
            return
        if rec.phase is Phase.RESUMING_TARGET:
            await self._fail_unconfirmed(rec, reason)
            return
        if rec.postcopy_started and await self._target_runs(rec):
            # The guest already runs on the target: finishing is the only safe outcome.
            # The source may still be serving pages: the leftover reaper stops it once
            # it reports the migration done.
            await self.store.update_vm(rec.vm, host=rec.target, state=VmState.RUNNING)
            await self._enter(rec, Phase.COMPLETED, reason=f"finished in post-copy "
                              f"after: {reason}")
            return
        if rec.phase is not Phase.ROLLING_BACK:
            rec = await self._enter(rec, Phase.ROLLING_BACK, reason=reason)
        if rec.postcopy_started:
            await self._lost_in_postcopy(rec, reason)
            return
        try:
            source, target = await self._clients(rec)
            await _cancel_quietly(source, rec.vm)
            dest_gone = True
            try:
                await target.stop_vm(rec.vm, force=True)
            except NotFound:
                pass
            except FerryError:
                dest_gone = False  # unreachable: the reaper stops it once it is back
            if dest_gone:
                await storage.undo(rec, source, target)
            src = await source.vm(rec.vm)
            if src.state in (AgentVmState.MIGRATED, AgentVmState.PAUSED):
                await source.resume_vm(rec.vm)
            vm = await self.store.vm(rec.vm)
            await self.store.update_vm(rec.vm, host=rec.source, state=VmState.RUNNING,
                                       spec=storage.source_spec(vm.spec, rec))
        except FerryError as exc:
            log.warning("rollback of %s incomplete: %s", migration_id, exc)
            reason = f"{reason}; rollback incomplete: {exc.problem}"
            await self.store.update_vm(rec.vm, host=rec.source, state=VmState.UNKNOWN)
        await self._enter(rec, Phase.FAILED, reason=reason)

    async def _lost_in_postcopy(self, rec: MigrationRecord, reason: str) -> None:
        """Post-copy failed: the guest's memory is split between two hosts, so neither
        copy may run. Stop the target, leave the source paused, report the loss."""
        with contextlib.suppress(FerryError):
            await (await self._clients(rec))[1].stop_vm(rec.vm, force=True)
        await self.store.update_vm(rec.vm, state=VmState.CRASHED)
        await self._enter(rec, Phase.FAILED, reason=(
            f"{reason}; post-copy had started, so the VM could not be rolled back and is "
            f"lost (its source copy is kept paused on {rec.source} for inspection)"))

    async def _target_runs(self, rec: MigrationRecord) -> bool:
        try:
            dest = await (await self._clients(rec))[1].vm(rec.vm)
        except FerryError:
            return False
        return dest.state is AgentVmState.RUNNING


class _Plan(NamedTuple):
    refusals: list[Refusal]
    target_disks: tuple[DiskSpec, ...]
    moved_disks: tuple[DiskSpec, ...]


def merge_options(base: StreamOptions, overrides: Mapping[str, object] | None
                  ) -> StreamOptions:
    try:
        return StreamOptions.model_validate(base.model_dump() | dict(overrides or {}))
    except ValidationError as exc:
        raise InvalidInput(describe_validation(exc.errors()),
                           "see `ferry policy show` for the fields and their ranges") from None


def _describe(exc: BaseException) -> str:
    return exc.problem if isinstance(exc, FerryError) else repr(exc)


async def _cancel_quietly(source: AgentClient, vm: str) -> None:
    """Cancel the outgoing stream if one runs and wait (bounded) until it stopped."""
    with contextlib.suppress(FerryError):
        progress = await source.progress(vm)
        if progress.status.finished or progress.status is SourceStatus.NONE:
            return
        await source.cancel_migration(vm)
        for _ in range(100):
            progress = await source.progress(vm, wait_s=0.1)
            if progress.status.finished:
                return
