"""The Store against a real database: each test taking `db_url` runs on a SQLite file
and on PostgreSQL (tests/unit/conftest.py)."""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain.errors import Conflict, NotFound
from ferry.domain.inventory import HostState, VmState
from ferry.domain.migration import Iteration, Phase
from ferry.domain.records import ActionRecord, MigrationRecord, VmRecord
from ferry.domain.specs import HostFacts, KernelBoot, VmSpec
from ferry.store import Store
from ferry.store.store import sqlite_url
from ferry.wire import status_for
from tests.unit.fake_cluster import FakeCluster

FACTS = HostFacts(name="host1", address="10.0.0.1", accel="tcg", cpus=2, memory_mib=1024,
                  memory_free_mib=1024, cpu_models=("Nehalem",), qemu_version="7.2.0",
                  machine_types=("pc-i440fx-7.2",))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = await Store.open(db_url)
    yield s
    await s.close()


async def test_heartbeat_registers_and_connects(store: Store) -> None:
    rec = await store.record_heartbeat(FACTS, "http://10.0.0.1:8100")
    assert rec.state is HostState.CONNECTED and rec.cpus == 2
    assert [h.name for h in await store.hosts()] == ["host1"]
    rec = await store.set_maintenance("host1", True)
    assert rec.state is HostState.MAINTENANCE
    with pytest.raises(NotFound, match="known hosts: host1"):
        await store.host("nope")


async def test_vm_crud_and_duplicates(store: Store) -> None:
    await store.record_heartbeat(FACTS, "u")
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/k"))
    await store.add_vm(VmRecord(spec=spec, host="host1", state=VmState.DEFINED))
    with pytest.raises(Conflict, match="already exists"):
        await store.add_vm(VmRecord(spec=spec, host="host1", state=VmState.DEFINED))
    vm = await store.update_vm("web1", state=VmState.RUNNING)
    assert vm.state is VmState.RUNNING and vm.spec == spec
    await store.delete_vm("web1")
    with pytest.raises(NotFound):
        await store.vm("web1")


async def test_one_unfinished_migration_per_vm(store: Store, db_url: str) -> None:
    def mig(i: str) -> MigrationRecord:
        return MigrationRecord(id=i, vm="web1", source="a", target="b", phase=Phase.PENDING,
                               created_at=time.time())
    await store.add_migration(mig("m1"))
    with pytest.raises(Conflict, match="already being migrated"):
        await store.add_migration(mig("m2"))
    await store.update_migration("m1", phase=Phase.FAILED, reason="x")
    await store.add_migration(mig("m3"))
    await store.add_iteration("m3", Iteration(number=1, at_ms=5, remaining_bytes=9,
                                              transferred_bytes=1, dirty_rate_bytes_s=0,
                                              throughput_bytes_s=1.0, expected_downtime_ms=None))
    rec = await store.migration("m3")
    assert [i.number for i in rec.iterations] == [1]
    assert [m.id for m in await store.migrations(unfinished_only=True)] == ["m3"]
    # survives reopening the same file: what a restarted control plane reads
    reopened = await Store.open(db_url)
    assert (await reopened.migration("m1")).reason == "x"
    await reopened.close()


# --- atomic job updates (issue 9: updates can be lost) ------------------------------
def pending(i: str = "m1") -> MigrationRecord:
    return MigrationRecord(id=i, vm="web1", source="a", target="b", phase=Phase.PENDING,
                           created_at=time.time())


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    store = await Store.open(sqlite_url(str(tmp_path / "f.db")))
    async with store._engine.connect() as conn:
        mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
        busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    await store.close()
    assert (mode, busy) == ("wal", 5000)


async def test_concurrent_changes_to_one_job_are_all_kept(store: Store) -> None:
    await store.add_migration(pending())

    def add_action(n: int) -> Any:
        return lambda cur: {"actions": (*cur.actions, ActionRecord(at_ms=n, kind="x"))}
    await asyncio.gather(*(store.change_migration("m1", add_action(n)) for n in range(20)))
    rec = await store.migration("m1")
    assert sorted(a.at_ms for a in rec.actions) == list(range(20))
    assert rec.version == 20


