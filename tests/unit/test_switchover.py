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
from ferry.domain.migration import Phase, RollbackKind, SourceStatus, StreamOptions
from tests.unit.fake_cluster import FakeCluster, spec, unreachable


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[FakeCluster]:
    monkeypatch.setattr(migration, "CONFIRM_TIMEOUT_S", 0.5)
    monkeypatch.setattr(migration, "RESUME_WINDOW_S", 1.0)
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


def silence_source_once_completed(cluster: FakeCluster) -> None:
    """The source's agent dies at the poll that sees the stream completed (the matrix's
    source_completed cell): QEMU completed (source in postmigrate, the destination
    paused with everything), but the agent never answers again."""
    source = cluster.agents["host1"]

    def die_at_completion() -> None:
        vm = source.vms.get("web1")
        if vm is not None and vm.script == [SourceStatus.COMPLETED]:
            source._advance(vm)  # QEMU finishes on its own; the answer is lost
            for method in ("progress", "vm", "cancel_migration", "stop_vm", "resume_vm",
                           "stop_disk_mirrors"):
                source.faults[method][:] = [unreachable("host1")] * 1000
    source.on_call["progress"] = die_at_completion


async def test_a_silent_source_whose_destination_holds_the_stream_is_switched_without_it(
        cluster: FakeCluster) -> None:
    silence_source_once_completed(cluster)
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    assert list(done.phase_times)[-4:] == ["precopy", "switchover", "resuming_target",
                                           "completed"]
    assert cluster.ran == [("host2", "web1")]  # the source was never resumed
    assert "resume_vm" not in cluster.agents["host1"].calls
    # the stale source stays paused until its agent is back (the leftover reaper)
    assert cluster.agents["host1"].vms["web1"].state is AgentVmState.MIGRATED
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host2", VmState.RUNNING)


async def test_with_a_return_path_a_silent_source_is_not_switched_without(
        cluster: FakeCluster) -> None:
    # post-copy allowed: QEMU's return path could still fail the end of the stream and
    # make the source restart the guest on its own, so the destination proves nothing
    silence_source_once_completed(cluster)
    options = StreamOptions(allow_postcopy=True)
    rec = await cluster.orchestrator.start("web1", "host2", options)
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNDO, done
    assert cluster.ran == [] and "resume_vm" not in cluster.agents["host2"].calls
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host1", VmState.UNKNOWN)


async def test_a_silent_source_mid_stream_is_rolled_back_once_the_wait_ends(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "TARGET_SETTLE_S", 0.3)
    source = cluster.agents["host1"]
    source.vms["web1"].script = [SourceStatus.ACTIVE]  # never completes
    calls: list[int] = []

    def die_mid_stream() -> None:
        calls.append(1)
        if len(calls) == 3:
            source.faults["progress"][:] = [unreachable("host1")] * 1000
    source.on_call["progress"] = die_mid_stream
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNDO, done
    assert "unreachable" in (done.reason or "")
    assert cluster.ran == [] and "resume_vm" not in cluster.agents["host2"].calls
    assert "web1" not in cluster.agents["host2"].vms  # the receiving copy was stopped


@pytest.mark.parametrize("resumed_before", [False, True])
async def test_a_destination_that_exited_before_cont_gives_the_vm_back_to_the_source(
        cluster: FakeCluster, resumed_before: bool) -> None:
    """The switch is recorded, then the destination's QEMU dies before `cont`. Only
    its agent's word that it never sent `cont` lets the source run again."""
    target = cluster.agents["host2"]

    def die_before_cont() -> None:
        vm = target.vms["web1"]
        vm.state = AgentVmState.EXITED
        vm.never_ran = not resumed_before
    target.on_call["resume_vm"] = die_before_cont
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 60)
    assert done.phase is Phase.FAILED and done.switched, done
    vm = await cluster.store.vm("web1")
    if resumed_before:  # it may have run: its memory is gone, the older source stops
        assert done.rollback is RollbackKind.LOST, done
        assert "after it was told to run the guest" in (done.reason or "")
        assert cluster.ran == [] and "resume_vm" not in cluster.agents["host1"].calls
        assert "web1" not in cluster.agents["host1"].vms  # the stale copy was stopped
        assert (vm.host, vm.state) == ("host2", VmState.CRASHED)
        return
    assert done.rollback is RollbackKind.REVERT
    assert "exited before it ran the guest" in (done.reason or "")
    assert cluster.ran == [("host1", "web1")] and cluster.running_on("web1") == ["host1"]
    assert "web1" not in target.vms
    assert (vm.host, vm.state) == ("host1", VmState.RUNNING)


async def test_a_source_qemu_that_exited_before_the_switch_is_recorded_crashed(
        cluster: FakeCluster) -> None:
    """The source QEMU dies mid pre-copy and its agent reports it exited: the undo
    rollback records the VM crashed on the source (no copy runs anywhere), never
    `running` on a host where no QEMU runs."""
    source = cluster.agents["host1"]

    def source_dies() -> None:
        vm = source.vms["web1"]
        vm.state = AgentVmState.EXITED
        vm.script = [SourceStatus.FAILED]
    source.on_call["progress"] = source_dies
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED, done
    assert "is gone: the VM is not running" in (done.reason or ""), done.reason
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host1", VmState.CRASHED)
    assert "resume_vm" not in source.calls and cluster.running_on("web1") == []


async def test_a_destination_silent_at_resume_is_waited_for_within_the_window(
        cluster: FakeCluster) -> None:
    """Its agent frozen past CONFIRM_TIMEOUT_S right after the switch: the migration
    keeps asking (the source stays paused) and completes once the agent answers."""
    target = cluster.agents["host2"]
    silent = [unreachable("host2")] * 4  # ~0.8 s at RETRY_S: past CONFIRM_TIMEOUT_S
    target.faults["resume_vm"][:] = silent
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done
    assert target.faults["resume_vm"] == []  # every failing call was made
    assert cluster.ran == [("host2", "web1")] and cluster.running_on("web1") == ["host2"]
    assert "resume_vm" not in cluster.agents["host1"].calls
