"""Leadership of this control-plane replica: claim the lease row every `renew_s`, and
start or stop what only the leader may drive (jobs, HA, DRS, schedules) as the lease is
won or lost. The rules are ferry/domain/leader.py; the row is store/leader.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from ferry.domain.leader import LeaderLease, LeaderTerms, claim, leads
from ferry.store import Store

log = logging.getLogger(__name__)
Clock = Callable[[], float]
Hook = Callable[[], Awaitable[None]]
REPLICA_ID_MAX = 128  # the lease row's holder column


def default_replica_id() -> str:
    """This machine's name: a control plane restarted here takes its lease back at once
    (as one process before leases did); replicas on other machines differ. Two replicas
    on one machine need `--replica-id` each."""
    return socket.gethostname()


class Leadership:
    def __init__(self, store: Store, replica: str, on_lead: Hook, on_stand_by: Hook,
                 terms: LeaderTerms | None = None, clock: Clock = time.time) -> None:
        if not 0 < len(replica) <= REPLICA_ID_MAX:
            raise ValueError(f"a replica id is 1 to {REPLICA_ID_MAX} characters")
        self.store = store
        self.replica = replica
        self.terms = terms or LeaderTerms()
        self._on_lead, self._on_stand_by = on_lead, on_stand_by
        self._clock = clock
        self._written: LeaderLease | None = None  # the last row this process wrote
        self.leading = False
        self._task: asyncio.Task[None] | None = None

    @property
    def token(self) -> int | None:
        """The fencing token of the term this replica leads in, or None."""
        return self._written.token if self.leading and self._written else None

    async def round(self) -> bool:
        """One claim: renew or take the lease if the rules allow; start or stop driving
        as the outcome changed. A store error keeps the last row written: leading then
        ends when that term runs out, never later."""
        try:
            read = await self.store.leader.read()
            new = claim(read, self.replica, self._clock(), self.terms, self._written)
            if new is not None and await self.store.leader.write(read, new):
                if self._written is None or new.token != self._written.token:
                    log.info("control plane %s leads (term %d)", self.replica, new.token)
                self._written = new
        except Exception:  # the database is unreachable: judge from what we wrote
            log.exception("leader lease: claim failed")
        await self._follow(leads(self._written, self.replica, self._clock()))
        return self.leading

    async def _follow(self, leading: bool) -> None:
        if leading and not self.leading:
            self.leading = True
            await self._on_lead()
        elif not leading and self.leading:
            self.leading = False
            log.warning("control plane %s no longer leads: standing by", self.replica)
            await self._on_stand_by()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="leader-lease")

    async def _loop(self) -> None:
        while True:
            # Wake at the next renewal, or when the term runs out if that is sooner: a
            # leader that could not renew must stop by then (the rules count on it).
            wait = self.terms.renew_s
            if self.leading and self._written is not None:
                wait = min(wait, max(0.0, self._written.expires_at - self._clock()))
            await asyncio.sleep(wait)
            try:
                await self.round()
            except Exception:  # starting or stopping the loops failed: claim on regardless
                log.exception("leader lease: changing over failed")

    async def close(self) -> None:
        """Stop claiming; a leader stops driving and gives the lease up, so a standby
        takes over at once instead of after the term."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        was_leading = self.leading
        await self._follow(False)
        if was_leading and self._written is not None:
            written = self._written
            released = written.model_copy(update={
                "holder": "", "expires_at": 0.0, "version": written.version + 1})
            with contextlib.suppress(Exception):
                await self.store.leader.write(written, released)
