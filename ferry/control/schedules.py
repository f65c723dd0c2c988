"""Scheduled tasks: the loop that runs them at their time, through the same services
the REST API uses (the orchestrator's start, the relocator's, DRS apply, maintenance).

Each run is claimed in the store (task, scheduled time; unique) before its action
starts, so neither a restart nor a second loop runs one scheduled time twice. What to
do about times that came due while the control plane was down is decided by
`decide_missed` (ferry/domain/schedules.py, pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ferry.control import eventlog
from ferry.control.drs import Applied, Drs
from ferry.control.events import ChangeBus
from ferry.control.migration import Orchestrator
from ferry.control.storage import Relocator
from ferry.domain.audit import Outcome
from ferry.domain.auth import PRIVILEGES, Principal
from ferry.domain.errors import FerryError, Forbidden, InvalidInput, NotFound
from ferry.domain.events import EventKind
from ferry.domain.migration import Phase
from ferry.domain.schedules import (
    PRIVILEGE_OF,
    DrsApplyAction,
    MaintenanceAction,
    MigrateAction,
    RelocateAction,
    RunOutcome,
    Schedule,
    ScheduleRun,
    ScheduleSpec,
    decide_missed,
    describe_missed,
    next_due,
    watermark,
)
from ferry.domain.specs import Frozen
from ferry.domain.storage import RelocationPhase
from ferry.store import Store

log = logging.getLogger("ferry.schedules")
J = TypeVar("J")
MAX_SLEEP_S = 60.0  # look again at least this often (a clock step, a missed wake-up)
FOLLOW_POLL_S = 1.0
ACT_GRACE_S = 10.0  # at shutdown, how long a run starting its action may take to start it


class ScheduleView(Frozen):
    """A task as listed: when it runs next, how its latest run went, how many missed."""

    schedule: Schedule
    next_run_at: int
    last_run: ScheduleRun | None = None
    missed_runs: int = 0


class Scheduler:
    def __init__(self, store: Store, migrations: Orchestrator, relocations: Relocator,
                 drs: Drs, bus: ChangeBus) -> None:
        self.store = store
        self.migrations = migrations
        self.relocations = relocations
        self.drs = drs
        self.bus = bus
        self._loop: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self._acting: set[asyncio.Task[ScheduleRun]] = set()
        self._wake = asyncio.Event()
        # Until the loop starts, every due time counts as come while down.
        self.up_since = float("inf")

    # --- tasks -------------------------------------------------------------------
    async def add(self, spec: ScheduleSpec, principal: Principal | None) -> Schedule:
        """Check the cron and that the action's objects exist; store nothing otherwise."""
        spec = spec.checked()
        if principal is not None:
            principal.require(PRIVILEGE_OF[spec.action.kind])
        await self._check_objects(spec)
        schedule = await self.store.schedules.add(Schedule(
            id=uuid.uuid4().hex[:12], spec=spec, created_at=time.time(),
            created_by=principal.token_id if principal else None,
            created_by_name=principal.name if principal else None))
        self._wake.set()  # its first due time may be sooner than the loop's next wake
        return schedule

    async def _check_objects(self, spec: ScheduleSpec) -> None:
        action = spec.action
        if isinstance(action, MigrateAction):
            await self.store.vm(action.vm)
            await self.store.host(action.target)  # NotFound names the known hosts
        elif isinstance(action, RelocateAction):
            disks = [d.name for d in (await self.store.vm(action.vm)).spec.disks]
            if action.disk is not None and action.disk not in disks:
                raise NotFound(f"VM {action.vm} has no disk {action.disk!r}",
                               f"its disks: {', '.join(disks) or 'none'}")
            if action.disk is None and len(disks) != 1:
                raise InvalidInput(f"VM {action.vm} has {len(disks)} disks: say which moves",
                                   f"add the disk after the datastore (its disks: "
                                   f"{', '.join(disks) or 'none'})")
            known = sorted({d.name for h in await self.store.hosts() if h.facts
                            for d in h.facts.datastores})
            if action.datastore not in known:
                raise NotFound(f"there is no datastore {action.datastore!r}",
                               f"known datastores: {', '.join(known) or 'none'}")
        elif isinstance(action, MaintenanceAction):
            await self.store.host(action.host)

    async def remove(self, schedule_id: str, principal: Principal | None) -> Schedule:
        if principal is not None and not any(principal.has(p)
                                             for p in PRIVILEGE_OF.values()):
            # Refused before the lookup: a token that may remove no task learns nothing
            # about which task ids exist (403, not 404).
            principal.require(min(PRIVILEGE_OF.values()))
        schedule = await self.store.schedules.get(schedule_id)
        if principal is not None:
            principal.require(PRIVILEGE_OF[schedule.spec.action.kind])
        return await self.store.schedules.remove(schedule_id)

    async def view(self, schedule: Schedule, missed: int | None = None) -> ScheduleView:
        if missed is None:
            missed = (await self.store.schedules.missed_counts()).get(schedule.id, 0)
        last = await self.store.schedules.last_run(schedule.id)
        # After now, and after the latest recorded run (a time is never run twice).
        after = max(time.time(), watermark(schedule, last))
        return ScheduleView(schedule=schedule, next_run_at=next_due(schedule.spec, after),
                            last_run=last, missed_runs=missed)

    async def views(self) -> list[ScheduleView]:
        missed = await self.store.schedules.missed_counts()
        return [await self.view(s, missed.get(s.id, 0))
                for s in await self.store.schedules.all()]

    # --- the loop ----------------------------------------------------------------
    async def start(self) -> None:
        self.up_since = time.time()
        await self._resume()
        self._loop = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._loop is not None:  # no new claims from here on
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        # A run starting its action gets to record what it started (else it would be
        # found `interrupted` at the next start, its job not followed); following a job
        # is cancelled: the next start follows it again.
        if self._acting:
            await asyncio.wait(self._acting, timeout=ACT_GRACE_S)
        tasks = list(self._runs)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                wake = await self.tick(time.time())
            except Exception:  # a failed pass is retried; the loop never stops
                log.exception("schedule pass failed")
                wake = time.time() + 5.0
            self._wake.clear()
            # A hair past the due time: the clock the sleep ends by and time.time() differ.
            delay = min(max(wake - time.time(), 0.0) + 0.05, MAX_SLEEP_S)
            # asyncio.timeout: 3.11's wait_for can swallow the cancel that stops this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def tick(self, now: float) -> float:
        """Deal with every task's due times up to `now`; return when to look next."""
        wake = now + MAX_SLEEP_S
        for schedule in await self.store.schedules.all():
            try:
                wake = min(wake, await self._tick_one(schedule, now))
            except Exception:  # one task's trouble does not hold up the others
                log.exception("schedule %s: pass failed", schedule.id)
        return wake

    async def _tick_one(self, schedule: Schedule, now: float) -> float:
        last = await self.store.schedules.last_run(schedule.id)
        decision = decide_missed(schedule, now, last, self.up_since)
        if decision.missed is not None:
            claimed = await self.store.schedules.claim(ScheduleRun(
                id=0, schedule_id=schedule.id, scheduled_at=decision.missed.last,
                outcome=RunOutcome.MISSED, ended_at=now,
                detail=describe_missed(decision.missed, schedule.spec),
                missed_count=decision.missed.count, first_missed_at=decision.missed.first))
            if claimed is not None:
                await record_schedule_event(self.store, schedule, claimed)
        if decision.run_at is not None:
            claimed = await self.store.schedules.claim(ScheduleRun(
                id=0, schedule_id=schedule.id, scheduled_at=decision.run_at,
                outcome=RunOutcome.RUNNING, started_at=time.time(), late=decision.late))
            if claimed is not None:  # None: another loop has it; act only on our claim
                self._spawn(self._execute(schedule, claimed))
        return decision.next_check

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _resume(self) -> None:
        """Runs left `running` by a control plane that stopped: follow the jobs they had
        started to their end; a run with none is recorded interrupted, never redone."""
        for run in await self.store.schedules.unfinished():
            try:
                schedule = await self.store.schedules.get(run.schedule_id)
            except NotFound:
                continue
            if run.migrations or run.relocations:
                self._spawn(self._finish(schedule, run))
            else:
                await record_schedule_event(self.store, schedule, run.model_copy(update={
                    "outcome": RunOutcome.INTERRUPTED, "ended_at": time.time(),
                    "detail": "the control plane stopped during this run before it "
                              "recorded a job: whether its action began is not known "
                              "here; not run again (see `ferry migration list`)"}))

    # --- one run -----------------------------------------------------------------
    async def _execute(self, schedule: Schedule, run: ScheduleRun) -> None:
        act = asyncio.create_task(self._authorized_act(schedule, run))
        self._acting.add(act)
        act.add_done_callback(self._acting.discard)
        try:
            run = await act
        except FerryError as exc:
            await record_schedule_event(self.store, schedule, run.model_copy(update={
                "outcome": RunOutcome.FAILED, "ended_at": time.time(),
                "detail": f"{exc.problem} ({exc.fix})" if exc.fix else exc.problem}))
            return
        except Exception as exc:
            log.exception("schedule %s: run %s failed", schedule.id, run.scheduled_at)
            await record_schedule_event(self.store, schedule, run.model_copy(update={
                "outcome": RunOutcome.FAILED, "ended_at": time.time(),
                "detail": f"internal error: {exc!r}"}))
            return
        await self._finish(schedule, run)

    async def _authorized_act(self, schedule: Schedule, run: ScheduleRun) -> ScheduleRun:
        await self._authorize(schedule)
        return await self._act(schedule, run)

    async def _authorize(self, schedule: Schedule) -> None:
        """The run acts with its creator's rights, as they are now."""
        if schedule.created_by is None:
            return
        token = next((t for t in await self.store.security.tokens()
                      if t.id == schedule.created_by), None)
        needed = PRIVILEGE_OF[schedule.spec.action.kind]
        if token is None or token.revoked or needed not in PRIVILEGES[token.role]:
            raise Forbidden(f"the token {schedule.created_by_name!r} that made this schedule "
                            f"is revoked or lacks {needed}",
                            "remove the schedule and add it again with a valid token")

    async def _act(self, schedule: Schedule, run: ScheduleRun) -> ScheduleRun:
        """Start the action; the run, with what it started, persisted."""
        action = schedule.spec.action
        cause = f"schedule {schedule.id} ({schedule.spec.cron})"
        changes: dict[str, object]
        if isinstance(action, MigrateAction):
            rec = await self.migrations.start(action.vm, action.target, cause=cause)
            changes = {"migrations": (rec.id,), "detail": f"migration {rec.id} started"}
        elif isinstance(action, RelocateAction):
            moved = await self.relocations.start(action.vm, action.datastore,
                                                 disk=action.disk)
            changes = {"relocations": (moved.id,), "detail": f"relocation {moved.id} started"}
        elif isinstance(action, MaintenanceAction):
            if action.on:
                result = await self.drs.enter_maintenance(action.host)
                assert result.evacuation is not None
                changes = _applied(result.evacuation, f"host {action.host} in maintenance")
            else:
                await self.drs.exit_maintenance(action.host)
                changes = {"detail": f"host {action.host} out of maintenance"}
        else:
            assert isinstance(action, DrsApplyAction)
            changes = _applied(await self.drs.apply(), "DRS plan applied")
        updated = await self.store.schedules.update_run(run.id, **changes)
        return updated or run.model_copy(update=changes)

    async def _finish(self, schedule: Schedule, run: ScheduleRun) -> None:
        """Follow the run's jobs to their end; record the outcome."""
        failures: list[str] = []
        for mid in run.migrations:
            rec = await self._until(mid, self.store.migration, lambda r: r.phase.terminal)
            if rec.phase is not Phase.COMPLETED:
                failures.append(f"migration {mid} of {rec.vm} failed: {rec.reason}")
        for rid in run.relocations:
            moved = await self._until(rid, self.store.relocation, lambda r: r.phase.terminal)
            if moved.phase is not RelocationPhase.COMPLETED:
                failures.append(f"relocation {rid} of {moved.vm} failed: {moved.reason}")
        jobs = len(run.migrations) + len(run.relocations)
        detail = "; ".join(failures) if failures else (
            f"{run.detail}; completed" if jobs else run.detail)
        await record_schedule_event(self.store, schedule, run.model_copy(update={
            "outcome": RunOutcome.FAILED if failures else RunOutcome.SUCCEEDED,
            "ended_at": time.time(), "detail": detail}))

    async def _until(self, key: str, fetch: Callable[[str], Awaitable[J]],
                        done: Callable[[J], bool]) -> J:
        while True:
            seen = self.bus.version(key)
            rec = await fetch(key)
            if done(rec):
                return rec
            await self.bus.wait(key, seen, timeout_s=FOLLOW_POLL_S)


