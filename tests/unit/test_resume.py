"""After a control-plane restart each phase gets the action the RESUME table names, and
every wait is bounded or cancellable (issue 9: resume guesses; waits without bounds)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.agent.models import AgentVmState
from ferry.control import migration_rollback
from ferry.domain.inventory import VmState
from ferry.domain.migration import (
    RESUME,
    ROLLBACK_FOR,
    Phase,
    ResumeAction,
    RollbackKind,
    SilentSource,
    SourceStatus,
    StreamOptions,
    TargetStream,
    rollback_kind,
    when_source_silent,
)
from ferry.domain.records import MigrationRecord
from ferry.domain.specs import DiskSpec
from tests.unit.fake_cluster import FakeCluster, FakeVm, facts, spec, until_phase

S = SourceStatus


def test_every_unfinished_phase_has_a_resume_action_and_a_rollback() -> None:
    assert set(RESUME) == {p for p in Phase if not p.terminal}
    assert set(ROLLBACK_FOR) == {p for p in Phase if not p.terminal} - {Phase.ROLLING_BACK}
    assert RESUME[Phase.CHECKING] is ResumeAction.ROLL_BACK  # never resumed unchecked
    assert ROLLBACK_FOR[Phase.CHECKING] is RollbackKind.ABANDON


@pytest.mark.parametrize("phase", [Phase.POSTCOPY, Phase.RESUMING_TARGET])
def test_after_the_switch_no_rollback_resumes_the_source(phase: Phase) -> None:
    for wanted in (None, *RollbackKind):
        got = rollback_kind(phase, wanted)
        assert got is not RollbackKind.UNDO
        # REVERT (the destination proven never to have run) only where asked for
        assert got is not RollbackKind.REVERT or wanted is RollbackKind.REVERT
    assert rollback_kind(Phase.PRECOPY, RollbackKind.LOST) is RollbackKind.UNDO
    assert rollback_kind(Phase.POSTCOPY, RollbackKind.LOST) is RollbackKind.LOST


@pytest.mark.parametrize("phase", [p for p in Phase if not p.terminal])
def test_a_recorded_switch_never_gets_undo_whatever_the_phase(phase: Phase) -> None:
    for wanted in (None, *RollbackKind):
        assert rollback_kind(phase, wanted, switched=True) is not RollbackKind.UNDO
    assert rollback_kind(Phase.SWITCHOVER, None, switched=True) is RollbackKind.UNRESOLVED
    assert rollback_kind(Phase.SWITCHOVER, None) is RollbackKind.UNDO


@pytest.mark.parametrize(("target", "postcopy", "action"), [
    (TargetStream.RECEIVING, False, SilentSource.WAIT),
    (TargetStream.RECEIVING, True, SilentSource.WAIT),
    (TargetStream.COMPLETE, False, SilentSource.SWITCH),
    # a return path can still fail the end and restart the source on its own
    (TargetStream.COMPLETE, True, SilentSource.ROLL_BACK),
    (TargetStream.BROKEN, False, SilentSource.ROLL_BACK),
    (TargetStream.SILENT, False, SilentSource.ROLL_BACK),
])
def test_a_silent_source_is_switched_only_on_a_complete_stream_without_return_path(
        target: TargetStream, postcopy: bool, action: SilentSource) -> None:
    assert when_source_silent(target, StreamOptions(allow_postcopy=postcopy)) is action


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FakeCluster]:
    c = await FakeCluster.open(tmp_path, {
        "host1": facts("host1", datastores=("shared", "local-host1")),
        "host2": facts("host2", datastores=("shared", "local-host2"))})
    await c.add_running_vm(spec("web1"), "host1")
    yield c
    await c.close()


async def seeded(cluster: FakeCluster, phase: Phase, source: AgentVmState,
                 source_status: SourceStatus, dest: AgentVmState | None,
                 vm_host: str = "host1", **fields: object) -> MigrationRecord:
    """A migration as a killed control plane left it, and its VM's QEMUs as they are."""
    src = cluster.agents["host1"].vms["web1"]
    src.state, src.status, src.script = source, source_status, [source_status]
    if dest is not None:
        cluster.agents["host2"].vms["web1"] = FakeVm(spec=src.spec, state=dest,
                                                     migration_id="m1")
        src.peer = (cluster.agents["host2"], "web1")
    await cluster.store.update_vm("web1", host=vm_host, state=VmState.MIGRATING)
    times = {p.value: time.time() for p in Phase if list(Phase).index(p)
             <= list(Phase).index(phase)}
    return await cluster.store.add_migration(MigrationRecord.model_validate({
        "id": "m1", "vm": "web1", "source": "host1", "target": "host2", "phase": phase,
        "created_at": time.time(), "phase_times": times, "dest_uri": "tcp:host2:4444",
        **fields}))