async def test_a_write_in_between_makes_the_change_apply_again_to_the_newer_record(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.add_migration(pending())
    read = store._read_job
    interfered: list[bool] = []

    async def read_then_someone_writes(*args: Any) -> Any:
        current = await read(*args)
        if not interfered:
            interfered.append(True)
            await store.update_migration("m1", cancel_requested=True)
        return current
    monkeypatch.setattr(store, "_read_job", read_then_someone_writes)
    seen: list[int] = []

    def start_postcopy(cur: MigrationRecord) -> dict[str, Any]:
        seen.append(cur.version)
        return {} if cur.cancel_requested else {"postcopy_started": True}
    rec = await store.change_migration("m1", start_postcopy)
    assert seen == [0, 1]  # judged again on the record with the cancel in it
    assert rec.cancel_requested and not rec.postcopy_started and rec.version == 2


async def test_a_write_against_the_expected_record_reads_only_if_it_was_not_current(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = await store.add_migration(pending())
    read = store._read_job
    reads: list[int] = []

    async def counted(*args: Any) -> Any:
        reads.append(1)
        return await read(*args)
    monkeypatch.setattr(store, "_read_job", counted)
    rec = await store.update_migration("m1", expected=rec, reason="a")
    assert (rec.version, rec.reason, len(reads)) == (1, "a", 0)  # no read needed
    # another writer in between: the stale copy's write misses, the stored one is read
    await store.update_migration("m1", cancel_requested=True)
    reads.clear()

    def start_postcopy(cur: MigrationRecord) -> dict[str, Any]:
        return {} if cur.cancel_requested else {"postcopy_started": True}
    rec = await store.change_migration("m1", start_postcopy, expected=rec)
    assert rec.cancel_requested and not rec.postcopy_started and rec.version == 3
    assert len(reads) == 1
    # a change that refuses the stale copy is judged again on the stored record
    stale = rec.model_copy(update={"phase": Phase.FAILED})

    def leave_pending(cur: MigrationRecord) -> dict[str, Any]:
        if cur.phase is not Phase.PENDING:
            raise Conflict("not pending")
        return {"phase": Phase.CHECKING}
    rec = await store.change_migration("m1", leave_pending, expected=stale)
    assert rec.phase is Phase.CHECKING and rec.version == 4


async def test_a_phase_never_moves_back_from_a_stale_copy(tmp_path: Path, db_url: str
                                                          ) -> None:
    cluster = await FakeCluster.open(tmp_path, db_url=db_url)
    try:
        rec = await cluster.store.add_migration(pending())
        stale = await cluster.orchestrator._enter(rec, Phase.CHECKING)
        await cluster.orchestrator._enter(stale, Phase.ROLLING_BACK, reason="x")
        with pytest.raises(Conflict, match="cannot go from rolling_back to preparing_target"):
            await cluster.orchestrator._enter(stale, Phase.PREPARING_TARGET)
        assert (await cluster.store.migration("m1")).phase is Phase.ROLLING_BACK
    finally:
        await cluster.close()


async def test_cancel_cannot_land_on_postcopy(tmp_path: Path, db_url: str) -> None:
    cluster = await FakeCluster.open(tmp_path, db_url=db_url)
    try:
        await cluster.store.add_migration(pending().model_copy(update={
            "phase": Phase.PRECOPY, "postcopy_started": True}))
        with pytest.raises(Conflict, match="is in post-copy") as err:
            await cluster.orchestrator.cancel("m1")
        assert status_for(err.value) == 409 and "cannot be cancelled" in err.value.fix
        rec = await cluster.store.migration("m1")
        assert not rec.cancel_requested and rec.postcopy_started
    finally:
        await cluster.close()


async def test_an_older_database_gets_the_version_column(db_url: str) -> None:
    first = await Store.open(db_url)
    await first.add_migration(pending())
    async with first._engine.begin() as conn:
        for table in ("migrations", "relocations"):
            await conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN version")
    await first.close()
    store = await Store.open(db_url)
    try:
        rec = await store.update_migration("m1", reason="still works")
        assert rec.version == 1 and (await store.migration("m1")).reason == "still works"
    finally:
        await store.close()
