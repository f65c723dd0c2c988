"""The store's part for the event log: append an event, read a page of it, count by
kind, and wake whoever follows the log (the SSE stream) when one is added."""

from __future__ import annotations

import asyncio
import contextlib
import time

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.audit import EventRecord, Outcome
from ferry.domain.events import EventKind, EventQuery
from ferry.store.engine import order_event_writers
from ferry.store.tables import EventRow


def _record(row: EventRow) -> EventRecord:
    return EventRecord(id=row.id, at=row.at, kind=EventKind(row.kind), actor=row.actor,
                       action=row.action, object=row.object, outcome=Outcome(row.outcome),
                       detail=row.detail, vm=row.vm)


class EventStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session
        # In-process wake-up for followers; they also re-read on a timeout, so events
        # written by another replica are seen too, only later.
        self._added = asyncio.Event()

    async def add(self, kind: EventKind, actor: str, action: str, obj: str,
                  outcome: Outcome = Outcome.OK, detail: str = "",
                  vm: str | None = None) -> EventRecord:
        # Bounded to the columns' sizes: an event must never fail for a long message.
        async with self._session.begin() as s:
            await order_event_writers(s)
            row = EventRow(at=time.time(), kind=kind.value, actor=actor[:96],
                           action=action[:128], object=obj[:256], outcome=outcome.value,
                           detail=detail[:2000], vm=vm[:64] if vm else None)
            s.add(row)
            await s.flush()
            rec = _record(row)
        self._added.set()
        self._added = asyncio.Event()
        return rec

    async def page(self, query: EventQuery) -> list[EventRecord]:
        stmt = select(EventRow).limit(query.limit)
        if query.ascending:
            stmt = stmt.where(EventRow.id > (query.after or 0)).order_by(EventRow.id)
        else:
            stmt = stmt.order_by(EventRow.id.desc())
        if query.before is not None:
            stmt = stmt.where(EventRow.id < query.before)
        if query.since is not None:
            stmt = stmt.where(EventRow.at >= query.since)
        if query.vm is not None:
            stmt = stmt.where(EventRow.vm == query.vm)
        async with self._session() as s:
            return [_record(r) for r in (await s.scalars(stmt)).all()]

    async def last_id(self) -> int:
        async with self._session() as s:
            return int(await s.scalar(select(func.max(EventRow.id))) or 0)

    async def counts(self) -> dict[EventKind, int]:
        """How many events of each kind the log holds (counters for /metrics)."""
        stmt = select(EventRow.kind, func.count()).group_by(EventRow.kind)
        async with self._session() as s:
            rows = (await s.execute(stmt)).all()
        known = {k.value for k in EventKind}
        return {EventKind(kind): int(n) for kind, n in rows if kind in known}

    async def wait(self, timeout_s: float) -> None:
        """Return when an event is added in this process, or after timeout_s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._added.wait(), timeout_s)
