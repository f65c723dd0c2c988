"""HA's pure rules (ferry/domain/ha.py) and the control plane's restart loop
(ferry/control/ha.py) over the fake cluster, with a scripted monotonic clock."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.agent.models import AgentVmState, DatastoreView, LeaseView, VmInfo
from ferry.control.demand import Demand
from ferry.control.drs import Drs
from ferry.control.ha import Ha, PowerFor
from ferry.domain.drs import Rule, RuleKind
from ferry.domain.errors import InvalidInput, NoCapacity
from ferry.domain.events import EventKind, EventQuery
from ferry.domain.ha import (
    HaSettings,
    Health,
    Priority,
    Protected,
    backoff,
    health,
    reserve,
    restart_order,
)
from ferry.domain.inventory import VmState
from ferry.domain.migration import Phase
from ferry.domain.records import MigrationRecord
from ferry.power import PowerDriver, PowerState
from tests.unit.fake_cluster import FakeCluster, FakeVm, facts, spec

S = HaSettings()


def test_health_from_two_heartbeats() -> None:
    assert health(10.0, 9.0, None, S) is Health.CONNECTED
    assert health(10.0, 5.0, 9.0, S) is Health.ISOLATED
    assert health(10.0, 5.0, 5.0, S) is Health.DEAD
    assert health(10.0, None, None, S) is Health.DEAD


@given(st.lists(st.tuples(st.sampled_from(list(Priority)), st.integers(0, 99)),
                max_size=12, unique_by=lambda t: t[1]))
def test_restart_order_is_by_priority_and_never_disabled(vms: list[tuple[Priority, int]]
                                                         ) -> None:
    order = restart_order(Protected(name=f"v{n:02d}", host="h", memory_mib=1, priority=p)
                          for p, n in vms)
    assert all(v.priority is not Priority.DISABLED for v in order)
    ranks = [v.priority.rank for v in order]
    assert ranks == sorted(ranks)
    assert len(order) == sum(1 for p, _ in vms if p is not Priority.DISABLED)


def test_backoff_doubles_up_to_a_ceiling() -> None:
    assert [backoff(n, S) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 30.0]


def test_reserve_counts_what_survivors_already_run() -> None:
    hosts = {"a": 1000, "b": 1000, "c": 1000}
    vms = [Protected(name="x", host="a", memory_mib=600),
           Protected(name="y", host="b", memory_mib=600),
           Protected(name="z", host="c", memory_mib=300, priority=Priority.DISABLED)]
    assert reserve(hosts, vms, 1).ok
    more = [*vms, Protected(name="w", host="c", memory_mib=500)]
    found = reserve(hosts, more, 1)
    assert not found.ok and "would fit on no other host" in found.reason
    assert reserve(hosts, more, 0).ok


@given(st.lists(st.integers(256, 4096), min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 3), st.integers(16, 1024), st.booleans()),
                max_size=10),
       st.integers(0, 2))
def test_an_admitted_cluster_has_the_memory_for_any_failure(
        caps: list[int], placed: list[tuple[int, int, bool]], failures: int) -> None:
    hosts = {f"h{i}": c for i, c in enumerate(caps)}
    vms = [Protected(name=f"v{i}", host=f"h{h % len(caps)}", memory_mib=m,
                     priority=Priority.MEDIUM if prot else Priority.DISABLED)
           for i, (h, m, prot) in enumerate(placed)]
    if not reserve(hosts, vms, failures).ok:
        return
    # Necessary: for every set of failed hosts, the protected VMs of the failed ones fit
    # in the room the survivors have left beside their own VMs.
    assert len(caps) > failures or not any(v.priority is Priority.MEDIUM for v in vms)
    for down in itertools.combinations(sorted(hosts), min(failures, len(caps))):
        up = [h for h in hosts if h not in down]
        moving = sum(v.memory_mib for v in vms
                     if v.host in down and v.priority is not Priority.DISABLED)
        room = sum(max(0, hosts[h] - sum(v.memory_mib for v in vms if v.host == h))
                   for h in up)
        assert moving <= room


# --- the loop over the fake cluster -------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def cluster(tmp_path: Path) -> Any:
    hosts = {h: facts(h, memory_mib=1024) for h in ("host1", "host2", "host3")}
    c = await FakeCluster.open(tmp_path, hosts)
    yield c
    await c.close()


def make_ha(cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch, clock: Clock,
            power: PowerFor | None = None) -> Ha:
    drs = Drs(cluster.store, cluster.inventory, cluster.orchestrator, Demand())
    started: list[tuple[str, str]] = []
    taken_over: list[str] = []
    for name, agent in cluster.agents.items():
        async def create_vm(s: Any, paused: bool = False, lease_wait_s: float = 0.0,
                            lease_take_over: bool = False,
                            _agent: Any = agent, _name: str = name) -> VmInfo:
            _agent.vms[s.name] = FakeVm(spec=s, state=AgentVmState.RUNNING)
            started.append((_name, s.name))
            if lease_take_over:
                taken_over.append(s.name)
            return VmInfo(name=s.name, uuid=s.uuid, state=AgentVmState.RUNNING, pid=1,
                          spec=s)
        monkeypatch.setattr(agent, "create_vm", create_vm, raising=False)
    ha = Ha(cluster.store, cluster.inventory, drs, cluster.pool, clock=clock, power=power)
    ha.started = started  # type: ignore[attr-defined]
    ha.taken_over = taken_over  # type: ignore[attr-defined]
    return ha


class FakePower:
    """A host's power driver: power_off switches it off unless `stuck` (then it still
    reads ON, as a BMC whose command did not take)."""

    def __init__(self, stuck: bool = False) -> None:
        self.state, self.stuck, self.offs = PowerState.ON, stuck, 0

    async def power_on(self) -> None:
        self.state = PowerState.ON

    async def power_off(self) -> None:
        self.offs += 1
        if not self.stuck:
            self.state = PowerState.OFF

    async def status(self) -> PowerState:
        return self.state


def kill_host1(ha: Ha, clock: Clock) -> Callable[[], Awaitable[None]]:
    async def rounds() -> None:
        for step in range(2, 8):  # host1 silent on both heartbeats
            clock.t += 1.0
            await beat(ha, ["host2", "host3"], {"host1": 1, "host2": step, "host3": step})
            await ha.round()
    return rounds


async def beat(ha: Ha, hosts: list[str], counters: dict[str, int],
               leases: dict[str, LeaseView] | None = None) -> None:
    for h in hosts:
        await ha.on_heartbeat(h, DatastoreView(datastore="shared", ok=True,
                                               hosts=dict(counters), leases=leases or {}))


async def test_a_dead_hosts_vms_restart_elsewhere_by_priority(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    ha = make_ha(cluster, monkeypatch, clock)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    for i, prio in enumerate((Priority.LOW, Priority.HIGH, Priority.DISABLED,
                              Priority.MEDIUM)):
        vm = spec(f"vm{i}", memory_mib=128, mac=f"52:54:00:00:00:1{i}")
        await cluster.add_running_vm(vm, "host1")
        await cluster.store.ha.set_priority(vm.name, prio)
    await beat(ha, ["host1", "host2", "host3"], {"host1": 1, "host2": 1, "host3": 1})
    assert await ha.round() == []
    # host1 goes silent on both heartbeats; host2 and host3 keep beating.
    for step in range(2, 8):
        clock.t += 1.0
        await beat(ha, ["host2", "host3"], {"host1": 1, "host2": step, "host3": step})
        await ha.round()
    started = ha.started  # type: ignore[attr-defined]
    assert [vm for _, vm in started] == ["vm1", "vm3", "vm0"]  # high, medium, low
    assert all(host != "host1" for host, _ in started)
    for _, name in started:
        rec = await cluster.store.vm(name)
        assert rec.host != "host1" and rec.state is VmState.RUNNING
    assert (await cluster.store.vm("vm2")).host == "host1"  # disabled: stays down
    events = await cluster.store.events.page(EventQuery(vm="vm1"))
    assert any(e.action == "vm restarted" and e.kind is EventKind.HA_RESTART
               for e in events)


async def test_an_isolated_hosts_vms_wait_for_their_leases(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    ha = make_ha(cluster, monkeypatch, clock)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    await cluster.add_running_vm(spec("web", memory_mib=128), "host1")
    held = {"web": LeaseView(owner="host1", generation=1, counter=5)}
    for step in range(1, 8):  # host1 silent on the network, its datastore counter moves
        clock.t += 1.0
        await beat(ha, ["host2", "host3"], {"host1": step, "host2": step, "host3": step},
                   held)
        assert await ha.round() == []
    assert ha.health(["host1"], S)["host1"] is Health.ISOLATED
    freed = {"web": LeaseView(owner="host1", generation=1, counter=6, released=True)}
    clock.t += 1.0
    await beat(ha, ["host2", "host3"], {"host1": 9, "host2": 9, "host3": 9}, freed)
    assert await ha.round() == ["web"]


async def test_restarts_honour_must_rules(cluster: FakeCluster,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    ha = make_ha(cluster, monkeypatch, clock)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    await cluster.add_running_vm(spec("db", memory_mib=128), "host1")
    await cluster.store.drs.add_rule(Rule(name="pin", kind=RuleKind.VM_HOST_MUST,
                                          vms=("db",), hosts=("host1", "host3")))
    for step in range(1, 8):
        clock.t += 1.0
        await beat(ha, ["host2", "host3"], {"host2": step, "host3": step})
        await ha.round()
    assert (await cluster.store.vm("db")).host == "host3"


@pytest.mark.parametrize("stuck", [False, True])
async def test_a_dead_host_confirmed_off_has_its_leases_taken_at_once(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch, stuck: bool) -> None:
    """Power fencing: the dead host is powered off once; only when its driver then
    reads it OFF do the restarts take the leases without waiting for them to expire."""
    clock = Clock()
    drivers = {h: FakePower(stuck=stuck) for h in ("host1", "host2", "host3")}

    async def power(host: str) -> PowerDriver:
        return drivers[host]
    ha = make_ha(cluster, monkeypatch, clock, power)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    await cluster.add_running_vm(spec("web", memory_mib=128), "host1")
    await beat(ha, ["host1", "host2", "host3"], {"host1": 1, "host2": 1, "host3": 1})
    await ha.round()
    await kill_host1(ha, clock)()
    assert drivers["host1"].offs == 1  # once per death, not every round
    assert drivers["host2"].offs == drivers["host3"].offs == 0
    assert [vm for _, vm in ha.started] == ["web"]  # type: ignore[attr-defined]
    assert ha.taken_over == ([] if stuck else ["web"])  # type: ignore[attr-defined]
    actions = {(e.action, e.outcome.value)
               for e in await cluster.store.events.page(EventQuery(limit=50))}
    assert (("host fencing", "failed") if stuck else ("host fenced", "ok")) in actions


async def test_a_control_plane_that_hears_too_few_hosts_fences_none(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut off itself, the control plane finds most hosts silent: powering them off would
    take healthy hosts down, so it fences none (the leases decide, as without fencing)."""
    clock = Clock()
    drivers = {h: FakePower() for h in ("host1", "host2", "host3")}

    async def power(host: str) -> PowerDriver:
        return drivers[host]
    ha = make_ha(cluster, monkeypatch, clock, power)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    await cluster.add_running_vm(spec("web", memory_mib=128), "host1")
    await cluster.add_running_vm(spec("db", memory_mib=128, mac="52:54:00:00:00:22"),
                                 "host2")
    for step in range(2, 8):  # only host3 is heard: two dead against one connected
        clock.t += 1.0
        await beat(ha, ["host3"], {"host1": 1, "host2": 1, "host3": step})
        await ha.round()
    assert [d.offs for d in drivers.values()] == [0, 0, 0]
    assert ha.taken_over == []  # type: ignore[attr-defined]
    for _ in range(8, 14):  # and hearing nobody at all
        clock.t += 1.0
        await ha.round()
    assert [d.offs for d in drivers.values()] == [0, 0, 0]


