"""Ending a migration that cannot go on: one handler per RollbackKind (ROLLBACKS).

The kind is recorded with ROLLING_BACK, so a restarted control plane finishes the same
rollback. A rollback deletes only what its migration created, never resumes a source
once the switch is recorded, and says plainly when the VM's place is not known.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from ferry.agent.client import AgentClient
from ferry.agent.models import AgentVmState
from ferry.control import migration_storage as storage
from ferry.control.migration_job import Job, log
from ferry.domain.errors import FerryError, NotFound
from ferry.domain.inventory import VmState
from ferry.domain.migration import Phase, RollbackKind, rollback_kind
from ferry.domain.records import MigrationRecord

CANCEL_TIMEOUT_S = 30.0  # the longest a rollback waits for QEMU to stop the stream

Handler = Callable[[Job, MigrationRecord, str], Awaitable[str]]


async def roll_back(job: Job, reason: str, kind: RollbackKind | None) -> MigrationRecord:
    """End the migration through ROLLING_BACK → FAILED with the rollback its phase
    allows (or the one already recorded, after a restart)."""
    rec = await job.store.migration(job.id)
    if rec.phase.terminal:
        return rec
    if rec.phase is Phase.ROLLING_BACK:
        kind = rec.rollback or _legacy_kind(rec)
        reason = rec.reason or reason
    else:
        kind = rollback_kind(rec.phase, kind, rec.switched)
        rec = await job.enter(rec, Phase.ROLLING_BACK, reason=reason, rollback=kind)
    reason = await ROLLBACKS[kind](job, rec, reason)
    return await job.enter(rec, Phase.FAILED, reason=reason)


def _legacy_kind(rec: MigrationRecord) -> RollbackKind:
    """A ROLLING_BACK stored before kinds were recorded."""
    return RollbackKind.UNRESOLVED if rec.postcopy_started else RollbackKind.UNDO


async def abandon(job: Job, rec: MigrationRecord, reason: str) -> str:
    """Nothing was touched: the VM runs where it did."""
    with contextlib.suppress(NotFound):
        vm = await job.store.vm(rec.vm)
        if vm.state is VmState.MIGRATING:
            await job.store.update_vm(rec.vm, state=VmState.RUNNING)
    return reason


async def undo(job: Job, rec: MigrationRecord, reason: str) -> str:
    """Before the switch (or REVERT: after it, the destination proven never to have
    run): stop the stream and the destination, delete the images this migration
    created, and let the source run. The destination started paused (-S) and never ran
    the guest, so the source resumes even if the destination cannot be reached (the
    leftover reaper stops it once it can)."""
    if rec.switched and rec.rollback is not RollbackKind.REVERT:
        # rollback_kind never picks UNDO once switched; a record from older code may.
        return await unresolved(job, rec, reason)
    notes = []
    try:
        if not rec.postcopy_started:  # a post-copy is ended by revert_outgoing below
            await cancel_quietly(job.source, rec.vm)
        try:
            await job.target.stop_vm(rec.vm, force=True)
            dest_gone = True
        except NotFound:
            dest_gone = True
        except FerryError as exc:
            dest_gone = False
            notes.append(f"the destination on {rec.target} could not be stopped yet "
                         f"({exc.problem}); it is stopped once its agent is back")
        # Images in use by a destination not stopped cannot go yet: kept for later.
        left = (await storage.undo(rec, job.source, job.target) if dest_gone
                else rec.created_images)
        if left:
            rec = await job.update(images_left=left)
            notes.append(f"images it created on {rec.target} are deleted once its agent "
                         "answers again: " + ", ".join(f"{d.datastore}:{d.path}" for d in left))
        try:
            src = await job.source.vm(rec.vm)
        except NotFound:
            src = None
        if src is None or not src.state.alive:
            # Its agent reports the QEMU exited (or knows none): the only copy is gone.
            await _set_vm(job, rec, rec.source, VmState.CRASHED)
            notes.append(f"the source QEMU on {rec.source} is gone: the VM is not running")
            return "; ".join([reason, *notes])
        if rec.postcopy_started:
            # QEMU may have restarted the guest itself with its disks still handed
            # over: the agent ends the post-copy and `cont`s right behind it.
            await job.source.revert_outgoing(rec.vm)
        elif src.state in (AgentVmState.MIGRATED, AgentVmState.PAUSED):
            await job.source.resume_vm(rec.vm)
        vm = await job.store.vm(rec.vm)
        await job.store.update_vm(rec.vm, host=rec.source, state=VmState.RUNNING,
                                  spec=storage.source_spec(vm.spec, rec))
    except FerryError as exc:
        log.warning("rollback of %s incomplete: %s", rec.id, exc)
        await _set_vm(job, rec, rec.source, VmState.UNKNOWN)
        notes.append(f"rollback incomplete: {exc.problem}")
    return "; ".join([reason, *notes])


async def unresolved(job: Job, rec: MigrationRecord, reason: str) -> str:
    """Where the guest runs cannot be confirmed: resume nothing, stop nothing, and say
    so; the VM is `unknown` until the agents' reports settle it."""
    await _set_vm(job, rec, None, VmState.UNKNOWN)
    return (f"{reason}; where the VM runs could not be confirmed, so nothing was resumed "
            f"and it is marked unknown: check hosts {rec.source} and {rec.target}")