async def resume(cluster: FakeCluster) -> MigrationRecord:
    await cluster.orchestrator.resume_unfinished()
    return await cluster.orchestrator.wait("m1", 30)


async def test_restart_during_checking_abandons_without_touching_anything(
        cluster: FakeCluster) -> None:
    await seeded(cluster, Phase.CHECKING, AgentVmState.RUNNING, S.NONE, None)
    done = await resume(cluster)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.ABANDON
    assert "restarted during checking" in (done.reason or "")
    assert cluster.agents["host1"].calls == [] and cluster.agents["host2"].calls == []
    vm = await cluster.store.vm("web1")
    assert (vm.host, vm.state) == ("host1", VmState.RUNNING)


async def test_restart_while_preparing_undoes_and_is_not_fooled_by_an_earlier_arrival(
        cluster: FakeCluster) -> None:
    # The source QEMU itself arrived by migration: query-migrate says "completed".
    created = DiskSpec(name="root", datastore="local-host2", path="web1.qcow2")
    cluster.agents["host2"].images.add(("local-host2", "web1.qcow2"))
    await seeded(cluster, Phase.PREPARING_TARGET, AgentVmState.RUNNING, S.COMPLETED,
                 AgentVmState.INCOMING, created_images=[created.model_dump()])
    done = await resume(cluster)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNDO
    assert "switchover" not in done.phase_times
    assert "web1" not in cluster.agents["host2"].vms
    assert cluster.agents["host2"].deleted == [("local-host2", "web1.qcow2")]
    assert "resume_vm" not in cluster.agents["host1"].calls  # it never stopped
    assert cluster.running_on("web1") == ["host1"]


async def test_restart_at_switchover_confirms_records_then_resumes(cluster: FakeCluster
                                                                   ) -> None:
    await seeded(cluster, Phase.SWITCHOVER, AgentVmState.MIGRATED, S.COMPLETED,
                 AgentVmState.PAUSED)
    done = await resume(cluster)
    assert done.phase is Phase.COMPLETED, done.reason
    assert cluster.ran == [("host2", "web1")] and cluster.running_on("web1") == ["host2"]
    assert (await cluster.store.vm("web1")).host == "host2"


async def test_restart_after_the_switch_never_resumes_the_source(cluster: FakeCluster
                                                                 ) -> None:
    await seeded(cluster, Phase.RESUMING_TARGET, AgentVmState.MIGRATED, S.COMPLETED,
                 AgentVmState.PAUSED, vm_host="host2", switched=True)
    done = await resume(cluster)
    assert done.phase is Phase.COMPLETED, done.reason
    assert cluster.ran == [("host2", "web1")]
    assert "web1" not in cluster.agents["host1"].vms


async def test_restart_in_postcopy_goes_on(cluster: FakeCluster) -> None:
    await seeded(cluster, Phase.POSTCOPY, AgentVmState.MIGRATED, S.POSTCOPY_ACTIVE,
                 AgentVmState.RUNNING, vm_host="host2", switched=True,
                 postcopy_started=True)
    cluster.agents["host1"].vms["web1"].script = [S.POSTCOPY_ACTIVE, S.COMPLETED]
    done = await resume(cluster)
    assert done.phase is Phase.COMPLETED, done.reason
    assert cluster.running_on("web1") == ["host2"] and "web1" not in cluster.agents["host1"].vms


