"""Recording the event log's entries for what the control plane does: migrations and
relocations starting and ending, convergence levers, DRS moves, HA restarts.

Who caused an event: the API sets `acting` to the request's token when it authenticates
it (api/auth.py). A job's background task is created inside that request, and asyncio
copies the context into it, so the migration's end, its levers and the moves of a DRS
apply name the same token; the DRS loop, HA and jobs resumed after a restart run
outside any request and are "system". This avoids threading an actor parameter through
every start() and step.

Recording never fails the work it describes: a store error here is logged, not raised
(a migration must not roll back because its log line could not be written).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from ferry.domain.audit import EventRecord, Outcome
from ferry.domain.events import SYSTEM, EventKind
from ferry.domain.migration import Phase
from ferry.domain.records import ActionRecord, MigrationRecord
from ferry.domain.storage import RelocationPhase, RelocationRecord
from ferry.store import Store

log = logging.getLogger("ferry.events")

acting: ContextVar[str] = ContextVar("ferry_acting", default=SYSTEM)


async def record(store: Store, kind: EventKind, action: str, obj: str, detail: str = "",
                 *, vm: str | None = None, outcome: Outcome = Outcome.OK,
                 actor: str | None = None) -> EventRecord | None:
    try:
        return await store.events.add(kind, actor or acting.get(), action, obj, outcome,
                                      detail, vm=vm)
    except Exception:
        log.exception("could not record a %s event for %s", kind, obj)
        return None


def _migration_outcome(rec: MigrationRecord) -> Outcome:
    return Outcome.OK if rec.phase is Phase.COMPLETED else Outcome.FAILED


async def migration_started(store: Store, rec: MigrationRecord) -> None:
    why = f"; {rec.cause}" if rec.cause else ""
    await record(store, EventKind.MIGRATION_STARTED, f"migrate {rec.vm}", rec.id,
                 f"{rec.vm}: {rec.source} -> {rec.target}{why}", vm=rec.vm)


async def migration_ended(store: Store, rec: MigrationRecord) -> None:
    if rec.phase is Phase.COMPLETED:
        facts = [f"{rec.vm} now on {rec.target}"]
        if rec.total_ms is not None:
            facts.append(f"{rec.total_ms} ms")
        if rec.downtime_ms is not None:
            facts.append(f"downtime {rec.downtime_ms} ms")
        if rec.levers:
            facts.append("levers " + ", ".join(rec.levers))
        detail = "; ".join(facts)
    else:
        detail = f"{rec.vm} stays on {rec.source}: {rec.reason or 'no reason recorded'}"
    await record(store, EventKind.MIGRATION_ENDED, f"migration {rec.phase}", rec.id, detail,
                 vm=rec.vm, outcome=_migration_outcome(rec))


async def lever_used(store: Store, rec: MigrationRecord, action: ActionRecord) -> None:
    value = f" {action.value}" if action.value is not None else ""
    await record(store, EventKind.LEVER, f"{action.kind}{value}", rec.id,
                 f"{rec.vm} at {action.at_ms} ms: {action.reason}", vm=rec.vm)


async def drs_move(store: Store, vm: str, source: str, target: str, reason: str,
                   migration_id: str) -> None:
    await record(store, EventKind.DRS_MOVE, f"move {vm} {source} -> {target}", migration_id,
                 reason, vm=vm)


async def relocation_started(store: Store, rec: RelocationRecord) -> None:
    await record(store, EventKind.RELOCATION_STARTED, f"relocate {rec.vm}", rec.id,
                 f"{rec.vm} disk {rec.disk}: {rec.source.datastore} -> "
                 f"{rec.target.datastore}", vm=rec.vm)


async def relocation_ended(store: Store, rec: RelocationRecord) -> None:
    ok = rec.phase is RelocationPhase.COMPLETED
    await record(store, EventKind.RELOCATION_ENDED, f"relocation {rec.phase}", rec.id,
                 rec.reason or "", vm=rec.vm, outcome=Outcome.OK if ok else Outcome.FAILED)


async def ha_restart(store: Store, vm: str, failed_host: str, new_host: str, why: str,
                     ok: bool = True) -> None:
    """For the HA loop (on its own branch): a VM restarted elsewhere after its host
    failed. /metrics counts these (ferry_ha_restarts_total)."""
    await record(store, EventKind.HA_RESTART, f"restart {vm} {failed_host} -> {new_host}",
                 vm, why, vm=vm, outcome=Outcome.OK if ok else Outcome.FAILED)
