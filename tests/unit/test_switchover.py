"""The destination starts paused and runs only after the store records the switch
(issue 9, defect 2): the guest executes on at most one host, ever."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.agent.models import AgentVmState
from ferry.control import migration_steps as migration
from ferry.domain.convergence import CONTINUE, Action, ActionKind, ConvergenceState
from ferry.domain.inventory import VmState
from ferry.domain.migration import Phase, RollbackKind, SourceStatus
from tests.unit.fake_cluster import FakeCluster, spec, unreachable


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[FakeCluster]:
    monkeypatch.setattr(migration, "CONFIRM_TIMEOUT_S", 0.5)
    c = await FakeCluster.open(tmp_path)
    await c.add_running_vm(spec("web1"), "host1")
    yield c
    await c.close()


async def test_destination_runs_only_after_the_store_records_it(cluster: FakeCluster
                                                                ) -> None:
    seen: list[tuple[str, Phase]] = []

    async def at_resume() -> None:
        vm = await cluster.store.vm("web1")
        [m] = await cluster.store.migrations()
        seen.append((vm.host, m.phase))
    cluster.agents["host2"].on_call["resume_vm"] = at_resume
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    assert seen == [("host2", Phase.RESUMING_TARGET)]
    assert list(done.phase_times)[-3:] == ["switchover", "resuming_target", "completed"]
    assert cluster.ran == [("host2", "web1")]
    assert cluster.running_on("web1") == ["host2"] and "web1" not in cluster.agents["host1"].vms


@pytest.mark.parametrize("fault", ["exited", "vanished", "unreachable"])
async def test_a_destination_lost_at_switchover_never_ran_so_the_source_resumes(
        cluster: FakeCluster, fault: str) -> None:
    target = cluster.agents["host2"]

    def break_destination() -> None:
        vm = target.vms.get("web1")
        if vm is None or vm.state is not AgentVmState.PAUSED:
            return  # not yet at switchover
        if fault == "exited":
            vm.state = AgentVmState.EXITED
        elif fault == "vanished":
            del target.vms["web1"]
        else:
            target.faults["vm"][:] = [unreachable("host2")] * 1000
    target.on_call["vm"] = break_destination
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED, done
    assert "resume_vm" not in target.calls
    assert cluster.ran == [("host1", "web1")]  # only the source, resumed
    assert cluster.running_on("web1") == ["host1"]
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host1", VmState.RUNNING)


async def test_a_destination_that_cannot_be_resumed_leaves_the_vm_unknown_not_doubled(
        cluster: FakeCluster) -> None:
    cluster.agents["host2"].faults["resume_vm"][:] = [unreachable("host2")] * 1000
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNRESOLVED
    assert "could not be confirmed, so nothing was resumed" in (done.reason or "")
    assert cluster.ran == [] and cluster.running_on("web1") == []
    assert cluster.agents["host1"].vms["web1"].state is AgentVmState.MIGRATED
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host2", VmState.UNKNOWN)


async def test_postcopy_records_the_switch_before_the_destination_runs(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    def postcopy_now(state: ConvergenceState, _: object) -> Action:
        return CONTINUE if state.postcopy else Action(kind=ActionKind.POSTCOPY, reason="t")
    monkeypatch.setattr(migration, "decide", postcopy_now)
    source = cluster.agents["host1"]
    source.vms["web1"].script = [SourceStatus.ACTIVE, SourceStatus.POSTCOPY_ACTIVE,
                                 SourceStatus.COMPLETED]
    hosts_at_resume: list[str] = []

    async def at_resume() -> None:
        hosts_at_resume.append((await cluster.store.vm("web1")).host)
    cluster.agents["host2"].on_call["resume_vm"] = at_resume
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    assert hosts_at_resume and set(hosts_at_resume) == {"host2"}
    assert cluster.ran == [("host2", "web1")]