async def lost(job: Job, rec: MigrationRecord, reason: str) -> str:
    """No copy may run: post-copy cannot finish (the guest's memory is split between
    the hosts; the source is kept paused for inspection), or the destination died after
    it was told to run the guest (the paused source holds an older state and is stopped
    as a finished migration's would be; the VM stays on the target, whose disks have
    its last writes)."""
    with contextlib.suppress(FerryError):
        await job.target.stop_vm(rec.vm, force=True)
    if rec.postcopy_started:
        # Placed on the source, so that its paused copy is kept (not reaped as a leftover).
        await _set_vm(job, rec, rec.source, VmState.CRASHED)
        return (f"{reason}; post-copy had started, so the VM could not be rolled back and "
                f"is lost (its source copy, if any, is kept paused on {rec.source} for "
                "inspection)")
    # If the source's agent does not answer, the leftover reaper stops the stale copy.
    with contextlib.suppress(FerryError):
        await job.source.stop_vm(rec.vm, force=True)
    await _set_vm(job, rec, rec.target, VmState.CRASHED)
    return (f"{reason}; the switch was recorded and the destination was told to run the "
            f"guest, so the older paused copy on {rec.source} must not run again: the VM "
            f"is lost and recorded crashed on {rec.target}, where its disks were last "
            f"written (`ferry vm start {rec.vm}` boots it again)")


async def _set_vm(job: Job, rec: MigrationRecord, host: str | None, state: VmState) -> None:
    with contextlib.suppress(NotFound):  # the VM's record may be gone meanwhile
        await job.store.update_vm(rec.vm, host=host, state=state)


async def cancel_quietly(source: AgentClient, vm: str) -> None:
    """Cancel the outgoing stream if one runs and wait until it stopped, for at most
    CANCEL_TIMEOUT_S (the rollback goes on regardless; QEMU ends it on its own)."""
    with contextlib.suppress(FerryError, TimeoutError):
        async with asyncio.timeout(CANCEL_TIMEOUT_S):
            progress = await source.progress(vm)
            if not progress.status.in_progress:
                return
            await source.cancel_migration(vm)
            while True:  # the agent answers on QEMU's next migration event
                if not (await source.progress(vm, wait_s=0.5)).status.in_progress:
                    return


ROLLBACKS: dict[RollbackKind, Handler] = {
    RollbackKind.ABANDON: abandon,
    RollbackKind.UNDO: undo,
    RollbackKind.UNRESOLVED: unresolved,
    RollbackKind.LOST: lost,
    # The same steps as UNDO: the destination never ran, so it is as if never switched.
    RollbackKind.REVERT: undo,
}
