"""Migrations with --datastore: which disks move, and a rollback deletes only what the
job itself created (issue 9, defect 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.control import migration_storage as storage
from ferry.domain.compat import RefusalReason
from ferry.domain.errors import Incompatible
from ferry.domain.migration import Phase
from ferry.domain.specs import DiskSpec
from tests.unit.fake_cluster import FakeCluster, facts, spec, unreachable

SHARED = DiskSpec(name="root", datastore="shared", path="app1.qcow2")
LOCAL = DiskSpec(name="data", datastore="local-host1", path="app1/data.qcow2")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FakeCluster]:
    c = await FakeCluster.open(tmp_path, {
        "host1": facts("host1", datastores=("shared", "local-host1")),
        "host2": facts("host2", datastores=("shared", "local-host2"))})
    yield c
    await c.close()


def test_a_disk_already_on_the_datastore_the_target_sees_stays_put() -> None:
    vm = spec("app1", disks=(SHARED,))
    assert storage.plan_disks(vm, "shared", target_sees=True) == ((), ())


def test_only_disks_elsewhere_are_copied() -> None:
    vm = spec("app1", disks=(SHARED, LOCAL))
    target, moved = storage.plan_disks(vm, "shared", target_sees=True)
    assert moved == (LOCAL,)
    assert target == (SHARED, DiskSpec(name="data", datastore="shared", path="app1/data.qcow2"))
    assert storage.copies(target, moved) == (target[1],)


def test_a_datastore_the_target_does_not_see_moves_every_disk() -> None:
    vm = spec("app1", disks=(SHARED,))
    target, moved = storage.plan_disks(vm, "shared", target_sees=False)
    assert moved == (SHARED,) and target == (SHARED,)


async def test_migrating_onto_the_datastore_the_disk_is_on_never_touches_it(
        cluster: FakeCluster) -> None:
    # The reported bug: PREPARING_TARGET failed and the rollback deleted the live disk.
    vm = spec("app1", disks=(SHARED,))
    await cluster.add_running_vm(vm, "host1")
    cluster.agents["host2"].images.add(("shared", "app1.qcow2"))  # shared: seen by both
    cluster.agents["host2"].faults["prepare_incoming"].append(unreachable("host2"))
    rec = await cluster.orchestrator.start("app1", "host2", datastore="shared")
    assert rec.target_disks == () and rec.moved_disks == ()  # memory only
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.created_images == ()
    for agent in cluster.agents.values():
        assert agent.deleted == [] and agent.created == []
    assert ("shared", "app1.qcow2") in cluster.agents["host2"].images
    assert cluster.running_on("app1") == ["host1"]


async def test_checking_refuses_a_target_path_that_exists(cluster: FakeCluster) -> None:
    vm = spec("app1", disks=(LOCAL,))
    await cluster.add_running_vm(vm, "host1")
    theirs = ("local-host2", "app1/data.qcow2")
    cluster.agents["host2"].images.add(theirs)
    refusals = await cluster.orchestrator.check("app1", "host2", "local-host2")
    assert [r.reason for r in refusals] == [RefusalReason.TARGET_PATH_EXISTS]
    assert "local-host2:app1/data.qcow2 on host host2 already exists" in refusals[0].message
    with pytest.raises(Incompatible, match="already exists"):
        await cluster.orchestrator.start("app1", "host2", datastore="local-host2")
    assert theirs in cluster.agents["host2"].images
    assert cluster.agents["host2"].deleted == []
    assert "prepare_incoming" not in cluster.agents["host2"].calls


async def test_rollback_deletes_exactly_the_images_the_job_created(
        cluster: FakeCluster) -> None:
    vm = spec("app1", disks=(LOCAL,))
    await cluster.add_running_vm(vm, "host1")
    other = ("local-host2", "somebody-else.qcow2")
    cluster.agents["host2"].images.add(other)
    cluster.agents["host1"].faults["start_outgoing"].append(unreachable("host1"))
    rec = await cluster.orchestrator.start("app1", "host2", datastore="local-host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED
    made = ("local-host2", "app1/data.qcow2")
    assert cluster.agents["host2"].created == [made]
    assert done.created_images == (DiskSpec(name="data", datastore="local-host2",
                                            path="app1/data.qcow2"),)
    assert cluster.agents["host2"].deleted == [made]
    assert other in cluster.agents["host2"].images
    assert ("local-host1", "app1/data.qcow2") in cluster.agents["host1"].images
    assert cluster.agents["host1"].deleted == []


async def test_a_path_that_appears_after_checking_is_not_deleted_by_the_rollback(
        cluster: FakeCluster) -> None:
    vm = spec("app1", disks=(LOCAL,))
    await cluster.add_running_vm(vm, "host1")
    theirs = ("local-host2", "app1/data.qcow2")
    target = cluster.agents["host2"]
    # created by someone else between CHECKING and PREPARING_TARGET: the agent refuses
    target.on_call["prepare_incoming"] = lambda: target.images.add(theirs)
    rec = await cluster.orchestrator.start("app1", "host2", datastore="local-host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and "already exists" in (done.reason or "")
    assert done.created_images == ()
    assert target.deleted == [] and theirs in target.images



@pytest.mark.parametrize("fault", ["stop_vm", "delete_image"])
async def test_images_a_rollback_could_not_delete_are_deleted_once_the_target_reports(
        cluster: FakeCluster, fault: str) -> None:
    """DISK_COPY broken by a silent source; the destination's agent fails the rollback's
    stop or delete: the images it created are recorded as left and deleted when its
    agent reports again, and nothing else is ever deleted."""
    vm = spec("app1", disks=(LOCAL,))
    await cluster.add_running_vm(vm, "host1")
    target = cluster.agents["host2"]
    theirs = ("local-host2", "other/disk.qcow2")  # not ours: never touched
    target.images.add(theirs)
    cluster.agents["host1"].faults["start_disk_mirrors"].append(unreachable("host1"))
    target.faults[fault] += [unreachable("host2")] * 2
    rec = await cluster.orchestrator.start("app1", "host2", datastore="local-host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    ours = DiskSpec(name="data", datastore="local-host2", path="app1/data.qcow2")
    assert done.phase is Phase.FAILED and done.created_images == (ours,)
    assert done.images_left == (ours,), done.reason
    assert "deleted once its agent answers again" in (done.reason or "")
    assert cluster.running_on("app1") == ["host1"]
    # its agent reports again: a stale destination is stopped first, then the image goes
    for _ in range(3):  # heartbeats
        infos = tuple([await target.vm(n) for n in list(target.vms)])
        await cluster.orchestrator.reap_orphans("host2", infos)
    assert (await cluster.store.migration(rec.id)).images_left == ()
    assert target.images == {theirs} and target.deleted[-1] == ("local-host2", ours.path)
    assert set(target.deleted) == {("local-host2", ours.path)}
