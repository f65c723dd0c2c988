"""Scheduled tasks over the real store and orchestrator (fake agents): a run is claimed
once, acts through the orchestrator, and its result lands in the run history."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from ferry.control.demand import Demand
from ferry.control.drs import Drs
from ferry.control.schedules import Scheduler
from ferry.control.storage import Relocator
from ferry.domain.auth import Principal, TokenRole
from ferry.domain.errors import Forbidden, InvalidInput, NotFound
from ferry.domain.inventory import VmState
from ferry.domain.migration import Phase
from ferry.domain.schedules import (
    DrsApplyAction,
    MaintenanceAction,
    MigrateAction,
    RelocateAction,
    RunOutcome,
    ScheduleRun,
    ScheduleSpec,
    next_due,
)
from ferry.domain.specs import DiskSpec
from ferry.store.tables import ScheduleRunRow
from tests.unit.fake_cluster import FakeCluster, spec

EVERY_10_S = "* * * * * */10"
DISK = DiskSpec(name="root", datastore="shared", path="db1.qcow2")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FakeCluster]:
    c = await FakeCluster.open(tmp_path)
    await c.add_running_vm(spec("web1"), "host1")
    yield c
    await c.close()


def scheduler(c: FakeCluster) -> Scheduler:
    return Scheduler(c.store, c.orchestrator, Relocator(c.store, c.pool, c.bus),
                     Drs(c.store, c.inventory, c.orchestrator, Demand()), c.bus)


def migrate(cron: str = EVERY_10_S, **extra: object) -> ScheduleSpec:
    return ScheduleSpec.model_validate({
        "cron": cron, "action": MigrateAction(vm="web1", target="host2"), **extra})


async def until_ended(c: FakeCluster, schedule_id: str, at: int) -> ScheduleRun:
    for _ in range(2000):
        run = next(r for r in await c.store.schedules.runs(schedule_id)
                   if r.scheduled_at == at)
        if run.outcome.terminal:
            return run
        await asyncio.sleep(0.01)
    raise AssertionError("the run never ended")


async def test_a_due_run_migrates_once_and_records_the_migration(cluster: FakeCluster
                                                                 ) -> None:
    first, second = scheduler(cluster), scheduler(cluster)
    first.up_since = second.up_since = 0.0  # both loops up long before the due time
    task = await first.add(migrate(), None)
    due = next_due(task.spec, task.created_at)
    # two loops (or a loop and a restarted one) reach the same due time together
    await asyncio.gather(first.tick(due + 0.1), second.tick(due + 0.1))
    run = await until_ended(cluster, task.id, due)
    assert run.outcome is RunOutcome.SUCCEEDED and len(run.migrations) == 1, run
    assert "completed" in run.detail and run.started_at and run.ended_at
    migrations = await cluster.store.migrations()
    assert [m.id for m in migrations] == list(run.migrations)
    assert migrations[0].phase is Phase.COMPLETED
    assert migrations[0].cause is not None and task.id in migrations[0].cause
    assert cluster.running_on("web1") == ["host2"]
    # looked at again, later in the same period: nothing new
    await first.tick(due + 5)
    assert len(await cluster.store.schedules.runs(task.id)) == 1
    await first.close()
    await second.close()


async def test_a_run_due_while_down_is_reported_missed_and_not_run(cluster: FakeCluster
                                                                   ) -> None:
    sched = scheduler(cluster)
    task = await sched.add(migrate(), None)
    due = next_due(task.spec, task.created_at)
    sched.up_since = due + 3  # the loop came up after the due time: it was down then
    await sched.tick(due + 4)
    [run] = await cluster.store.schedules.runs(task.id)
    assert run.outcome is RunOutcome.MISSED and run.scheduled_at == due
    assert "while the control plane was down" in run.detail
    assert await cluster.store.migrations() == []
    view = (await sched.views())[0]
    assert view.missed_runs == 1 and view.last_run == run and view.next_run_at > due
    await sched.close()


async def test_policy_run_runs_a_missed_one_late(cluster: FakeCluster) -> None:
    sched = scheduler(cluster)
    task = await sched.add(migrate(missed="run", grace_s=60), None)
    due = next_due(task.spec, task.created_at)
    sched.up_since = due + 3
    await sched.tick(due + 4)
    run = await until_ended(cluster, task.id, due)
    assert run.outcome is RunOutcome.SUCCEEDED and run.late
    await sched.close()


async def test_a_refused_action_is_a_failed_run_with_the_reason(cluster: FakeCluster
                                                               ) -> None:
    sched = scheduler(cluster)
    sched.up_since = 0.0
    task = await sched.add(migrate(), None)
    await cluster.store.update_vm("web1", host="host2")  # already there by run time
    due = next_due(task.spec, task.created_at)
    await sched.tick(due + 0.1)
    run = await until_ended(cluster, task.id, due)
    assert run.outcome is RunOutcome.FAILED and run.detail, run
    await sched.close()


@pytest.mark.parametrize("action, says", [
    (MigrateAction(vm="nope", target="host2"), "there is no VM 'nope'"),
    (MigrateAction(vm="web1", target="host9"), "there is no host 'host9'"),
    (RelocateAction(vm="db1", datastore="fast"), "there is no datastore 'fast'"),
    (RelocateAction(vm="db1", datastore="shared", disk="data"), "no disk 'data'"),
    (RelocateAction(vm="web1", datastore="shared"), "has 0 disks: say which moves"),
    (MaintenanceAction(host="host9"), "there is no host 'host9'"),
])
async def test_an_unknown_object_is_refused_and_nothing_stored(
        cluster: FakeCluster, action: object, says: str) -> None:
    await cluster.add_running_vm(spec("db1", disks=(DISK,), mac="52:54:00:00:00:02"),
                                 "host2")
    with pytest.raises((NotFound, InvalidInput), match=says):
        await scheduler(cluster).add(ScheduleSpec.model_validate(
            {"cron": "0 2 * * *", "action": action}), None)
    assert await cluster.store.schedules.all() == []


async def test_a_bad_cron_is_refused_and_nothing_stored(cluster: FakeCluster) -> None:
    with pytest.raises(InvalidInput, match="the hour field '24' is not valid"):
        await scheduler(cluster).add(migrate("0 24 * * *"), None)
    assert await cluster.store.schedules.all() == []


async def test_scheduling_needs_the_actions_own_privilege(cluster: FakeCluster) -> None:
    viewer = Principal(token_id="v1", name="eve", role=TokenRole.VIEWER)
    with pytest.raises(Forbidden, match=r"lacks the privilege vm\.migrate"):
        await scheduler(cluster).add(migrate(), viewer)
    operator = Principal(token_id="o1", name="op", role=TokenRole.OPERATOR)
    task = await scheduler(cluster).add(ScheduleSpec(cron="@daily", action=DrsApplyAction()),
                                        operator)
    assert task.created_by_name == "op"
    with pytest.raises(Forbidden):
        await scheduler(cluster).remove(task.id, viewer)


async def test_a_run_whose_creator_token_is_gone_fails_without_acting(cluster: FakeCluster
                                                                     ) -> None:
    sched = scheduler(cluster)
    sched.up_since = 0.0
    ghost = Principal(token_id="gone", name="ghost", role=TokenRole.ADMIN)
    task = await sched.add(migrate(), ghost)
    due = next_due(task.spec, task.created_at)
    await sched.tick(due + 0.1)
    run = await until_ended(cluster, task.id, due)
    assert run.outcome is RunOutcome.FAILED and "'ghost'" in run.detail
    assert await cluster.store.migrations() == []
    await sched.close()


async def test_after_a_restart_a_started_run_is_followed_and_a_bare_one_interrupted(
        cluster: FakeCluster) -> None:
    before = scheduler(cluster)
    task = await before.add(migrate(), None)
    started = await cluster.orchestrator.start("web1", "host2")
    await cluster.store.schedules.claim(ScheduleRun(
        id=0, schedule_id=task.id, scheduled_at=100, outcome=RunOutcome.RUNNING,
        started_at=time.time(), migrations=(started.id,)))
    other = await before.add(ScheduleSpec(cron="@daily", action=DrsApplyAction()), None)
    await cluster.store.schedules.claim(ScheduleRun(
        id=0, schedule_id=other.id, scheduled_at=100, outcome=RunOutcome.RUNNING))
    after = scheduler(cluster)
    await after.start()  # as a restarted control plane does
    assert (await until_ended(cluster, task.id, 100)).outcome is RunOutcome.SUCCEEDED
    bare = await until_ended(cluster, other.id, 100)
    assert bare.outcome is RunOutcome.INTERRUPTED and "not run again" in bare.detail
    await after.close()


async def test_removing_a_task_removes_its_history(cluster: FakeCluster) -> None:
    sched = scheduler(cluster)
    task = await sched.add(migrate(), None)
    await cluster.store.schedules.claim(ScheduleRun(
        id=0, schedule_id=task.id, scheduled_at=100, outcome=RunOutcome.MISSED))
    assert (await cluster.store.schedules.claim(ScheduleRun(
        id=0, schedule_id=task.id, scheduled_at=100, outcome=RunOutcome.RUNNING))) is None
    await sched.remove(task.id, None)
    assert await cluster.store.schedules.runs(task.id) == []
    with pytest.raises(NotFound, match="see `ferry schedule list`"):
        await cluster.store.schedules.get(task.id)
    # a loop that read the task before its removal claims nothing
    assert (await cluster.store.schedules.claim(ScheduleRun(
        id=0, schedule_id=task.id, scheduled_at=200, outcome=RunOutcome.RUNNING))) is None


async def test_the_database_itself_refuses_a_second_row_for_one_scheduled_time(
        cluster: FakeCluster) -> None:
    """The guarantee is the unique constraint, not the store's checks before it."""
    session = cluster.store.schedules._session
    async with session.begin() as s:
        s.add(ScheduleRunRow(schedule_id="t1", scheduled_at=100, run_json="{}",
                             outcome="running"))
    with pytest.raises(IntegrityError):
        async with session.begin() as s:
            s.add(ScheduleRunRow(schedule_id="t1", scheduled_at=100, run_json="{}",
                                 outcome="running"))


