"""The forward steps of a migration, one per phase (STEPS). Each persists the phase it
moves to before acting on it, and each is idempotent from its start, so a restarted
control plane can run the step of the phase it finds again (the RESUME table).

Integrity rule: the destination starts paused (-S) and runs only after the store has
recorded the VM on it; the source is torn down only after the destination runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from ipaddress import ip_address

from ferry.agent.models import AgentVmState, Tune, VmInfo
from ferry.control import eventlog
from ferry.control import migration_memory as memory
from ferry.control import migration_storage as storage
from ferry.control.migration_job import Job, RollBack, SwitchReads, log
from ferry.domain.convergence import (
    Action,
    ActionKind,
    ConvergenceState,
    decide,
    initial_downtime_ms,
)
from ferry.domain.errors import FerryError, HostUnavailable, NotFound
from ferry.domain.inventory import VmState
from ferry.domain.migration import (
    Iteration,
    Phase,
    RollbackKind,
    SilentSource,
    SourceStatus,
    TargetStream,
    record_iteration,
    when_source_silent,
)
from ferry.domain.records import ActionRecord, MigrationRecord, VmRecord
from ferry.domain.streams import unsent_hint
from ferry.store.store import VmChange

POLL_WAIT_S = 0.5  # the agent answers earlier when QEMU emits a migration event
CONFIRM_TIMEOUT_S = 30.0
# How long RESUMING_TARGET waits for a silent destination agent: past a frozen host's or
# a flapping link's outage, short enough that a dead destination is reported (the VM
# `unknown`) within two minutes.
RESUME_WINDOW_S = 120.0
RETRY_S = 0.2
TARGET_CHECK_S = 5.0
# At switchover the destination agent answers once its stream is loaded (or after this).
LOADED_WAIT_S = 1.0
RECOVER_EVERY_S = 2.0  # how often a paused post-copy is tried to be reconnected
TARGET_SETTLE_S = 10.0  # a silent source: how long a loading destination is waited for

Step = Callable[[Job, MigrationRecord], Awaitable[MigrationRecord]]


async def begin(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """CHECKING passed (in the request) and the migration got its slot."""
    job.check_cancel()
    return await job.enter(rec, Phase.PREPARING_TARGET)


async def prepare_target(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """Start the paused destination (and, without shared storage, its empty disks)."""
    vm = await job.store.vm(rec.vm)
    disks = await storage.new_disks(job.source, rec) if rec.moved_disks else ()
    if disks:
        # Recorded before they exist: a rollback deletes these and nothing else.
        rec = await job.update(created_images=tuple(d.disk for d in disks))
    try:
        ready = await job.target.prepare_incoming(
            rec.id, storage.target_spec(vm.spec, rec.target_disks), rec.options, disks,
            tls_peer=rec.source if rec.encrypted else None,
            source_address=None if rec.encrypted else await _stream_source(job, rec))
    except HostUnavailable:
        raise  # unknown whether the agent created them: they stay recorded
    except FerryError:
        # The agent refused and removed whatever it had created itself (e.g. a path
        # that already existed, which is not ours to delete).
        await job.update(created_images=())
        raise
    job.check_cancel()
    if rec.moved_disks:
        rec = await job.update(dest_uri=ready.uri, nbd=ready.nbd)
        return await job.enter(rec, Phase.DISK_COPY)
    # Recorded with PRECOPY: a restart before that undoes PREPARING_TARGET anyway.
    return await _start_outgoing(job, rec, vm, ready.uri)


async def _stream_source(job: Job, rec: MigrationRecord) -> str | None:
    """A cleartext stream's source address: the destination admits only it (an
    encrypted stream's QEMU checks the source's certificate instead)."""
    host = await job.store.host(rec.source)
    address = host.facts.address if host.facts else None
    try:
        return str(ip_address(address)) if address else None
    except ValueError:
        log.warning("migration %s: source %s's address %r is not an IP address: its "
                    "cleartext stream's listeners admit anyone", rec.id, rec.source, address)
        return None


async def disk_copy(job: Job, rec: MigrationRecord) -> MigrationRecord:
    async def report(copied: int, total: int) -> None:
        await job.update(disk_copied_bytes=copied, disk_total_bytes=total)
    try:
        await storage.copy_disks(rec, job.source, report, job.cancelled.is_set)
    except storage.DiskCopyFailed as exc:
        raise RollBack(str(exc)) from None
    job.check_cancel()
    return await _start_outgoing(job, rec)


async def _start_outgoing(job: Job, rec: MigrationRecord, vm: VmRecord | None = None,
                          uri: str | None = None) -> MigrationRecord:
    """PRECOPY is entered only once the source accepted the stream: from then on its
    QEMU's migration status is about this migration. `vm` as the caller just read it,
    `uri` the destination's if not recorded yet."""
    uri = uri or rec.dest_uri
    assert uri is not None
    vm = vm or await job.store.vm(rec.vm)
    downtime = initial_downtime_ms(rec.options, vm.spec.memory_mib)
    await job.source.start_outgoing(rec.vm, rec.id, uri, rec.options, downtime,
                                    tls_peer=rec.target if rec.encrypted else None)
    return await job.enter(rec, Phase.PRECOPY, downtime_limit_ms=downtime, dest_uri=uri)


