"""The control plane's continuous comparison of the store with the agents' reports.

Every round (2 s) it judges every VM no job or request is busy with
(`ferry.domain.reconcile`); a finding is applied only when the next round finds it
again, so a report that raced a start or stop is never acted on. Each applied finding
updates the VM's recorded state (and host, where evidence moved it) and is an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

from ferry.agent.models import AgentVmState
from ferry.control.agents import AgentPool
from ferry.domain.audit import Outcome
from ferry.domain.errors import FerryError, NotFound
from ferry.domain.events import SYSTEM, EventKind
from ferry.domain.reconcile import Finding, reconcile
from ferry.store import Store

log = logging.getLogger("ferry.reconcile")
ROUND_S = 2.0


class BusyVms:
    """VMs a request is changing right now (start, stop, create, delete): not judged."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        self._count[name] += 1
        try:
            yield
        finally:
            self._count[name] -= 1
            if self._count[name] <= 0:
                del self._count[name]

    def names(self) -> set[str]:
        return set(self._count)


class Reconciler:
    def __init__(self, store: Store, agents: AgentPool, busy: BusyVms) -> None:
        self.store = store
        self.agents = agents
        self.busy = busy
        self._pending: set[Finding] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reconcile")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(ROUND_S)
            try:
                await self.round()
            except Exception:  # a failed round is retried next time; never stop judging
                log.exception("reconcile round failed")

    async def round(self) -> list[Finding]:
        """Judge once; apply what the previous round found too. Returns what was applied."""
        hosts = await self.store.hosts()
        connected = {h.name for h in hosts if h.state.reports}
        busy = self.busy.names() | await self._in_jobs()
        reports = {host: {name: info.state is AgentVmState.RUNNING
                          for name, info in vms.items() if info.state.alive}
                   for host, vms in self.agents.reported.items() if host in connected}
        vms = await self.store.vms()
        found = set(reconcile(vms, reports, {h.name for h in hosts}, connected, busy))
        confirmed, self._pending = found & self._pending, found
        applied = []
        for finding in sorted(confirmed, key=lambda f: f.vm):
            if await self._apply(finding):
                applied.append(finding)
        return applied

    async def _in_jobs(self) -> set[str]:
        """VMs an unfinished migration or relocation is working on."""
        return ({m.vm for m in await self.store.migrations(unfinished_only=True)}
                | {r.vm for r in await self.store.relocations(unfinished_only=True)})

    async def _apply(self, finding: Finding) -> bool:
        # A request or job that began since the round judged the VM owns it now.
        if finding.vm in self.busy.names() or finding.vm in await self._in_jobs():
            return False
        try:
            await self.store.update_vm(finding.vm, state=finding.state, host=finding.host)
        except (NotFound, FerryError):
            return False
        log.warning("reconcile: %s", finding.message)
        await self.store.events.add(
            EventKind.RECONCILE, SYSTEM, f"vm {finding.kind}", finding.vm, Outcome.OK,
            f"{finding.message}; now {finding.state} on {finding.host}", vm=finding.vm)
        return True
