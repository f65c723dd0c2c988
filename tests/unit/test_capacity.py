"""Migrations on their way in count on their target, and two starts cannot both take
the same room (issue 9: capacity races)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ferry.domain.capacity import host_snapshots
from ferry.domain.compat import RefusalReason, check_migration
from ferry.domain.errors import Incompatible
from ferry.domain.inventory import HostState, VmState
from ferry.domain.migration import Phase
from ferry.domain.records import HostRecord, MigrationRecord, VmRecord
from tests.unit.fake_cluster import FakeCluster, facts, spec

HOSTS = [HostRecord(name=h, url="", state=HostState.CONNECTED, facts=facts(h, memory_mib=700))
         for h in ("host1", "host2", "host3")]


def vm(name: str, host: str, mac: str, memory: int = 256) -> VmRecord:
    return VmRecord(spec=spec(name, memory_mib=memory, mac=mac), host=host,
                    state=VmState.RUNNING)


def migration(name: str, target: str, phase: Phase) -> MigrationRecord:
    return MigrationRecord(id=f"m-{name}", vm=name, source="x", target=target, phase=phase,
                           created_at=time.time())


VMS = [vm("a", "host3", "52:54:00:00:00:0a"), vm("b", "host1", "52:54:00:00:00:0b"),
       vm("c", "host2", "52:54:00:00:00:0c")]


def snap(name: str, migrations: list[MigrationRecord], exclude: str | None = None
         ) -> object:
    return next(s for s in host_snapshots(HOSTS, VMS, migrations, exclude) if s.name == name)


def test_a_migration_on_its_way_in_reserves_its_targets_memory_and_macs() -> None:
    host3 = snap("host3", [migration("b", "host3", Phase.PRECOPY)])
    assert host3.allocated_memory_mib == 512  # type: ignore[attr-defined]
    assert "52:54:00:00:00:0b" in host3.macs  # type: ignore[attr-defined]
    # ...so the second one into the same host is refused: 700 - 512 < 256
    refusals = check_migration(VMS[2].spec, "host2", host3)  # type: ignore[arg-type]
    assert [r.reason for r in refusals] == [RefusalReason.NO_MEMORY]
    assert "188 MiB free" in refusals[0].message


def test_ended_recorded_and_own_migrations_do_not_count_twice() -> None:
    ended = migration("b", "host3", Phase.FAILED)
    assert snap("host3", [ended]).allocated_memory_mib == 256  # type: ignore[attr-defined]
    own = migration("b", "host3", Phase.PRECOPY)
    assert snap("host3", [own], exclude="b").allocated_memory_mib == 256  # type: ignore[attr-defined]
    # once the switch is recorded the VM is placed on host3: counted there once
    switched = [vm("a", "host3", "52:54:00:00:00:0a"), vm("b", "host3", "52:54:00:00:00:0b")]
    [s3] = [s for s in host_snapshots(HOSTS, switched, [
        migration("b", "host3", Phase.RESUMING_TARGET)]) if s.name == "host3"]
    assert s3.allocated_memory_mib == 512


async def test_two_concurrent_starts_into_a_host_with_room_for_one(tmp_path: Path) -> None:
    cluster = await FakeCluster.open(tmp_path, {h: facts(h, memory_mib=700)
                                                for h in ("host1", "host2", "host3")})
    try:
        await cluster.add_running_vm(spec("a", mac="52:54:00:00:00:0a"), "host3")
        await cluster.add_running_vm(spec("b", mac="52:54:00:00:00:0b"), "host1")
        await cluster.add_running_vm(spec("c", mac="52:54:00:00:00:0c"), "host2")
        results = await asyncio.gather(cluster.orchestrator.start("b", "host3"),
                                       cluster.orchestrator.start("c", "host3"),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, Incompatible)]
        passed = [r for r in results if isinstance(r, MigrationRecord)]
        assert len(refused) == 1 and len(passed) == 1, results
        assert "MiB free" in refused[0].problem
        done = await cluster.orchestrator.wait(passed[0].id, 30)
        assert done.phase is Phase.COMPLETED
        placed = [v for v in await cluster.store.vms() if v.host == "host3"]
        assert sum(v.spec.memory_mib for v in placed) <= 700
    finally:
        await cluster.close()