@pytest.mark.parametrize("kind", [RollbackKind.UNRESOLVED, RollbackKind.UNDO])
async def test_restart_mid_rollback_finishes_the_recorded_kind(cluster: FakeCluster,
                                                               kind: RollbackKind) -> None:
    await seeded(cluster, Phase.ROLLING_BACK, AgentVmState.MIGRATED, S.COMPLETED,
                 AgentVmState.PAUSED, rollback=kind, reason="it broke")
    done = await resume(cluster)
    assert done.phase is Phase.FAILED and done.rollback is kind
    assert (done.reason or "").startswith("it broke")
    vm = await cluster.store.vm("web1")
    if kind is RollbackKind.UNDO:  # the paused destination never ran: the source may
        assert cluster.running_on("web1") == ["host1"] and vm.state is VmState.RUNNING
        assert "web1" not in cluster.agents["host2"].vms
    else:  # touch nothing: neither copy runs, and the store says it does not know
        assert cluster.running_on("web1") == [] and vm.state is VmState.UNKNOWN
        assert "web1" in cluster.agents["host2"].vms


async def test_a_queued_migration_honours_cancel(cluster: FakeCluster) -> None:
    for n in (2, 3):
        await cluster.add_running_vm(spec(f"web{n}", mac=f"52:54:00:00:00:0{n}"), "host1")
    await cluster.orchestrator.set_limits(2, 5)
    for n in (1, 2):  # two slow ones fill host1's two outbound slots
        cluster.agents["host1"].vms[f"web{n}"].script = [S.ACTIVE]
    first = [await cluster.orchestrator.start(f"web{n}", "host2") for n in (1, 2)]
    queued = await cluster.orchestrator.start("web3", "host2")
    await cluster.orchestrator.cancel(queued.id)
    done = await cluster.orchestrator.wait(queued.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.ABANDON
    assert "cancelled by the user while queued" in (done.reason or "")
    assert cluster.agents["host2"].calls.count("prepare_incoming") == 2
    for rec in first:
        await cluster.orchestrator.cancel(rec.id)
        assert (await cluster.orchestrator.wait(rec.id, 30)).phase is Phase.FAILED
    assert all(cluster.running_on(f"web{n}") == ["host1"] for n in (1, 2, 3))


async def test_a_disk_copy_that_stalls_is_given_up_and_its_images_removed(
        cluster: FakeCluster) -> None:
    await cluster.add_running_vm(spec("db1", mac="52:54:00:00:00:09", disks=(
        DiskSpec(name="data", datastore="local-host1", path="db1.qcow2"),)), "host1")
    cluster.agents["host1"].mirrors_ready = False  # stuck half-way
    rec = await cluster.orchestrator.start("db1", "host2",
                                           StreamOptions(progress_timeout_s=1),
                                           datastore="local-host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNDO
    assert "the disk copy made no progress for 1 s" in (done.reason or "")
    assert "disk_copy" in done.phase_times and "precopy" not in done.phase_times
    assert cluster.agents["host2"].deleted == [("local-host2", "db1.qcow2")]
    assert cluster.running_on("db1") == ["host1"]


async def test_cancel_is_bounded_when_qemu_never_ends_the_stream(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration_rollback, "CANCEL_TIMEOUT_S", 0.2)
    source = cluster.agents["host1"]
    source.ignore_cancel = True
    source.vms["web1"].script = [S.ACTIVE]
    rec = await cluster.orchestrator.start("web1", "host2")
    await until_phase(cluster, rec.id, Phase.PRECOPY)
    await cluster.orchestrator.cancel(rec.id)
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and "cancelled by the user" in (done.reason or "")
    assert source.calls.count("cancel_migration") == 1
    assert source.vms["web1"].status is S.ACTIVE  # QEMU still streaming: we went on
    assert "web1" not in cluster.agents["host2"].vms
