"""The Store against a real SQLite database file."""

import time
from pathlib import Path

import pytest

from ferry.domain.errors import Conflict, NotFound
from ferry.domain.inventory import HostState, VmState
from ferry.domain.migration import Iteration, Phase
from ferry.domain.records import MigrationRecord, VmRecord
from ferry.domain.specs import HostFacts, KernelBoot, VmSpec
from ferry.store import Store
from ferry.store.store import sqlite_url

FACTS = HostFacts(name="host1", address="10.0.0.1", accel="tcg", cpus=2, memory_mib=1024,
                  memory_free_mib=1024, cpu_models=("Nehalem",), qemu_version="7.2.0",
                  machine_types=("pc-i440fx-7.2",))


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = await Store.open(sqlite_url(str(tmp_path / "f.db")))
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


async def test_one_unfinished_migration_per_vm(store: Store, tmp_path: Path) -> None:
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
    reopened = await Store.open(sqlite_url(str(tmp_path / "f.db")))
    assert (await reopened.migration("m1")).reason == "x"
    await reopened.close()
