"""POSTCOPY is a phase that is never cancelled and never rolled back to the source; a
fault during it is waited out within the recovery window (issue 9, defect 3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.agent.models import AgentVmState
from ferry.control import migration_steps
from ferry.domain.convergence import CONTINUE, Action, ActionKind, ConvergenceState
from ferry.domain.errors import Conflict
from ferry.domain.inventory import VmState
from ferry.domain.migration import Phase, RollbackKind, SourceStatus, StreamOptions
from ferry.domain.records import MigrationRecord
from ferry.wire import status_for
from tests.unit.fake_cluster import FakeCluster, spec, unreachable

S = SourceStatus


def postcopy_at_once(state: ConvergenceState, _: object) -> Action:
    return CONTINUE if state.postcopy else Action(kind=ActionKind.POSTCOPY, reason="test")


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[FakeCluster]:
    monkeypatch.setattr(migration_steps, "decide", postcopy_at_once)
    c = await FakeCluster.open(tmp_path)
    await c.add_running_vm(spec("web1"), "host1")
    yield c
    await c.close()


async def start(cluster: FakeCluster, script: list[SourceStatus], **options: object
                ) -> MigrationRecord:
    cluster.agents["host1"].vms["web1"].script = script
    opts = StreamOptions.model_validate({"allow_postcopy": True, **options})
    return await cluster.orchestrator.start("web1", "host2", opts)


async def until(cluster: FakeCluster, migration_id: str, what: object) -> None:
    """Let the migration run until `what()` holds (bounded by the fake's script)."""
    for _ in range(10_000):
        if what():
            return
        await cluster.orchestrator.wait(migration_id, 0.01)
    raise AssertionError("never happened")


async def test_postcopy_is_a_phase_that_cannot_be_cancelled(cluster: FakeCluster) -> None:
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE])  # stays in post-copy
    await until(cluster, rec.id, lambda: cluster.running_on("web1") == ["host2"])
    assert (await cluster.store.migration(rec.id)).phase is Phase.POSTCOPY
    with pytest.raises(Conflict, match="is in post-copy") as err:
        await cluster.orchestrator.cancel(rec.id)
    assert status_for(err.value) == 409
    assert "cancel_migration" not in cluster.agents["host1"].calls
    cluster.agents["host1"].vms["web1"].script = [S.COMPLETED]
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED and not done.cancel_requested
    assert list(done.phase_times)[-3:] == ["precopy", "postcopy", "completed"]
    assert cluster.ran == [("host2", "web1")]
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host2", VmState.RUNNING)


async def test_timed_out_calls_during_postcopy_neither_roll_back_nor_kill(
        cluster: FakeCluster) -> None:
    target, source = cluster.agents["host2"], cluster.agents["host1"]
    armed: list[bool] = []

    async def faults_once_in_postcopy() -> None:
        [m] = await cluster.store.migrations()
        if m.phase is Phase.POSTCOPY and not armed:
            armed.append(True)
            target.faults["vm"] += [unreachable("host2")] * 3
            target.faults["resume_vm"] += [unreachable("host2")] * 2
            source.faults["progress"] += [unreachable("host1")] * 3
    source.on_call["progress"] = faults_once_in_postcopy
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_ACTIVE,
                                S.POSTCOPY_ACTIVE, S.POSTCOPY_ACTIVE, S.COMPLETED])
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert armed and done.phase is Phase.COMPLETED, done.reason
    assert not target.faults["vm"] and not target.faults["resume_vm"]  # all were hit
    assert "stop_vm" not in target.calls
    assert cluster.ran == [("host2", "web1")] and cluster.running_on("web1") == ["host2"]
    assert "web1" not in source.vms  # torn down only after the target ran


async def test_paused_and_recovering_postcopy_is_waited_for(cluster: FakeCluster) -> None:
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
                                S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
                                S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.COMPLETED])
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    assert cluster.running_on("web1") == ["host2"]
    assert "stop_vm" not in cluster.agents["host2"].calls


async def test_a_fault_past_the_recovery_window_leaves_the_vm_unknown_and_running(
        cluster: FakeCluster) -> None:
    # the link never comes back: every reconnection attempt fails
    cluster.agents["host2"].faults["recover_incoming"] += [unreachable("host2")] * 10_000
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED],
                      postcopy_recovery_window_s=1)
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNRESOLVED
    assert "could not go on for 1 s (QEMU reports postcopy-paused)" in (done.reason or "")
    # nothing killed, nothing resumed on the source: the guest keeps its one copy
    assert cluster.running_on("web1") == ["host2"]
    assert cluster.agents["host1"].vms["web1"].state is AgentVmState.MIGRATED
    assert "resume_vm" not in cluster.agents["host1"].calls
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host2", VmState.UNKNOWN)


