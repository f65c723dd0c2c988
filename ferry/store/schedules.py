"""The store's part for scheduled tasks: the tasks, and their run history where each
run is claimed (task, scheduled time) under a unique constraint before it acts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.errors import NotFound
from ferry.domain.schedules import RunOutcome, Schedule, ScheduleRun
from ferry.store.tables import ScheduleRow, ScheduleRunRow


def _run(row: ScheduleRunRow) -> ScheduleRun:
    return ScheduleRun.model_validate_json(row.run_json).model_copy(update={"id": row.id})


class ScheduleStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    # --- tasks ---------------------------------------------------------------------
    async def add(self, schedule: Schedule) -> Schedule:
        async with self._session.begin() as s:
            s.add(ScheduleRow(id=schedule.id, schedule_json=schedule.model_dump_json(),
                              created_at=schedule.created_at))
        return schedule

    async def all(self) -> list[Schedule]:
        async with self._session() as s:
            rows = (await s.scalars(select(ScheduleRow).order_by(ScheduleRow.created_at))
                    ).all()
            return [Schedule.model_validate_json(r.schedule_json) for r in rows]

    async def get(self, schedule_id: str) -> Schedule:
        async with self._session() as s:
            row = await s.get(ScheduleRow, schedule_id)
            if row is None:
                raise NotFound(f"there is no schedule {schedule_id!r}",
                               "see `ferry schedule list`")
            return Schedule.model_validate_json(row.schedule_json)

    async def remove(self, schedule_id: str) -> Schedule:
        """The task and its history go; a run in progress finishes its action (its
        outcome is then written nowhere: the task is gone)."""
        async with self._session.begin() as s:
            row = await s.get(ScheduleRow, schedule_id)
            if row is None:
                raise NotFound(f"there is no schedule {schedule_id!r}",
                               "see `ferry schedule list`")
            schedule = Schedule.model_validate_json(row.schedule_json)
            await s.delete(row)
            await s.execute(delete(ScheduleRunRow).where(
                ScheduleRunRow.schedule_id == schedule_id))
            return schedule

    # --- runs ----------------------------------------------------------------------
    async def claim(self, run: ScheduleRun) -> ScheduleRun | None:
        """Insert the run; None when its (task, scheduled time) is already recorded (by
        another loop, or before a restart), the task is gone, or a later time is (a loop
        that decided from an older history: that time was run or reported already, as
        part of the later record's range): the caller must then not act. The unique
        constraint is the guarantee; the later-time check keeps a slow loop from
        reporting a time again."""
        try:
            async with self._session.begin() as s:
                # Locked: claims of one task are judged one at a time on any backend.
                if await s.get(ScheduleRow, run.schedule_id, with_for_update=True) is None:
                    return None  # removed since the loop read it: nothing to run
                latest = await s.scalar(select(func.max(ScheduleRunRow.scheduled_at)).where(
                    ScheduleRunRow.schedule_id == run.schedule_id))
                if latest is not None and latest >= run.scheduled_at:
                    return None
                row = ScheduleRunRow(schedule_id=run.schedule_id,
                                     scheduled_at=run.scheduled_at,
                                     run_json=run.model_dump_json(),
                                     outcome=run.outcome.value)
                s.add(row)
                await s.flush()
                run_id = row.id
        except IntegrityError:
            return None
        return run.model_copy(update={"id": run_id})

    async def update_run(self, run_id: int, **changes: Any) -> ScheduleRun | None:
        """Set fields of a run; None when it is gone (its task was removed)."""
        async with self._session.begin() as s:
            row = await s.get(ScheduleRunRow, run_id, with_for_update=True)
            if row is None:
                return None
            run = ScheduleRun.model_validate(_run(row).model_dump() | changes)
            row.run_json = run.model_dump_json()
            row.outcome = run.outcome.value
            return run

    async def runs(self, schedule_id: str, limit: int = 100) -> list[ScheduleRun]:
        """The task's runs, the latest scheduled first."""
        async with self._session() as s:
            rows = (await s.scalars(
                select(ScheduleRunRow).where(ScheduleRunRow.schedule_id == schedule_id)
                .order_by(ScheduleRunRow.scheduled_at.desc()).limit(limit))).all()
            return [_run(r) for r in rows]

    async def last_run(self, schedule_id: str) -> ScheduleRun | None:
        runs = await self.runs(schedule_id, limit=1)
        return runs[0] if runs else None

    async def unfinished(self) -> list[ScheduleRun]:
        async with self._session() as s:
            rows = (await s.scalars(select(ScheduleRunRow).where(
                ScheduleRunRow.outcome == RunOutcome.RUNNING.value))).all()
            return [_run(r) for r in rows]

    async def missed_counts(self) -> dict[str, int]:
        """Per task: how many of its recorded runs were missed (rows, not due times)."""
        async with self._session() as s:
            rows = (await s.execute(
                select(ScheduleRunRow.schedule_id, func.count())
                .where(ScheduleRunRow.outcome == RunOutcome.MISSED.value)
                .group_by(ScheduleRunRow.schedule_id))).all()
            return {task: int(count) for task, count in rows}