async def precopy(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """Watch the stream each pass and steer it until the source completes (SWITCHOVER),
    the policy chooses post-copy (POSTCOPY), or it must be given up (RollBack)."""
    began = rec.phase_times.get(Phase.PRECOPY.value, time.time())
    iterations: list[Iteration] = list(rec.iterations)
    best_remaining: int | None = None
    best_at = time.time()
    vm = await job.store.vm(rec.vm)
    check_memory = await memory.is_wanted(job, rec)
    while True:
        if job.cancelled.is_set():
            raise RollBack("cancelled by the user")
        dest_check = asyncio.ensure_future(job.target.vm(rec.vm, timeout_s=TARGET_CHECK_S))
        try:
            progress = await job.source.progress(rec.vm, wait_s=POLL_WAIT_S)
        except FerryError as exc:
            dest_check.cancel()
            if await _source_done(job, rec, exc):
                return await job.enter(rec, Phase.SWITCHOVER, remaining_bytes=0)
            raise
        except BaseException:
            dest_check.cancel()
            raise
        dest: VmInfo | Exception
        if progress.status is SourceStatus.COMPLETED:
            # The guest is paused everywhere now: every millisecond counts. The
            # destination is confirmed at SWITCHOVER; its answer here (slow while it
            # loads the last state) is not waited for.
            dest_check.cancel()
            dest = RollBack("not checked")
        else:
            try:
                dest = await dest_check
            except Exception as exc:
                dest = exc
        now = time.time()
        status = progress.status
        # The guest is paused everywhere once the source completed: SWITCHOVER's reads
        # go first, before anything is written.
        reads = _switch_reads(job, rec, check_memory) \
            if status is SourceStatus.COMPLETED else None
        try:
            it = record_iteration(iterations, progress, int((now - began) * 1000))
            if it is not None:
                iterations.append(it)
                await job.store.add_iteration(rec.id, it)
            if reads is not None:
                rec = await job.enter(rec, Phase.SWITCHOVER, downtime_ms=progress.downtime_ms,
                                      total_ms=progress.elapsed_ms, remaining_bytes=0,
                                      transferred_bytes=progress.transferred_bytes)
                job.switch_reads = reads
                return rec
        except BaseException:
            if reads is not None:
                reads.cancel()
            raise
        rec = await job.update(remaining_bytes=progress.remaining_bytes,
                               transferred_bytes=progress.transferred_bytes)
        if status is SourceStatus.POSTCOPY_ACTIVE or status.postcopy_fault:
            # The stream is in post-copy whatever led there: so is the migration.
            return await job.enter(rec, Phase.POSTCOPY, postcopy_started=True)
        if status in (SourceStatus.FAILED, SourceStatus.CANCELLED):
            raise RollBack(f"QEMU reported the migration {status}: "
                           f"{progress.error or 'the stream to the target broke'}"
                           + (unsent_hint(rec.encrypted, progress.transferred_bytes,
                                          rec.source, rec.target)
                              if status is SourceStatus.FAILED else ""))
        if status is SourceStatus.NONE:
            raise RollBack("the source QEMU reports no outgoing migration")
        if isinstance(dest, Exception):
            raise RollBack(f"lost the destination during pre-copy: {_describe(dest)}")
        if not dest.state.alive or dest.state is AgentVmState.CRASHED:
            raise RollBack(f"destination QEMU on {rec.target} is {dest.state}")
        if best_remaining is None or progress.remaining_bytes < best_remaining:
            best_remaining, best_at = progress.remaining_bytes, now
        raised = [a.at_ms for a in rec.actions if a.kind == ActionKind.RAISE_DOWNTIME.value]
        state = ConvergenceState(
            elapsed_s=now - began, since_progress_s=now - best_at,
            since_raise_s=now - began - max(raised) / 1000 if raised else None,
            memory_mib=vm.spec.memory_mib, iterations=tuple(iterations),
            progress=progress, postcopy=False,
            downtime_ms=rec.downtime_limit_ms or rec.options.initial_downtime_ms,
            throttle_pct=rec.throttle_pct,
            backlog_capped=any(a.kind == ActionKind.CAP_BACKLOG.value for a in rec.actions))
        action = decide(state, rec.options)
        if action.kind is ActionKind.THROTTLE and it is None:
            continue  # judge a throttle step only on a fresh pass's numbers
        rec = await _apply(job, rec, action, int((now - began) * 1000))
        if rec.phase is Phase.POSTCOPY:
            return rec


async def _source_done(job: Job, rec: MigrationRecord, failure: FerryError) -> bool:
    """The source's agent failed to answer: True if the destination proves the source
    sent the whole stream (domain when_source_silent), waiting a little (bounded) for a
    destination still loading its last bytes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TARGET_SETTLE_S
    while True:
        action = when_source_silent(await _target_stream(job, rec), rec.options)
        if action is SilentSource.SWITCH:
            log.warning("migration %s: the source does not answer (%s) but the destination "
                        "holds the whole stream: switching without it", rec.id,
                        failure.problem)
            return True
        if action is SilentSource.ROLL_BACK or loop.time() > deadline:
            return False
        await asyncio.sleep(RETRY_S)


async def _target_stream(job: Job, rec: MigrationRecord) -> TargetStream:
    try:
        dest = await job.target.vm(rec.vm, timeout_s=TARGET_CHECK_S)
    except NotFound:
        return TargetStream.BROKEN
    except FerryError:
        return TargetStream.SILENT
    if dest.migration_id != rec.id:
        return TargetStream.BROKEN  # not this migration's destination
    if dest.state is AgentVmState.INCOMING:
        return TargetStream.RECEIVING
    if dest.state is AgentVmState.PAUSED and dest.never_ran:
        return TargetStream.COMPLETE
    return TargetStream.BROKEN


async def _apply(job: Job, rec: MigrationRecord, action: Action, at_ms: int
                 ) -> MigrationRecord:
    """Pull the lever the policy chose and record it in the migration's history."""
    if action.kind is ActionKind.CONTINUE:
        return rec
    if action.kind is ActionKind.ABORT:
        raise RollBack(action.reason)
    log.info("migration %s: %s %s (%s)", rec.id, action.kind, action.value, action.reason)
    entry = ActionRecord(at_ms=at_ms, kind=action.kind.value, value=action.value,
                         reason=action.reason)
    if action.kind is ActionKind.POSTCOPY:
        # Persisted before QEMU is told (the POSTCOPY step does that): from here on the
        # source is never resumed. A cancel stored first wins instead.
        rec = await job.enter(rec, Phase.POSTCOPY, unless_cancelled=True,
                              postcopy_started=True, actions=(*rec.actions, entry))
        await eventlog.lever_used(job.store, rec, entry)
        return rec
    changes: dict[str, object] = {}
    tune = Tune()
    if action.kind is ActionKind.RAISE_DOWNTIME:
        changes["downtime_limit_ms"] = action.value
        tune = Tune(downtime_ms=action.value)
    elif action.kind is ActionKind.THROTTLE:
        changes["throttle_pct"] = action.value
        tune = Tune(throttle_pct=action.value)
    elif action.kind is ActionKind.CAP_BACKLOG:
        tune = Tune(backlog_margin_ms=action.value)
    rec = await job.change(lambda cur: {"actions": (*cur.actions, entry), **changes})
    await eventlog.lever_used(job.store, rec, entry)
    try:
        await job.source.tune(rec.vm, tune)
    except FerryError as exc:
        if action.kind is not ActionKind.CAP_BACKLOG:
            raise
        # Best effort: the stream goes on uncapped (a source agent that stopped
        # answering is the next progress read's to judge).
        log.warning("migration %s: stream backlog not capped: %s", rec.id, exc.problem)
    return rec


async def postcopy(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """Post-copy: never cancelled, never rolled back to the source. Make sure QEMU is in
    post-copy, record the switch and resume the destination as soon as it holds the
    device state, and watch the source until every page is over. A failing call (to
    either agent) or QEMU pausing post-copy on a broken link is waited out for the
    recovery window; only a QEMU that is gone or failed makes the VM lost."""
    window = rec.options.postcopy_recovery_window_s
    loop = asyncio.get_running_loop()
    trouble_since: float | None = None
    trouble = ""
    resumed = False
    recover_at = 0.0
    while True:
        if trouble_since is not None and loop.time() - trouble_since > window:
            raise RollBack(f"post-copy could not go on for {window} s ({trouble})",
                           RollbackKind.UNRESOLVED)
        try:
            progress = await job.source.progress(rec.vm, wait_s=POLL_WAIT_S)
        except NotFound:
            if rec.finishing:  # we stopped it, after every page was over
                return await finish(job, rec)
            raise RollBack("the source QEMU is gone during post-copy",
                           RollbackKind.LOST) from None
        except FerryError as exc:
            if await _source_exited(job, rec):
                if rec.finishing:
                    return await finish(job, rec)
                raise RollBack(f"the source QEMU exited during post-copy ({exc.problem}); "
                               "the pages only it held are gone", RollbackKind.LOST
                               ) from None
            trouble_since, trouble = trouble_since or loop.time(), exc.problem
            await asyncio.sleep(RETRY_S)
            continue
        status = progress.status
        if status in (SourceStatus.FAILED, SourceStatus.CANCELLED, SourceStatus.NONE):
            why = f"QEMU reported the post-copy migration {status}: " \
                f"{progress.error or 'no reason given'}"
            await _revert_if_never_ran(job, rec, why)
            raise RollBack(why, RollbackKind.LOST)
        if status in (SourceStatus.ACTIVE, SourceStatus.SETUP):
            # Not switched yet (persisted POSTCOPY, then the request was lost): ask again.
            try:
                await job.source.tune(rec.vm, Tune(postcopy=True))
                trouble_since = None
            except FerryError as exc:
                trouble_since = trouble_since or loop.time()
                trouble = f"QEMU did not start post-copy: {exc.problem}"
                await asyncio.sleep(RETRY_S)
            continue
        fault = None
        if status.postcopy_fault or status is SourceStatus.UNKNOWN:
            fault = f"QEMU reports {progress.qemu_status or status}"
            if trouble_since is None:
                log.warning("migration %s: post-copy %s; waiting up to %d s", rec.id,
                            fault, window)
        if status is SourceStatus.POSTCOPY_PAUSED and loop.time() >= recover_at:
            recover_at = loop.time() + RECOVER_EVERY_S
            rec = await _recover(job, rec)
        if not resumed:
            rec, resumed = await _switch_in_postcopy(job, rec)
        if status is SourceStatus.COMPLETED and resumed:
            rec = await job.update(downtime_ms=progress.downtime_ms,
                                   total_ms=progress.elapsed_ms, remaining_bytes=0,
                                   transferred_bytes=progress.transferred_bytes)
            return await finish(job, rec)
        if not resumed:
            # The guest runs nowhere until the destination is resumed: that is trouble.
            fault = fault or "the destination is not resumed yet"
            await asyncio.sleep(RETRY_S)
        if fault is None:
            trouble_since = None
        else:
            trouble_since, trouble = trouble_since or loop.time(), fault


async def _source_exited(job: Job, rec: MigrationRecord) -> bool:
    """The source's agent answers that its QEMU process is gone (not merely that the
    agent, or the link to it, fails): nothing can recover a post-copy then."""
    try:
        info = await job.source.vm(rec.vm, timeout_s=TARGET_CHECK_S)
    except NotFound:
        return True
    except FerryError:
        return False
    return info.state is AgentVmState.EXITED


async def _recover(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """QEMU paused post-copy on a broken link: reconnect it (the destination listens
    anew with migrate-recover, the source resumes with migrate resume=true). A failing
    step only means "not yet" (e.g. the link is still down): tried again later."""
    try:
        ready = await job.target.recover_incoming(rec.vm)
        await job.source.resume_outgoing(rec.vm, rec.id, ready.uri)
    except FerryError as exc:
        log.info("migration %s: post-copy not recovered yet: %s", rec.id, exc.problem)
        return rec
    log.warning("migration %s: reconnecting the paused post-copy via %s", rec.id, ready.uri)
    return await job.change(lambda cur: {"postcopy_recoveries": cur.postcopy_recoveries + 1})


async def _switch_in_postcopy(job: Job, rec: MigrationRecord) -> tuple[MigrationRecord, bool]:
    """Once the (paused, -S) destination holds the device state: record the VM there,
    then resume it at once (every ms here is downtime). (record, resumed); a failing
    call only means "not yet"."""
    try:
        dest = await job.target.vm(rec.vm, timeout_s=TARGET_CHECK_S)
    except NotFound:
        raise RollBack("the destination QEMU is gone during post-copy",
                       RollbackKind.LOST) from None
    except FerryError:
        return rec, False
    if dest.state in (AgentVmState.EXITED, AgentVmState.CRASHED):
        if dest.never_ran:
            # The source holds the whole guest, but QEMU 7.2 cannot end a post-copy its
            # source paused on the broken stream (migrate_cancel leaves its migration
            # thread waiting for a recovery for ever), so it cannot run again. Only a
            # post-copy QEMU itself ended (failed) is reverted: postcopy() above.
            raise RollBack(f"the destination QEMU on {rec.target} exited during post-copy "
                           f"before it ran the guest (exit code {dest.exit_code}); the "
                           f"source on {rec.source} holds the whole guest but QEMU cannot "
                           "end its paused post-copy to run it again", RollbackKind.LOST)
        raise RollBack(f"the destination {dest.state} during post-copy", RollbackKind.LOST)
    if dest.state is AgentVmState.INCOMING:
        return rec, False  # still loading the device state
    if not rec.switched:
        vm = await job.store.vm(rec.vm)
        rec = await job.change(lambda _: {"switched": True}, vm=VmChange(
            name=rec.vm, host=rec.target, state=VmState.RUNNING,
            spec=storage.target_spec(vm.spec, rec.target_disks)))
    if dest.state is AgentVmState.RUNNING:
        return rec, True
    try:
        info = await job.target.resume_vm(rec.vm)
    except FerryError:
        return rec, False
    return rec, info.state is AgentVmState.RUNNING


def _switch_reads(job: Job, rec: MigrationRecord, check_memory: bool) -> SwitchReads:
    """The guest is paused on both hosts from here on: the reads SWITCHOVER needs go
    side by side, the RAM digests (the longest) with the confirmation of the
    destination, started before SWITCHOVER is stored."""
    target = asyncio.create_task(_await_paused_target(job, rec))
    target.add_done_callback(lambda t: t.cancelled() or t.exception())
    return SwitchReads(target=target,
                       digests=memory.whole_digests(job, rec) if check_memory else None,
                       began=time.monotonic())


async def switchover(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """The source has sent everything: confirm the paused destination holds it, then
    record the VM there (RESUMING_TARGET, in the same transaction). On TCG the paused
    copy's RAM is compared with the source's first, and repaired (migration_memory)."""
    reads, job.switch_reads = job.switch_reads, None
    if reads is None:  # resumed here after a restart
        reads = _switch_reads(job, rec, await memory.is_wanted(job, rec))
    try:
        dest, vm = await asyncio.gather(reads.target, job.store.vm(rec.vm))
    except BaseException:
        reads.cancel()
        raise
    check = None
    if reads.digests is not None:
        if dest.state is AgentVmState.PAUSED and dest.never_ran:
            check = await memory.verify_and_repair(job, rec, reads.digests, reads.began)
        else:
            reads.digests.cancel()
    return await job.enter(rec, Phase.RESUMING_TARGET, switched=True, vm=VmChange(
        name=rec.vm, host=rec.target, state=VmState.RUNNING,
        spec=storage.target_spec(vm.spec, rec.target_disks)),
        memory_check=check or rec.memory_check)


async def _await_paused_target(job: Job, rec: MigrationRecord) -> VmInfo:
    """The destination once it holds the whole state, paused (or already running):
    RollBack if it is gone or stays away; it never ran the guest, so the source may."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONFIRM_TIMEOUT_S
    while True:
        try:
            dest = await job.target.vm(rec.vm, timeout_s=TARGET_CHECK_S,
                                       loaded_wait_s=LOADED_WAIT_S)
        except NotFound:
            raise RollBack("the destination QEMU vanished at switchover") from None
        except FerryError as exc:
            if loop.time() > deadline:
                raise RollBack(f"cannot reach the destination at switchover: {exc.problem}"
                               ) from None
            await asyncio.sleep(RETRY_S)
            continue
        if dest.state in (AgentVmState.PAUSED, AgentVmState.RUNNING):
            return dest
        if dest.state in (AgentVmState.EXITED, AgentVmState.CRASHED):
            raise RollBack(f"the destination {dest.state} at switchover")
        if loop.time() > deadline:
            raise RollBack(f"the destination stayed {dest.state} at switchover")
        await asyncio.sleep(0.02)


async def resume_target(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """The store has the VM on the target: run it there (`cont` is idempotent), then
    tear down the source. The source is never resumed from here on (but by REVERT).
    A destination agent that does not answer (frozen, its link down) is waited for up
    to RESUME_WINDOW_S: nothing better can happen meanwhile (the source must not run
    again), and its pending `cont` may run the guest when it is back. One that answers
    but cannot run the guest is given CONFIRM_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = max(RESUME_WINDOW_S, CONFIRM_TIMEOUT_S)
    warned = False
    while True:
        silent = False
        try:
            info = await job.target.resume_vm(rec.vm)
            if info.state is AgentVmState.RUNNING:
                return await finish(job, rec)
            problem = f"it is {info.state} after `cont`"
        except NotFound:
            raise RollBack("the destination QEMU vanished after the switch was recorded",
                           RollbackKind.UNRESOLVED) from None
        except HostUnavailable as exc:
            problem, silent = exc.problem, True
        except FerryError as exc:
            problem = exc.problem
        if not silent:  # a silent agent cannot say how its QEMU ended either
            await _settle_dead_target(job, rec, problem)
        waited = loop.time() - start
        if waited > (window if silent else CONFIRM_TIMEOUT_S):
            raise RollBack(f"cannot resume the destination: {problem}",
                           RollbackKind.UNRESOLVED)
        if silent and not warned:
            warned = True
            log.warning("migration %s: the destination does not answer (%s); waiting up "
                        "to %d s for it (the source stays paused)", rec.id, problem, window)
        await asyncio.sleep(RETRY_S)


async def _revert_if_never_ran(job: Job, rec: MigrationRecord, problem: str) -> None:
    """RollBack (REVERT) if the destination's agent says its QEMU exited without ever
    being sent `cont`: it ran nothing, so the paused source still holds the only and
    current copy of the guest. Anything less certain returns (the caller retries)."""
    await _settle_dead_target(job, rec, problem, lost_if_ran=False)


async def _settle_dead_target(job: Job, rec: MigrationRecord, problem: str,
                              lost_if_ran: bool = True) -> None:
    """After a failed `cont`: REVERT as above; LOST (if `lost_if_ran`) when its agent
    reports the QEMU exited or crashed after it was sent `cont` (or cannot tell, after
    an agent restart): the guest may have run there, so the paused source holds an
    older state that must not run again, and the current one is gone. An agent that
    does not answer returns (the caller retries, then reports the VM unknown)."""
    try:
        dest = await job.target.vm(rec.vm, timeout_s=TARGET_CHECK_S)
    except FerryError:
        return
    if dest.state is AgentVmState.EXITED and dest.never_ran:
        raise RollBack(f"the destination QEMU on {rec.target} exited before it ran the "
                       f"guest (exit code {dest.exit_code}; {problem}); the VM goes back "
                       f"to {rec.source}", RollbackKind.REVERT)
    if lost_if_ran and dest.state in (AgentVmState.EXITED, AgentVmState.CRASHED):
        raise RollBack(f"the destination QEMU on {rec.target} {dest.state} after it was "
                       f"told to run the guest (exit code {dest.exit_code}; {problem}): "
                       "the guest's current memory is gone", RollbackKind.LOST)


async def finish(job: Job, rec: MigrationRecord) -> MigrationRecord:
    """The destination runs: tear the source down (and, without shared storage, end
    the mirrors and delete the copied disks' old images)."""
    # Recorded first: a restart in post-copy must never take a source stopped by us for
    # one lost (RESUMING_TARGET's restart only runs the destination and stops the source).
    if rec.phase is Phase.POSTCOPY:
        rec = await job.update(finishing=True)
    if rec.moved_disks:
        problems = await storage.finish(rec, job.source, job.target)
        return await job.enter(rec, Phase.COMPLETED, reason="; ".join(problems) or None)
    try:
        await job.source.stop_vm(rec.vm, force=True)
    except NotFound:
        pass
    except FerryError as exc:
        # The source is paused after switchover; the leftover reaper stops it later.
        log.warning("migration %s: source teardown failed: %s", rec.id, exc.problem)
    return await job.enter(rec, Phase.COMPLETED)


def _describe(exc: BaseException) -> str:
    return exc.problem if isinstance(exc, FerryError) else repr(exc)


STEPS: dict[Phase, Step] = {
    Phase.CHECKING: begin,
    Phase.PREPARING_TARGET: prepare_target,
    Phase.DISK_COPY: disk_copy,
    Phase.PRECOPY: precopy,
    Phase.POSTCOPY: postcopy,
    Phase.SWITCHOVER: switchover,
    Phase.RESUMING_TARGET: resume_target,
}
