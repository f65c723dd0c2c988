"""A migration run by the real orchestrator over fake agents leaves its events in the
log: started, the lever the policy pulled, ended, each naming who caused it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.control import eventlog, metrics, migration_steps
from ferry.control.demand import Demand
from ferry.control.drs import Drs
from ferry.control.storage import Relocator
from ferry.domain.audit import Outcome
from ferry.domain.convergence import CONTINUE, Action, ActionKind, ConvergenceState
from ferry.domain.errors import Incompatible
from ferry.domain.events import SYSTEM, EventKind, EventQuery
from ferry.domain.migration import Phase, SourceStatus, StreamOptions
from ferry.domain.specs import DiskSpec
from tests.unit.fake_cluster import FakeCluster, spec


def postcopy_at_once(state: ConvergenceState, _: object) -> Action:
    return CONTINUE if state.postcopy else Action(kind=ActionKind.POSTCOPY,
                                                  reason="dirtying faster than sent")


async def test_started_lever_and_ended_with_the_token(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.setattr(migration_steps, "decide", postcopy_at_once)
    cluster = await FakeCluster.open(tmp_path)
    try:
        await cluster.add_running_vm(spec("web1"), "host1")
        cluster.agents["host1"].vms["web1"].script = [SourceStatus.ACTIVE,
                                                      SourceStatus.POSTCOPY_ACTIVE,
                                                      SourceStatus.COMPLETED]
        # As the API does for a request's token: the job's task inherits it.
        acting = eventlog.acting.set("token ops (t1)")
        try:
            rec = await cluster.orchestrator.start(
                "web1", "host2", StreamOptions(allow_postcopy=True))
        finally:
            eventlog.acting.reset(acting)
        done = await cluster.orchestrator.wait(rec.id, 30)
        assert done.phase is Phase.COMPLETED
        events = await cluster.store.events.page(EventQuery(after=0, vm="web1"))
        assert [e.kind for e in events] == [EventKind.MIGRATION_STARTED, EventKind.LEVER,
                                            EventKind.MIGRATION_ENDED]
        assert all(e.object == rec.id and e.actor == "token ops (t1)" for e in events)
        assert "dirtying faster than sent" in events[1].detail
        assert events[2].outcome is Outcome.OK and "levers postcopy" in events[2].detail
        # the same VM refused by CHECKING (it is on host2 now): started, then failed
        with pytest.raises(Exception, match="already runs on host2"):
            await cluster.orchestrator.start("web1", "host2")
        started, ended = (await cluster.store.events.page(EventQuery(limit=2)))[::-1]
        assert (started.kind, ended.kind) == (EventKind.MIGRATION_STARTED,
                                              EventKind.MIGRATION_ENDED)
        assert ended.outcome is Outcome.FAILED and "already runs on host2" in ended.detail
        assert ended.actor == SYSTEM  # no request's token here
    finally:
        await cluster.close()


async def test_a_maintenance_evacuation_logs_each_drs_move(tmp_path: Path) -> None:
    cluster = await FakeCluster.open(tmp_path)
    try:
        await cluster.add_running_vm(spec("web1"), "host1")
        cluster.agents["host1"].vms["web1"].script = [SourceStatus.COMPLETED]
        drs = Drs(cluster.store, cluster.inventory, cluster.orchestrator, Demand())
        result = await drs.enter_maintenance("host1")
        [moved] = result.evacuation.results
        assert moved.migration_id is not None
        await cluster.orchestrator.wait(moved.migration_id, 30)
        [move] = [e for e in await cluster.store.events.page(EventQuery(vm="web1"))
                  if e.kind is EventKind.DRS_MOVE]
        assert move.object == moved.migration_id and "host1 -> host2" in move.action
        assert "maintenance of host1" in move.detail
        # /metrics counts it from the log
        facts = await metrics.gather(cluster.store, drs)
        assert "ferry_drs_moves_total 1.0" in metrics.render(facts).decode()
    finally:
        await cluster.close()


async def test_a_relocation_refused_at_checking_logs_start_and_failed_end(
        tmp_path: Path) -> None:
    cluster = await FakeCluster.open(tmp_path)
    try:
        disk = DiskSpec(name="root", datastore="shared", path="web1/root.qcow2")
        await cluster.add_running_vm(spec("web1", disks=(disk,)), "host1")
        cluster.agents["host1"].images.clear()  # the image went missing
        relocator = Relocator(cluster.store, cluster.pool, cluster.bus)
        with pytest.raises(Incompatible, match="missing"):
            await relocator.start("web1", "fast")
        started, ended = await cluster.store.events.page(EventQuery(after=0, vm="web1"))
        assert (started.kind, ended.kind) == (EventKind.RELOCATION_STARTED,
                                              EventKind.RELOCATION_ENDED)
        assert "shared -> fast" in started.detail
        assert ended.outcome is Outcome.FAILED and "missing" in ended.detail
    finally:
        await cluster.close()