def _applied(applied: Applied, what: str) -> dict[str, object]:
    started = tuple(r.migration_id for r in applied.results if r.migration_id)
    refused = [f"{r.move.vm}: {r.error}" for r in applied.results if r.error]
    deferred = sum(1 for r in applied.results if r.deferred)
    detail = f"{what}: {len(started)} migrations started"
    if deferred:
        detail += f", {deferred} to start once the moves they need end (not followed)"
    if refused:
        detail += f"; refused: {'; '.join(refused)}"
    return {"migrations": started, "detail": detail}


async def record_schedule_event(store: Store, schedule: Schedule, run: ScheduleRun
                                ) -> ScheduleRun | None:
    """The one place a run's result is recorded: its row in the run history, and the
    log. (The cluster's event log hooks in here.)"""
    saved = await store.schedules.update_run(
        run.id, outcome=run.outcome, started_at=run.started_at, ended_at=run.ended_at,
        detail=run.detail, migrations=run.migrations, relocations=run.relocations)
    log.info("schedule %s (%s) run due %d: %s %s", schedule.id,
             schedule.spec.action.describe(), run.scheduled_at, run.outcome, run.detail)
    if run.outcome is not RunOutcome.RUNNING:
        outcome = {RunOutcome.SUCCEEDED: Outcome.OK, RunOutcome.MISSED: Outcome.REFUSED
                   }.get(run.outcome, Outcome.FAILED)
        await eventlog.record(
            store, EventKind.SCHEDULE_RUN, f"{run.outcome.value}: "
            f"{schedule.spec.action.describe()}", f"schedule {schedule.id}",
            run.detail or "", vm=getattr(schedule.spec.action, "vm", None), outcome=outcome,
            actor=f"schedule {schedule.id}")
    return saved