async def test_without_a_power_driver_the_leases_expire_first(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()

    async def power(host: str) -> PowerDriver:
        raise InvalidInput(f"host {host} has no power driver")
    ha = make_ha(cluster, monkeypatch, clock, power)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    await cluster.add_running_vm(spec("web", memory_mib=128), "host1")
    await kill_host1(ha, clock)()
    assert [vm for _, vm in ha.started] == ["web"]  # type: ignore[attr-defined]
    assert ha.taken_over == []  # type: ignore[attr-defined]


async def test_a_restart_found_running_is_recorded_not_repeated(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader that died after its target started the VM and before recording it:
    the next leader finds the copy in the target's report and records it there."""
    clock = Clock()
    ha = make_ha(cluster, monkeypatch, clock)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    web = spec("web", memory_mib=128)
    await cluster.add_running_vm(web, "host1")
    cluster.pool.reported["host3"] = {"web": VmInfo(
        name="web", uuid=web.uuid, state=AgentVmState.RUNNING, pid=7, spec=web)}
    await kill_host1(ha, clock)()
    assert ha.started == []  # type: ignore[attr-defined]
    rec = await cluster.store.vm("web")
    assert (rec.host, rec.state) == ("host3", VmState.RUNNING)
    events = await cluster.store.events.page(EventQuery(vm="web"))
    assert any(e.action == "vm restarted" and "found running on host3" in e.detail
               for e in events)


async def test_admission_control_refuses_what_breaks_the_reserve(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    ha = make_ha(cluster, monkeypatch, Clock())
    await cluster.add_running_vm(spec("a", memory_mib=600), "host1")
    await cluster.add_running_vm(spec("b", memory_mib=600, mac="52:54:00:00:00:02"), "host2")
    big = spec("c", memory_mib=600, mac="52:54:00:00:00:03")
    await ha.admit(big, "host3")  # HA disabled: no admission control
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    with pytest.raises(NoCapacity, match="admission control"):
        await ha.admit(big, "host3")
    await ha.admit(spec("d", memory_mib=200, mac="52:54:00:00:00:04"), "host3")
    status = await ha.status()
    assert status.reserve.ok and status.reserve.protected_mib == 1200


async def test_a_vm_a_migration_still_drives_is_left_to_it(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the switch the VM is recorded running on the target while the migration
    still decides (RESUMING_TARGET waits for a silent destination): HA restarting it
    from its disks meanwhile would race the job's own end. The other VM is restarted."""
    clock = Clock()
    ha = make_ha(cluster, monkeypatch, clock)
    await cluster.store.ha.set_settings(HaSettings(enabled=True))
    for name, mac in (("moving", "52:54:00:00:00:21"), ("still", "52:54:00:00:00:22")):
        await cluster.add_running_vm(spec(name, memory_mib=128, mac=mac), "host1")
    await cluster.store.add_migration(MigrationRecord(
        id="m1", vm="moving", source="host2", target="host1",
        phase=Phase.RESUMING_TARGET, switched=True, created_at=time.time()))
    await beat(ha, ["host1", "host2", "host3"], {"host1": 1, "host2": 1, "host3": 1})
    await kill_host1(ha, clock)()
    assert [vm for _, vm in ha.started] == ["still"]  # type: ignore[attr-defined]
    assert (await cluster.store.vm("moving")).host == "host1"