async def test_a_shutdown_lets_a_starting_run_record_its_job_then_follows_it_after(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    sched = scheduler(cluster)
    sched.up_since = 0.0
    task = await sched.add(migrate(), None)
    real_start = cluster.orchestrator.start

    async def slow_start(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.3)  # the shutdown comes while the action is starting
        return await real_start(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cluster.orchestrator, "start", slow_start)
    due = next_due(task.spec, task.created_at)
    await sched.tick(due + 0.1)
    await asyncio.sleep(0.05)
    await sched.close()
    [run] = await cluster.store.schedules.runs(task.id)
    assert run.outcome is RunOutcome.RUNNING and len(run.migrations) == 1, run
    after = scheduler(cluster)
    await after.start()
    assert (await until_ended(cluster, task.id, due)).outcome is RunOutcome.SUCCEEDED
    await after.close()


@pytest.mark.parametrize("action, outcome, says", [
    (MaintenanceAction(host="host1"), RunOutcome.SUCCEEDED,
     "host host1 in maintenance: 1 migrations started"),
    (MaintenanceAction(host="host1", on=False), RunOutcome.SUCCEEDED,
     "host host1 out of maintenance"),
    (DrsApplyAction(), RunOutcome.SUCCEEDED, "DRS plan applied"),
    # the relocator's own refusal (db1 is stopped by then), as a user's request gets it
    (RelocateAction(vm="db1", datastore="shared"), RunOutcome.FAILED,
     "a live disk move needs it running"),
])
async def test_every_action_runs_through_its_service(
        cluster: FakeCluster, action: object, outcome: RunOutcome, says: str) -> None:
    await cluster.add_running_vm(spec("db1", disks=(DISK,), mac="52:54:00:00:00:02"),
                                 "host2")
    sched = scheduler(cluster)
    sched.up_since = 0.0
    task = await sched.add(ScheduleSpec.model_validate(
        {"cron": EVERY_10_S, "action": action}), None)
    await cluster.store.update_vm("db1", state=VmState.DEFINED)
    due = next_due(task.spec, task.created_at)
    await sched.tick(due + 0.1)
    run = await until_ended(cluster, task.id, due)
    assert run.outcome is outcome and says in run.detail, run
    if isinstance(action, MaintenanceAction) and action.on:
        assert (await cluster.store.host("host1")).maintenance
        assert cluster.running_on("web1") == ["host2"]
    await sched.close()
