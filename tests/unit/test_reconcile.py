"""The store against the agents' reports: every row of the table in
ferry/domain/reconcile.py, and the control plane acting only on a finding seen twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.agent.models import AgentVmState, VmInfo
from ferry.control.agents import AgentPool
from ferry.control.reconcile import BusyVms, Reconciler
from ferry.domain.events import EventQuery
from ferry.domain.inventory import VmState
from ferry.domain.reconcile import FindingKind, reconcile
from ferry.domain.records import VmRecord
from ferry.store import Store
from ferry.store.store import sqlite_url
from tests.unit.fake_cluster import FakeCluster, FakeVm, facts, spec

HOSTS = {"host1", "host2", "host3"}


def vm(state: VmState, host: str = "host1") -> VmRecord:
    return VmRecord(spec=spec("web1", mac="52:54:00:00:00:01"), host=host, state=state)


@pytest.mark.parametrize(("state", "reports", "connected", "kind", "new_state", "host"), [
    # recorded running, no copy anywhere: it crashed
    (VmState.RUNNING, {}, HOSTS, FindingKind.CRASHED, VmState.CRASHED, "host1"),
    # recorded on host1, runs on host2 only
    (VmState.RUNNING, {"host2": {"web1": True}}, HOSTS, FindingKind.MOVED,
     VmState.RUNNING, "host2"),
    # not on host1, and host3 is silent: in doubt
    (VmState.RUNNING, {}, {"host1", "host2"}, FindingKind.IN_DOUBT, VmState.UNKNOWN,
     "host1"),
    # running twice
    (VmState.RUNNING, {"host1": {"web1": True}, "host2": {"web1": True}}, HOSTS,
     FindingKind.DOUBLE, VmState.UNKNOWN, "host1"),
    # stopped in the inventory, but a copy runs
    (VmState.DEFINED, {"host3": {"web1": True}}, HOSTS, FindingKind.UNEXPECTED,
     VmState.UNKNOWN, "host1"),
    # in doubt, found running once
    (VmState.UNKNOWN, {"host2": {"web1": True}}, HOSTS, FindingKind.RESOLVED,
     VmState.RUNNING, "host2"),
    # in doubt, no copy anywhere
    (VmState.UNKNOWN, {}, HOSTS, FindingKind.CRASHED, VmState.CRASHED, "host1"),
])
def test_table(state: VmState, reports: dict[str, dict[str, bool]], connected: set[str],
               kind: FindingKind, new_state: VmState, host: str) -> None:
    full = {h: reports.get(h, {}) for h in connected}
    [found] = reconcile([vm(state)], full, HOSTS, connected, set())
    assert (found.kind, found.state, found.host) == (kind, new_state, host)


@pytest.mark.parametrize(("state", "reports", "connected"), [
    (VmState.RUNNING, {"host1": {"web1": True}}, HOSTS),  # as recorded
    (VmState.RUNNING, {"host1": {"web1": False}}, HOSTS),  # paused there: still there
    (VmState.RUNNING, {}, {"host2", "host3"}),  # its host is silent: heartbeats say so
    (VmState.UNKNOWN, {"host2": {"web1": True}}, {"host1", "host2"}),  # host3 silent
    (VmState.UNKNOWN, {"host1": {"web1": False}}, HOSTS),  # a paused copy: operator
    (VmState.DEFINED, {}, HOSTS),
])
def test_no_finding_without_evidence(state: VmState, reports: dict[str, dict[str, bool]],
                                     connected: set[str]) -> None:
    full = {h: reports.get(h, {}) for h in connected}
    assert reconcile([vm(state)], full, HOSTS, connected, set()) == []


def test_a_stale_paused_source_beside_the_recorded_copy_is_no_finding() -> None:
    # switched without the source's agent: the source's paused copy (postmigrate) is
    # stopped by the leftover reaper once its agent reports; the VM stays on host2
    reports = {"host1": {"web1": False}, "host2": {"web1": True}, "host3": {}}
    assert reconcile([vm(VmState.RUNNING, "host2")], reports, HOSTS, HOSTS, set()) == []


async def test_the_leftover_reaper_stops_a_stale_source_never_the_recorded_copy(
        tmp_path: Path) -> None:
    cluster = await FakeCluster.open(tmp_path)
    try:
        await cluster.add_running_vm(spec("web1"), "host2")
        stale = FakeVm(spec=spec("web1"), state=AgentVmState.MIGRATED)
        cluster.agents["host1"].vms["web1"] = stale
        infos = [await a.vm("web1") for a in cluster.agents.values()]
        for host, info in zip(cluster.agents, infos, strict=True):
            await cluster.orchestrator.reap_orphans(host, (info,))
        assert "web1" not in cluster.agents["host1"].vms
        assert cluster.running_on("web1") == ["host2"]
        assert "resume_vm" not in cluster.agents["host1"].calls
    finally:
        await cluster.close()


def test_busy_and_migrating_vms_are_not_judged() -> None:
    assert reconcile([vm(VmState.RUNNING)], {h: {} for h in HOSTS}, HOSTS, HOSTS,
                     {"web1"}) == []
    assert reconcile([vm(VmState.MIGRATING)], {h: {} for h in HOSTS}, HOSTS, HOSTS,
                     set()) == []


async def test_a_finding_is_applied_only_when_seen_twice(tmp_path: Path) -> None:
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    try:
        for h in sorted(HOSTS):
            await store.record_heartbeat(facts(h), f"https://{h}")
        await store.add_vm(vm(VmState.RUNNING))
        pool = AgentPool()
        for h in HOSTS:
            pool.report(h, ())
        busy = BusyVms()
        rec = Reconciler(store, pool, busy)
        assert await rec.round() == []  # first sighting: wait
        with busy.hold("web1"):  # a request is changing it: not judged
            assert await rec.round() == []
        assert await rec.round() == []  # seen again after the gap: first sighting anew
        [applied] = await rec.round()
        assert applied.kind is FindingKind.CRASHED
        assert (await store.vm("web1")).state is VmState.CRASHED
        events = await store.events.page(EventQuery())
        assert events[0].kind == "reconcile" and "no host runs it" in events[0].detail
        # back on host2 (say, an operator started it there by hand): recorded there
        pool.report("host2", (VmInfo(name="web1", uuid=(await store.vm("web1")).spec.uuid,
                                     state=AgentVmState.RUNNING, pid=1,
                                     spec=(await store.vm("web1")).spec),))
        assert await rec.round() == []
        [seen] = await rec.round()
        assert seen.kind is FindingKind.UNEXPECTED
        assert (await store.vm("web1")).state is VmState.UNKNOWN
        [resolved] = [*await rec.round(), *await rec.round()]
        assert resolved.kind is FindingKind.RESOLVED
        now = await store.vm("web1")
        assert (now.state, now.host) == (VmState.RUNNING, "host2")
    finally:
        await store.close()


async def test_a_vm_in_doubt_cannot_be_started(tmp_path: Path) -> None:
    from ferry.domain.errors import Conflict
    from tests.unit.fake_cluster import FakeCluster

    cluster = await FakeCluster.open(tmp_path)
    try:
        await cluster.store.add_vm(vm(VmState.UNKNOWN))
        with pytest.raises(Conflict, match="in doubt"):
            await cluster.inventory.start_vm("web1")
        assert cluster.running_on("web1") == []
    finally:
        await cluster.close()