async def test_a_paused_postcopy_is_reconnected_once_the_link_is_back(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration_steps, "RECOVER_EVERY_S", 0.01)
    target, source = cluster.agents["host2"], cluster.agents["host1"]
    target.faults["recover_incoming"] += [unreachable("host2")] * 2  # link still down
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED])
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    assert done.postcopy_recoveries == 1
    assert target.calls.count("recover_incoming") == 3
    assert source.calls.count("resume_outgoing") == 1
    assert "stop_vm" not in target.calls
    assert cluster.ran == [("host2", "web1")] and cluster.running_on("web1") == ["host2"]


async def test_the_source_qemu_gone_in_postcopy_is_reported_lost(cluster: FakeCluster
                                                                 ) -> None:
    source = cluster.agents["host1"]
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE])
    await until(cluster, rec.id, lambda: cluster.running_on("web1") == ["host2"])
    del source.vms["web1"]  # its QEMU died: the pages only it had are gone
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.LOST
    assert "the source QEMU is gone during post-copy" in (done.reason or "")
    assert "is lost" in (done.reason or "")
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host1", VmState.CRASHED)
    assert "web1" not in cluster.agents["host2"].vms  # its half cannot run alone


async def test_the_source_qemu_exited_in_postcopy_is_lost_at_once_not_after_the_window(
        cluster: FakeCluster) -> None:
    """Its agent answers (409: no running QEMU) and reports the process exited: no
    recovery can bring its pages back, so the 10 min window is not waited out."""
    source = cluster.agents["host1"]
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE])  # recovery window: 600 s
    await until(cluster, rec.id, lambda: cluster.running_on("web1") == ["host2"])
    source.vms["web1"].state = AgentVmState.EXITED
    source.faults["progress"] += [Conflict("VM web1 has no running QEMU on host1")] * 1000
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.LOST, done
    assert "the source QEMU exited during post-copy" in (done.reason or "")
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host1", VmState.CRASHED)
    assert "web1" not in cluster.agents["host2"].vms


@pytest.mark.parametrize("source_status", [S.POSTCOPY_PAUSED, S.FAILED])
async def test_a_destination_dead_before_it_ran_in_postcopy(
        cluster: FakeCluster, source_status: SourceStatus) -> None:
    """The destination QEMU exits before `cont` (its agent: never ran): it requested no
    page and ran nothing, so the source, which stopped at the switch, holds the whole
    guest. Where QEMU ended the post-copy itself (failed), the VM runs there again
    (REVERT through the agent's revert_outgoing, which re-activates the disks QEMU 7.2
    leaves handed over). A post-copy the source paused cannot be ended on QEMU 7.2: LOST,
    saying why."""
    source, target = cluster.agents["host1"], cluster.agents["host2"]

    def dies() -> None:  # the destination QEMU dies just before it would get `cont`
        target.vms["web1"].state = AgentVmState.EXITED
        source.vms["web1"].script = [source_status]  # QEMU's source notices
    target.on_call["resume_vm"] = dies
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE])
    done = await cluster.orchestrator.wait(rec.id, 30)
    vm = await cluster.store.vm("web1")
    if source_status is S.POSTCOPY_PAUSED:
        assert done.phase is Phase.FAILED and done.rollback is RollbackKind.LOST, done
        assert "cannot end its paused post-copy" in (done.reason or ""), done.reason
        assert "revert_outgoing" not in source.calls
        assert (vm.host, vm.state) == ("host1", VmState.CRASHED)
        return
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.REVERT, done
    assert "before it ran the guest" in (done.reason or ""), done.reason
    assert (vm.host, vm.state) == ("host1", VmState.RUNNING)
    assert source.calls.count("revert_outgoing") == 1 and "resume_vm" not in source.calls
    assert cluster.running_on("web1") == ["host1"] and "web1" not in target.vms


async def test_a_silent_source_agent_in_postcopy_is_waited_for_not_lost(
        cluster: FakeCluster) -> None:
    # the agent is down (its QEMU lives on, pages and all): only the window may end it
    source = cluster.agents["host1"]
    rec = await start(cluster, [S.ACTIVE, S.POSTCOPY_ACTIVE], postcopy_recovery_window_s=1)
    await until(cluster, rec.id, lambda: cluster.running_on("web1") == ["host2"])
    for method in ("progress", "vm"):
        source.faults[method] += [unreachable("host1")] * 10_000
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNRESOLVED, done
    assert cluster.running_on("web1") == ["host2"]


async def test_a_cancel_stored_first_keeps_postcopy_from_starting(cluster: FakeCluster
                                                                  ) -> None:
    source = cluster.agents["host1"]
    cancelled: list[bool] = []

    async def cancel_mid_pass() -> None:
        # lands after the pass's cancel check, just before the policy picks post-copy
        if not cancelled:
            cancelled.append(True)
            [m] = await cluster.store.migrations(unfinished_only=True)
            await cluster.orchestrator.cancel(m.id)
    source.on_call["progress"] = cancel_mid_pass
    rec = await start(cluster, [S.ACTIVE, S.ACTIVE])
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and "cancelled by the user" in (done.reason or "")
    assert not done.postcopy_started and "postcopy" not in done.phase_times
    assert "tune" not in source.calls
    assert cluster.running_on("web1") == ["host1"]
