"""Relocation: the store follows the image QEMU really uses, also when the agent stops
answering right at the pivot (issue 9: relocation can lose writes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ferry.agent.models import AgentVmState, VmInfo
from ferry.control import storage
from ferry.control.agents import AgentPool
from ferry.control.events import ChangeBus
from ferry.control.storage import Relocator
from ferry.domain.errors import Conflict, HostUnavailable
from ferry.domain.inventory import VmState
from ferry.domain.records import HostRecord, VmRecord
from ferry.domain.specs import DiskSpec
from ferry.domain.storage import RelocationPhase, RelocationRecord
from ferry.hypervisor.errors import NotRunning
from ferry.store import Store
from ferry.store.store import sqlite_url
from tests.unit.fake_cluster import facts, spec

OLD = DiskSpec(name="root", datastore="shared", path="web1.qcow2")
NEW = DiskSpec(name="root", datastore="fast", path="web1.qcow2")


class Agent:
    """Answers disk_files from a script: None = unreachable, else the file QEMU uses."""

    def __init__(self, script: list[str | None]) -> None:
        self.script = script
        self.deleted: list[DiskSpec] = []
        self.spec = spec("web1", disks=(OLD,))

    async def disk_files(self, name: str) -> dict[str, str]:
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if answer is None:
            raise HostUnavailable("agent of host host1 is unreachable")
        return {"root": answer}

    async def vm(self, name: str, timeout_s: float | None = None,
                 loaded_wait_s: float = 0.0) -> VmInfo:
        return VmInfo(name=name, uuid=self.spec.uuid, state=AgentVmState.RUNNING, pid=1,
                      spec=self.spec)

    async def pivot(self, name: str, job_id: str, target: DiskSpec) -> VmInfo:
        raise HostUnavailable("agent of host host1 is unreachable")

    async def delete_image(self, disk: DiskSpec) -> bool:
        self.deleted.append(disk)
        return True

    async def cancel_mirror(self, name: str, job_id: str, target: DiskSpec) -> None:
        raise AssertionError("a pivoted disk must not be rolled back")


class Pool(AgentPool):
    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent

    def client(self, host: HostRecord) -> Any:
        return self.agent


async def _relocator(tmp_path: Path, agent: Agent) -> tuple[Store, Relocator, str]:
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    f = facts("host1", datastores=("shared", "fast"))
    await store.record_heartbeat(f, "https://host1")
    await store.add_vm(VmRecord(spec=agent.spec, host="host1", state=VmState.RUNNING))
    rec = await store.add_relocation(RelocationRecord(
        id="r1", vm="web1", host="host1", disk="root", source=OLD, target=NEW,
        phase=RelocationPhase.PIVOTING, created_at=time.time()))
    return store, Relocator(store, Pool(agent), ChangeBus()), rec.id


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "PIVOT_RETRY_S", 0.01)


async def test_an_unanswered_pivot_that_happened_is_recorded(tmp_path: Path) -> None:
    agent = Agent([None, None, "/ds/fast/web1.qcow2"])  # QEMU did switch to the copy
    store, relocator, rid = await _relocator(tmp_path, agent)
    try:
        await relocator._run(rid)
        done = await store.relocation(rid)
        assert done.phase is RelocationPhase.COMPLETED, done.reason
        assert (await store.vm("web1")).spec.disks == (NEW,)  # the next boot uses the copy
        assert agent.deleted == [OLD]
    finally:
        await store.close()


async def test_a_pivot_never_told_leaves_the_vm_unknown(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(storage, "PIVOT_DOUBT_S", 0.1)
    agent = Agent([None])
    store, relocator, rid = await _relocator(tmp_path, agent)
    try:
        await relocator._run(rid)
        done = await store.relocation(rid)
        assert done.phase is RelocationPhase.FAILED and "marked unknown" in (done.reason or "")
        vm = await store.vm("web1")
        assert vm.state is VmState.UNKNOWN and vm.spec.disks == (OLD,)
        assert agent.deleted == []  # both images kept
    finally:
        await store.close()


class GoneAgent(Agent):
    """The VM's QEMU was killed at the pivot: the agent answers, reporting it exited."""

    def __init__(self) -> None:
        super().__init__(["/ds/shared/web1.qcow2"])
        self.cancelled = False

    async def vm(self, name: str, timeout_s: float | None = None,
                 loaded_wait_s: float = 0.0) -> VmInfo:
        return VmInfo(name=name, uuid=self.spec.uuid, state=AgentVmState.EXITED, pid=None,
                      spec=self.spec)

    async def pivot(self, name: str, job_id: str, target: DiskSpec) -> VmInfo:
        raise Conflict(f"VM {name} has no running QEMU on host1")

    async def cancel_mirror(self, name: str, job_id: str, target: DiskSpec) -> None:
        self.cancelled = True


async def test_a_vm_whose_qemu_died_at_the_pivot_is_recorded_crashed(tmp_path: Path
                                                                    ) -> None:
    agent = GoneAgent()
    store, relocator, rid = await _relocator(tmp_path, agent)
    try:
        await relocator._run(rid)
        done = await store.relocation(rid)
        assert done.phase is RelocationPhase.FAILED, done
        assert "QEMU is gone" in (done.reason or ""), done.reason
        vm = await store.vm("web1")
        assert vm.state is VmState.CRASHED and vm.spec.disks == (OLD,)
        assert agent.cancelled  # the partial copy goes
    finally:
        await store.close()


class DiedAtPivotAgent(GoneAgent):
    """QEMU killed right at the pivot: the pivot and query-block fail as the agent's
    NotRunning does (a HostUnavailable), and the agent reports the QEMU exited."""

    async def pivot(self, name: str, job_id: str, target: DiskSpec) -> VmInfo:
        raise NotRunning(f"VM {name} has no running QEMU on host1")

    async def disk_files(self, name: str) -> dict[str, str]:
        raise NotRunning(f"VM {name} has no running QEMU on host1")


async def test_a_qemu_gone_at_the_pivot_is_not_asked_about_for_ten_minutes(
        tmp_path: Path) -> None:
    """Which image holds its last writes cannot be told any more: unknown at once, both
    images kept (PIVOT_DOUBT_S is 600 s here)."""
    agent = DiedAtPivotAgent()
    store, relocator, rid = await _relocator(tmp_path, agent)
    try:
        await asyncio.wait_for(relocator._run(rid), 5.0)
        done = await store.relocation(rid)
        assert done.phase is RelocationPhase.FAILED, done
        assert "its QEMU is gone" in (done.reason or ""), done.reason
        vm = await store.vm("web1")
        assert vm.state is VmState.UNKNOWN and vm.spec.disks == (OLD,)
        assert agent.deleted == [] and not agent.cancelled  # both images kept
    finally:
        await store.close()
