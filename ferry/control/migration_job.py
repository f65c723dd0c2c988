"""What the steps and rollbacks of one running migration share: its record's store and
change bus, its two agents, its cancel flag; and the limits on concurrent migrations."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ferry.agent.client import AgentClient
from ferry.agent.models import VmInfo
from ferry.control import eventlog
from ferry.control.events import ChangeBus
from ferry.domain.migration import Phase, RollbackKind, transition
from ferry.domain.records import MigrationRecord
from ferry.store import Store
from ferry.store.store import VmChange

log = logging.getLogger("ferry.migration")


class RollBack(Exception):
    """Raised inside a step to end the migration through ROLLING_BACK → FAILED; `kind`
    asks for a rollback other than the phase's own (see domain rollback_kind)."""

    def __init__(self, reason: str, kind: RollbackKind | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass
class SwitchReads:
    """What SWITCHOVER waits for, asked the moment the source's stream completed (the
    guest is paused everywhere): read-only, so asked before SWITCHOVER is stored."""

    target: asyncio.Task[VmInfo]  # the destination, once paused with the whole stream
    digests: asyncio.Task[tuple[bytes, bytes]] | None  # None: no memory check
    began: float  # time.monotonic() when asked

    def cancel(self) -> None:
        self.target.cancel()
        if self.digests is not None:
            self.digests.cancel()


@dataclass
class Job:
    id: str
    store: Store
    bus: ChangeBus
    source: AgentClient
    target: AgentClient
    cancelled: asyncio.Event
    # The record as this job last wrote it: its next write is tried against it without
    # reading it first (the store's compare-and-set catches another writer meanwhile).
    last: MigrationRecord | None = None
    switch_reads: SwitchReads | None = None  # from PRECOPY to its SWITCHOVER step

    def _expected(self, rec: MigrationRecord | None = None) -> MigrationRecord | None:
        known = [r for r in (rec, self.last) if r is not None]
        return max(known, key=lambda r: r.version, default=None)

    def _wrote(self, rec: MigrationRecord) -> MigrationRecord:
        self.last = rec
        return rec

    async def enter(self, rec: MigrationRecord, phase: Phase, *, vm: VmChange | None = None,
                    unless_cancelled: bool = False, **changes: object) -> MigrationRecord:
        """Persist `phase` (with `changes`, and `vm` in the same transaction), checked
        against the phase as stored: it only moves along an arrow, never back. With
        `unless_cancelled`, a cancel already stored wins (RollBack) in the same
        compare-and-set."""
        now = time.time()

        def change(cur: MigrationRecord) -> dict[str, object]:
            if unless_cancelled and cur.cancel_requested:
                raise RollBack("cancelled by the user")
            transition(cur.phase, phase)
            return {"phase": phase, "phase_times": cur.phase_times | {phase.value: now},
                    **changes}

        rec = self._wrote(await self.store.change_migration(rec.id, change, vm,
                                                            self._expected(rec)))
        log.info("migration %s of %s: %s", rec.id, rec.vm, phase)
        if phase.terminal:
            await eventlog.migration_ended(self.store, rec)
        await self.bus.changed(rec.id)
        return rec

    async def update(self, **changes: object) -> MigrationRecord:
        rec = self._wrote(await self.store.update_migration(
            self.id, expected=self._expected(), **changes))
        await self.bus.changed(self.id)
        return rec

    async def change(self, change: Callable[[MigrationRecord], dict[str, object]],
                     vm: VmChange | None = None) -> MigrationRecord:
        rec = self._wrote(await self.store.change_migration(self.id, change, vm,
                                                            self._expected()))
        await self.bus.changed(self.id)
        return rec

    def check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise RollBack("cancelled by the user")


class Slots:
    """Limits on concurrent migrations: per source, per target and per cluster. A new
    migration waits for room, and stops waiting when cancelled; one resumed after a
    restart takes its place at once (QEMU is already moving it)."""

    def __init__(self, per_host: int, cluster: int) -> None:
        self.per_host = per_host
        self.cluster = cluster
        self._cond = asyncio.Condition()
        self._out: Counter[str] = Counter()
        self._in: Counter[str] = Counter()
        self._all = 0

    def _room(self, source: str, target: str) -> bool:
        return (self._all < self.cluster and self._out[source] < self.per_host
                and self._in[target] < self.per_host)

    async def take(self, source: str, target: str, cancelled: asyncio.Event,
                   wait: bool = True) -> bool:
        """True once the slot is taken; False if cancelled while waiting for it."""
        async with self._cond:
            if wait:
                await self._cond.wait_for(
                    lambda: cancelled.is_set() or self._room(source, target))
                if cancelled.is_set():
                    return False
            self._out[source] += 1
            self._in[target] += 1
            self._all += 1
            return True

    async def give(self, source: str, target: str) -> None:
        async with self._cond:
            self._out[source] -= 1
            self._in[target] -= 1
            self._all -= 1
            self._cond.notify_all()

    async def set_limits(self, per_host: int, cluster: int) -> None:
        async with self._cond:
            self.per_host, self.cluster = per_host, cluster
            self._cond.notify_all()

    async def wake(self) -> None:
        """Let waiters look at their cancel flags again."""
        async with self._cond:
            self._cond.notify_all()
