"""The Store: every read and write of the inventory, as domain records."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ferry.domain.errors import Conflict, NotFound
from ferry.domain.inventory import HostState, VmState
from ferry.domain.migration import Iteration, StreamOptions
from ferry.domain.records import HostRecord, MigrationRecord, VmRecord
from ferry.domain.specs import Frozen, HostFacts, VmSpec
from ferry.domain.storage import RelocationRecord
from ferry.store.drs import DrsStore
from ferry.store.engine import create_engine, insert_missing, prepare_schema, put_setting
from ferry.store.engine import sqlite_url as sqlite_url
from ferry.store.events import EventStore
from ferry.store.ha import HaStore
from ferry.store.leader import LeaderStore, current_token, fenced, in_term
from ferry.store.networks import NetworkStore
from ferry.store.schedules import ScheduleStore
from ferry.store.security import SecurityStore
from ferry.store.tables import (
    TERMINAL,
    HostRow,
    IterationRow,
    MigrationRow,
    RelocationRow,
    SettingRow,
    VmRow,
)

HEARTBEAT_TIMEOUT_S = 5.0
JobRow = TypeVar("JobRow", MigrationRow, RelocationRow)
Job = TypeVar("Job", MigrationRecord, RelocationRecord)
# A change to a job: from the job as stored now to the fields to set. It may raise to
# refuse (e.g. a phase that cannot follow the current one); nothing is written then.
Change = Callable[[Job], dict[str, Any]]
CAS_ATTEMPTS = 50  # writers of one job are few (its runner, a cancel): a retry or two
# The fencing token of the term this process leads in, None while it does not lead.
Fence = Callable[[], int | None]


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._session = async_sessionmaker(engine, expire_on_commit=False)
        self.security = SecurityStore(self._session)
        self.networks = NetworkStore(self._session)
        self.drs = DrsStore(self._session)
        self.ha = HaStore(self._session)
        self.events = EventStore(self._session)
        self.schedules = ScheduleStore(self._session)
        self.leader = LeaderStore(self._session)
        # Set by a control plane with a leader lease: its job writes then land only in
        # its own term (a replica that lost the lease cannot overwrite the new leader's
        # jobs). None: unfenced (a single process, the tests of the store alone).
        self.fence: Fence | None = None

    def _token(self) -> int | None:
        """The token job writes must carry; NotLeader if this process does not lead."""
        if self.fence is None:
            return None
        token = self.fence()
        if token is None:
            raise fenced(None)
        return token

    @classmethod
    async def open(cls, url: str) -> Store:
        """The store at `url`: a SQLite file path or URL, or a PostgreSQL URL (see
        store/engine.py); its tables are created if missing."""
        engine = create_engine(url)
        try:
            await prepare_schema(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._engine.dialect.name

    async def close(self) -> None:
        await self._engine.dispose()

    # --- hosts -----------------------------------------------------------------
    @staticmethod
    def _host(row: HostRow, now: float) -> HostRecord:
        if row.standby:
            state = HostState.STANDBY
        elif row.maintenance:
            state = HostState.MAINTENANCE
        elif now - row.last_seen <= HEARTBEAT_TIMEOUT_S:
            state = HostState.CONNECTED
        else:
            state = HostState.DISCONNECTED
        facts = HostFacts.model_validate_json(row.facts_json) if row.facts_json else None
        return HostRecord(name=row.name, url=row.url, state=state,
                          maintenance=row.maintenance, standby=bool(row.standby), facts=facts,
                          last_seen=row.last_seen)

    async def record_heartbeat(self, facts: HostFacts, url: str) -> HostRecord:
        """Register the host on its first heartbeat, refresh it on every later one."""
        now = time.time()
        async with self._session.begin() as s:
            await insert_missing(s, HostRow, name=facts.name, url=url, maintenance=False,
                                 standby=False, last_seen=0.0)
            row = await s.get(HostRow, facts.name, with_for_update=True)
            assert row is not None
            row.url = url
            row.facts_json = facts.model_dump_json()
            row.last_seen = now
            return self._host(row, now)

    async def record_networks(self, name: str, digests: dict[str, str]) -> None:
        """What a host confirmed applying just now (its next heartbeat says the same)."""
        async with self._session.begin() as s:
            row = await s.get(HostRow, name, with_for_update=True)
            if row is None or not row.facts_json:
                return
            facts = HostFacts.model_validate_json(row.facts_json)
            row.facts_json = facts.model_copy(update={
                "networks": tuple(sorted(digests)), "network_digests": digests,
            }).model_dump_json()

    async def hosts(self) -> list[HostRecord]:
        now = time.time()
        async with self._session() as s:
            rows = (await s.scalars(select(HostRow).order_by(HostRow.name))).all()
            return [self._host(r, now) for r in rows]

    async def host(self, name: str) -> HostRecord:
        async with self._session() as s:
            row = await s.get(HostRow, name)
            if row is None:
                known = ", ".join(h.name for h in await self.hosts()) or "none"
                raise NotFound(f"there is no host {name!r}", f"known hosts: {known}")
            return self._host(row, time.time())

    async def set_maintenance(self, name: str, on: bool) -> HostRecord:
        await self.host(name)
        async with self._session.begin() as s:
            row = await s.get(HostRow, name, with_for_update=True)
            assert row is not None
            row.maintenance = on
            return self._host(row, time.time())

    async def set_standby(self, name: str, on: bool) -> HostRecord:
        await self.host(name)
        async with self._session.begin() as s:
            row = await s.get(HostRow, name, with_for_update=True)
            assert row is not None
            row.standby = on
            return self._host(row, time.time())

    # --- VMs -------------------------------------------------------------------
    @staticmethod
    def _vm(row: VmRow) -> VmRecord:
        return VmRecord(spec=VmSpec.model_validate_json(row.spec_json), host=row.host,
                        state=VmState(row.state))

    async def add_vm(self, vm: VmRecord) -> VmRecord:
        try:
            async with self._session.begin() as s:
                if await s.get(VmRow, vm.name) is not None:
                    raise Conflict(f"a VM named {vm.name!r} already exists",
                                   "choose another name or delete the existing VM")
                s.add(VmRow(name=vm.name, spec_json=vm.spec.model_dump_json(),
                            host=vm.host, state=vm.state.value))
        except IntegrityError as exc:
            raise Conflict(f"a VM named {vm.name!r} already exists") from exc
        return vm

    async def vms(self) -> list[VmRecord]:
        async with self._session() as s:
            rows = (await s.scalars(select(VmRow).order_by(VmRow.name))).all()
            return [self._vm(r) for r in rows]

    async def vm(self, name: str) -> VmRecord:
        async with self._session() as s:
            row = await s.get(VmRow, name)
            if row is None:
                raise NotFound(f"there is no VM {name!r}", "see `ferry vm list`")
            return self._vm(row)

    async def update_vm(self, name: str, *, host: str | None = None,
                        state: VmState | None = None, spec: VmSpec | None = None) -> VmRecord:
        async with self._session.begin() as s:
            row = await s.get(VmRow, name, with_for_update=True)
            _apply_vm_change(row, VmChange(name=name, host=host, state=state, spec=spec))
            assert row is not None
            return self._vm(row)

    async def delete_vm(self, name: str) -> None:
        async with self._session.begin() as s:
            row = await s.get(VmRow, name)
            if row is None:
                raise NotFound(f"there is no VM {name!r}")
            await s.delete(row)

    # --- long jobs: migrations and relocations share these ------------------------
    async def _add_job(self, row_type: type[JobRow], record: MigrationRecord | RelocationRecord,
                       busy: Callable[[str], Conflict]) -> None:
        """Insert a job's row, unless its VM has an unfinished job of that kind (the
        check names it; the unique index on unfinished jobs is what holds when two
        inserts race, on a backend with concurrent writers)."""
        async def unfinished() -> str | None:
            async with self._session() as s:
                return (await s.scalars(select(row_type.id).where(
                    row_type.vm == record.vm, row_type.phase.not_in(TERMINAL)))).first()
        if (running := await unfinished()) is not None:
            raise busy(running)
        token = self._token()
        try:
            async with self._session.begin() as s:
                if token is not None and (now := await current_token(s)) != token:
                    raise fenced(token, now)
                s.add(row_type(id=record.id, vm=record.vm,
                               record_json=record.model_dump_json(),
                               phase=record.phase.value, created_at=record.created_at))
        except IntegrityError:
            if (running := await unfinished()) is not None:
                raise busy(running) from None
            raise  # another constraint: the same id twice is a bug, not a busy VM

    async def _read_job(self, row_type: type[JobRow], model: type[Job], job_id: str,
                        kind: str) -> Job:
        async with self._session() as s:
            row = await s.get(row_type, job_id)
            if row is None:
                raise NotFound(f"there is no {kind} {job_id!r}")
            return model.model_validate(
                model.model_validate_json(row.record_json).model_dump()
                | {"version": row.version})

    async def _update_job(self, row_type: type[JobRow], model: type[Job], job_id: str,
                          change: Change[Job], kind: str,
                          also: Callable[[AsyncSession], Awaitable[None]] | None = None,
                          expected: Job | None = None) -> Job:
        """Apply `change` to the job as stored now, atomically: the write happens only if
        no other write came in between (compare-and-set on the version), else the change
        is applied again to the newer record. `also` runs in the same transaction.
        `expected`: the record as the store last returned it to the caller (a version
        names one content), tried first without reading it again: the compare-and-set
        tells whether it was still the stored one."""
        current = expected if expected is not None and expected.id == job_id else None
        for _ in range(CAS_ATTEMPTS):
            token = self._token()
            if current is None:
                current = await self._read_job(row_type, model, job_id, kind)
                changes = change(current)
            else:
                try:
                    changes = change(current)
                except Exception:  # judged on a copy that may be old: judge the stored one
                    current = None
                    continue
            record = model.model_validate(
                current.model_dump() | changes | {"version": current.version + 1})
            async with self._session.begin() as s:
                where = [row_type.id == job_id, row_type.version == current.version]
                if token is not None:
                    where.append(in_term(token))
                result = await s.execute(
                    update(row_type).where(*where)
                    # iterations live in their own table (a migration's grow by the pass)
                    .values(record_json=record.model_dump_json(exclude={"iterations"}),
                            phase=record.phase.value, version=record.version))
                if getattr(result, "rowcount", 0) == 1:
                    if also is not None:
                        await also(s)
                    return record
                if token is not None and (now := await current_token(s)) != token:
                    raise fenced(token, now)
            current = None
        raise Conflict(f"{kind} {job_id} kept changing while being updated",
                       "retry the request")

    # --- migrations ------------------------------------------------------------
    async def add_migration(self, record: MigrationRecord) -> MigrationRecord:
        """Persist a new migration; Conflict if the VM already has an unfinished one."""
        await self._add_job(MigrationRow, record, lambda busy: Conflict(
            f"VM {record.vm} is already being migrated ({busy})",
            f"wait for it to finish or cancel it with `ferry migration cancel {busy}`"))
        return record

    async def migration(self, migration_id: str) -> MigrationRecord:
        async with self._session() as s:
            row = await s.get(MigrationRow, migration_id)
            if row is None:
                raise NotFound(f"there is no migration {migration_id!r}",
                               "see `ferry migration list`")
            its = (await s.scalars(select(IterationRow).where(
                IterationRow.migration_id == migration_id).order_by(IterationRow.number))).all()
            record = MigrationRecord.model_validate_json(row.record_json)
            return MigrationRecord.model_validate(record.model_dump() | {
                "version": row.version,
                "iterations": [Iteration.model_validate_json(i.iteration_json) for i in its]})

    async def migrations(self, unfinished_only: bool = False) -> list[MigrationRecord]:
        async with self._session() as s:
            query = select(MigrationRow.id).order_by(MigrationRow.created_at)
            if unfinished_only:
                query = query.where(MigrationRow.phase.not_in(TERMINAL))
            ids: Sequence[str] = (await s.scalars(query)).all()
        return [await self.migration(i) for i in ids]

    async def update_migration(self, migration_id: str, *,
                               expected: MigrationRecord | None = None,
                               **changes: Any) -> MigrationRecord:
        """Set fields on the migration as stored now (atomic, see change_migration)."""
        return await self._update_job(MigrationRow, MigrationRecord, migration_id,
                                      lambda _: changes, "migration", expected=expected)

    async def change_migration(self, migration_id: str, change: Change[MigrationRecord],
                               vm: VmChange | None = None,
                               expected: MigrationRecord | None = None) -> MigrationRecord:
        """Apply `change` to the migration as stored now; with `vm`, change the VM's row
        in the same transaction (the switch: the job's phase and the VM's location move
        together or not at all). `expected`: see _update_job."""
        also = None
        if vm is not None:
            async def also(s: AsyncSession) -> None:
                _apply_vm_change(await s.get(VmRow, vm.name, with_for_update=True), vm)
        return await self._update_job(MigrationRow, MigrationRecord, migration_id, change,
                                      "migration", also, expected)

    async def add_iteration(self, migration_id: str, iteration: Iteration) -> None:
        async with self._session.begin() as s:
            s.add(IterationRow(migration_id=migration_id, number=iteration.number,
                               iteration_json=iteration.model_dump_json()))

    # --- cluster settings --------------------------------------------------------------
    async def migration_defaults(self) -> StreamOptions:
        async with self._session() as s:
            row = await s.get(SettingRow, "migration_defaults")
            if row is None:
                return StreamOptions()
            return StreamOptions.model_validate_json(row.value_json)

    async def set_migration_defaults(self, options: StreamOptions) -> StreamOptions:
        async with self._session.begin() as s:
            await put_setting(s, "migration_defaults", options.model_dump_json())
        return options

    # --- relocations (Storage vMotion) -----------------------------------------------
    async def add_relocation(self, record: RelocationRecord) -> RelocationRecord:
        await self._add_job(RelocationRow, record, lambda busy: Conflict(
            f"VM {record.vm} already has a disk move running ({busy})",
            f"wait for it or cancel it with `ferry relocation cancel {busy}`"))
        return record

    async def relocation(self, relocation_id: str) -> RelocationRecord:
        async with self._session() as s:
            row = await s.get(RelocationRow, relocation_id)
            if row is None:
                raise NotFound(f"there is no relocation {relocation_id!r}",
                               "see `ferry relocation list`")
            return RelocationRecord.model_validate_json(row.record_json)

    async def relocations(self, unfinished_only: bool = False) -> list[RelocationRecord]:
        async with self._session() as s:
            query = select(RelocationRow).order_by(RelocationRow.created_at)
            if unfinished_only:
                query = query.where(RelocationRow.phase.not_in(TERMINAL))
            rows = (await s.scalars(query)).all()
            return [RelocationRecord.model_validate_json(r.record_json) for r in rows]

    async def update_relocation(self, relocation_id: str, **changes: Any) -> RelocationRecord:
        return await self._update_job(RelocationRow, RelocationRecord, relocation_id,
                                      lambda _: changes, "relocation")


class VmChange(Frozen):
    """Fields of a VM's row to set along with a job's change (None: unchanged)."""

    name: str
    host: str | None = None
    state: VmState | None = None
    spec: VmSpec | None = None


def _apply_vm_change(row: VmRow | None, change: VmChange) -> None:
    if row is None:
        raise NotFound(f"there is no VM {change.name!r}")
    if change.host is not None:
        row.host = change.host
    if change.state is not None:
        row.state = change.state.value
    if change.spec is not None:
        row.spec_json = change.spec.model_dump_json()
