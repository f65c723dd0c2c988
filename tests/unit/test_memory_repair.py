"""The engine's memory check at switchover over fake agents (the pages a TCG migration
can leave stale are repaired before the destination runs; what cannot be repaired rolls
back to the source). The real memfd path is in test_memory_check.py and the lab test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ferry.domain.errors import HostUnavailable
from ferry.domain.memory_check import VerifyMemory
from ferry.domain.migration import Phase, RollbackKind, StreamOptions
from tests.unit.fake_cluster import FakeAgent, FakeCluster, web1_on_host1

STALE = {3, 700, 1000}  # pages in chunks 0 and 1


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FakeCluster]:
    c = await web1_on_host1(tmp_path)
    yield c
    await c.close()


def stale_once(target: FakeAgent) -> Callable[[], None]:
    """A hook that makes the destination's copy stale at the first digest request."""
    done = []

    def hook() -> None:
        if not done:
            done.append(True)
            target.vms["web1"].stale = set(STALE)
    return hook


async def test_stale_pages_are_copied_again_before_the_destination_runs(
        cluster: FakeCluster) -> None:
    target = cluster.agents["host2"]
    target.on_call["ram_digests"] = stale_once(target)
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    check = done.memory_check
    assert check is not None and check.skipped is None
    assert (check.chunks, check.differing_chunks, check.repaired_pages) == (128, 2, 3)
    assert target.vms["web1"].stale == set()
    # the repair came before the destination ran
    calls = target.calls
    assert calls.index("write_ram_pages") < calls.index("resume_vm")
    assert cluster.running_on("web1") == ["host2"]


async def test_a_copy_that_cannot_be_repaired_stays_unused(cluster: FakeCluster) -> None:
    target = cluster.agents["host2"]
    target.on_call["ram_digests"] = stale_once(target)
    target.faults["write_ram_pages"].append(HostUnavailable("agent of host2 is unreachable"))
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.FAILED and done.rollback is RollbackKind.UNDO
    assert "could not be repaired" in (done.reason or "")
    assert "resume_vm" not in target.calls  # the stale copy never ran
    assert cluster.running_on("web1") == ["host1"]


async def test_off_means_not_checked_and_an_unanswerable_check_is_skipped(
        cluster: FakeCluster) -> None:
    rec = await cluster.orchestrator.start(
        "web1", "host2", StreamOptions(verify_memory=VerifyMemory.OFF))
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED and done.memory_check is None
    assert "ram_digests" not in cluster.agents["host2"].calls
    # The digests are asked for before the destination is confirmed paused: one
    # refusal is asked again (the check runs); a second means it cannot be answered.
    cluster.agents["host1"].faults["ram_digests"].append(
        HostUnavailable("agent of host1 is unreachable"))
    rec = await cluster.orchestrator.start("web1", "host1")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED
    assert done.memory_check is not None and done.memory_check.skipped is None
    assert done.memory_check.chunks > 0
    cluster.agents["host2"].faults["ram_digests"].extend(
        [HostUnavailable("agent of host2 is unreachable")] * 2)
    rec = await cluster.orchestrator.start("web1", "host2")
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED
    assert done.memory_check is not None
    assert "unreachable" in (done.memory_check.skipped or "")
