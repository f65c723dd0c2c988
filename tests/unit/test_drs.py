"""DRS planner: examples of each behaviour, then its promises as hypothesis properties."""

from __future__ import annotations

import pytest

from ferry.domain.drs import (
    ClusterSnapshot,
    DrsHost,
    DrsSettings,
    DrsVm,
    Plan,
    Rule,
    RuleKind,
    evacuate,
    imbalance,
    place_initial,
    plan,
    smooth,
)
from ferry.domain.errors import NotFound

GIB = 1024


def host(name: str, cpus: int = 8, mem: int = 32 * GIB, **kw: object) -> DrsHost:
    return DrsHost(name=name, cpus=cpus, memory_mib=mem, **kw)  # type: ignore[arg-type]


def vm(name: str, on: str, mem: int = 4 * GIB, cpu: float = 1.0, **kw: object) -> DrsVm:
    return DrsVm(name=name, host=on, memory_mib=mem, vcpus=2, cpu_demand=cpu,
                 mem_demand_mib=mem, **kw)  # type: ignore[arg-type]


def applied(snap: ClusterSnapshot, p: Plan, now: float = 0.0) -> ClusterSnapshot:
    where = {m.vm: m.target for m in p.moves}
    vms = tuple(v.model_copy(update={"host": where[v.name], "last_moved_at": now})
                if v.name in where else v for v in snap.vms)
    return snap.model_copy(update={"vms": vms})


def lopsided() -> ClusterSnapshot:
    return ClusterSnapshot(hosts=(host("h1"), host("h2"), host("h3")),
                           vms=tuple(vm(f"v{i}", "h1", cpu=1.5) for i in range(6)))


def test_balances_a_lopsided_cluster_and_explains_each_move() -> None:
    snap = lopsided()
    p = plan(snap, DrsSettings())
    assert p.moves and p.imbalance_after < p.imbalance_before / 2
    for m in p.moves:
        assert m.source == "h1" and m.reason.startswith("balance:") and not m.mandatory
        assert m.gain > 0 and m.cost > 0 and m.rule is None
    last = p.moves[-1]
    assert last.target_after.memory == pytest.approx(
        sum(4 for mv in p.moves if mv.target == last.target) * GIB / (32 * GIB))
    assert plan(applied(snap, p), DrsSettings()).moves == ()


def test_threshold_one_moves_nothing_for_balance_and_five_more_than_two() -> None:
    snap = lopsided()
    assert plan(snap, DrsSettings(threshold=1)).moves == ()
    assert len(plan(snap, DrsSettings(threshold=5)).moves) >= len(
        plan(snap, DrsSettings(threshold=2)).moves)


def test_a_small_difference_is_not_worth_a_move_at_the_default_threshold() -> None:
    snap = ClusterSnapshot(hosts=(host("h1"), host("h2")),
                           vms=(vm("a", "h1"), vm("b", "h1"), vm("c", "h2")))
    assert plan(snap, DrsSettings()).moves == ()


def test_cooldown_keeps_a_recently_moved_vm_in_place() -> None:
    snap = lopsided()
    recent = snap.model_copy(update={"vms": tuple(
        v.model_copy(update={"last_moved_at": 100.0}) for v in snap.vms)})
    assert plan(recent, DrsSettings(now=200.0)).moves == ()
    assert plan(recent, DrsSettings(now=100.0 + 3601)).moves


def test_dirty_rate_raises_the_cost() -> None:
    calm = lopsided()
    busy = calm.model_copy(update={"vms": tuple(
        v.model_copy(update={"dirty_rate_mib_s": 800.0}) for v in calm.vms)})
    assert len(plan(busy, DrsSettings()).moves) < len(plan(calm, DrsSettings()).moves)


def test_never_onto_maintenance_standby_or_unavailable_hosts() -> None:
    snap = ClusterSnapshot(
        hosts=(host("h1"), host("h2", maintenance=True), host("h3", standby=True),
               host("h4", available=False), host("h5")),
        vms=tuple(vm(f"v{i}", "h1", cpu=1.5) for i in range(6)))
    p = plan(snap, DrsSettings(threshold=5))
    assert p.moves and {m.target for m in p.moves} == {"h5"}


def test_maintenance_host_is_emptied_as_mandatory_moves_even_at_threshold_one() -> None:
    snap = ClusterSnapshot(hosts=(host("h1", maintenance=True), host("h2"), host("h3")),
                           vms=(vm("a", "h1"), vm("b", "h1"), vm("c", "h2")))
    p = plan(snap, DrsSettings(threshold=1))
    assert {m.vm for m in p.moves} == {"a", "b"}
    assert all(m.mandatory and "maintenance" in m.reason for m in p.moves)
    assert {m.target for m in p.moves} == {"h3"} or len({m.target for m in p.moves}) == 2


def test_evacuate_spreads_and_reports_what_does_not_fit() -> None:
    snap = ClusterSnapshot(
        hosts=(host("h1"), host("h2", mem=16 * GIB), host("h3", mem=16 * GIB)),
        vms=(vm("big", "h1", mem=20 * GIB), vm("a", "h1"), vm("b", "h1"),
             vm("pinned", "h1", movable=False)))
    p = evacuate(snap, "h1", DrsSettings())
    assert {m.vm for m in p.moves} == {"a", "b"}
    assert {m.target for m in p.moves} == {"h2", "h3"}  # spread, not stacked
    text = " ".join(p.unplaced)
    assert "big: needs 20480 MiB" in text and "4096 MiB missing" in text
    assert "pinned: not movable" in text
    with pytest.raises(NotFound):
        evacuate(snap, "nope", DrsSettings())


def test_incoming_migrations_count_against_memory() -> None:
    snap = ClusterSnapshot(hosts=(host("h1"), host("h2")),
                           vms=(vm("a", "h1", mem=8 * GIB),), incoming_mib={"h2": 26 * GIB})
    p = evacuate(snap, "h1", DrsSettings())
    assert p.moves == () and "8192 MiB" in p.unplaced[0]


def test_vcpu_ratio_is_a_hard_limit() -> None:
    snap = ClusterSnapshot(hosts=(host("h1", cpus=2, max_vcpu_ratio=1.0), host("h2")),
                           vms=(vm("a", "h2"), vm("b", "h1")))
    p = evacuate(snap, "h2", DrsSettings())
    assert p.moves == () and "vCPUs" in p.unplaced[0]


def test_anti_affinity_is_repaired_and_named() -> None:
    snap = ClusterSnapshot(hosts=(host("h1"), host("h2")),
                           vms=(vm("a", "h1"), vm("b", "h1")),
                           rules=(Rule(name="apart", kind=RuleKind.ANTI_AFFINITY,
                                       vms=("a", "b")),))
    p = plan(snap, DrsSettings(threshold=1))
    assert len(p.moves) == 1 and p.moves[0].rule == "apart" and p.moves[0].mandatory


def test_affinity_gathers_and_moves_as_one() -> None:
    rules = (Rule(name="pair", kind=RuleKind.AFFINITY, vms=("a", "b")),)
    snap = ClusterSnapshot(hosts=(host("h1"), host("h2")),
                           vms=(vm("a", "h1", mem=8 * GIB), vm("b", "h2")), rules=rules)
    p = plan(snap, DrsSettings(threshold=1))
    assert [(m.vm, m.target, m.rule) for m in p.moves] == [("b", "h1", "pair")]
    together = applied(snap, p)
    e = evacuate(together, "h1", DrsSettings())
    assert {m.target for m in e.moves} == {"h2"} and len(e.moves) == 2


def test_vm_host_must_and_should() -> None:
    snap = ClusterSnapshot(
        hosts=(host("h1"), host("h2"), host("h3")),
        vms=(vm("a", "h1"), vm("b", "h1")),
        rules=(Rule(name="only3", kind=RuleKind.VM_HOST_MUST, vms=("a",), hosts=("h3",)),
               Rule(name="pref2", kind=RuleKind.VM_HOST_SHOULD, vms=("b",), hosts=("h2",))))
    p1 = plan(snap, DrsSettings(threshold=1))
    assert [(m.vm, m.target, m.rule, m.mandatory) for m in p1.moves] == [
        ("a", "h3", "only3", True)]
    p3 = plan(snap, DrsSettings())
    assert ("b", "h2", "pref2", False) in [(m.vm, m.target, m.rule, m.mandatory)
                                           for m in p3.moves]


def test_conflicting_rules_are_reported_not_guessed() -> None:
    snap = ClusterSnapshot(
        hosts=(host("h1"), host("h2")),
        vms=(vm("a", "h1"), vm("b", "h1"), vm("c", "h2")),
        rules=(Rule(name="tog", kind=RuleKind.AFFINITY, vms=("a", "b")),
               Rule(name="apart", kind=RuleKind.ANTI_AFFINITY, vms=("a", "b")),
               Rule(name="on1", kind=RuleKind.VM_HOST_MUST, vms=("c",), hosts=("h1",)),
               Rule(name="off1", kind=RuleKind.VM_HOST_MUST_NOT, vms=("c",), hosts=("h1",))))
    p = plan(snap, DrsSettings(threshold=1))
    assert p.moves == ()
    text = " ".join(p.conflicts)
    assert "apart" in text and "tog" in text and "on1" in text and "off1" in text


def test_place_initial_uses_the_model_and_the_rules() -> None:
    snap = lopsided()
    newvm = vm("new", "", cpu=1.0)
    where, why = place_initial(snap, newvm, DrsSettings())
    assert where in {"h2", "h3"} and why
    ruled = snap.model_copy(update={"rules": (
        Rule(name="with0", kind=RuleKind.AFFINITY, vms=("new", "v0")),)})
    assert place_initial(ruled, newvm, DrsSettings())[0] == "h1"
    huge = vm("huge", "", mem=64 * GIB)
    where, why = place_initial(snap, huge, DrsSettings())
    assert where is None and "65536 MiB" in why


def test_smooth_and_imbalance() -> None:
    assert smooth([10.0, 1.0, 2.0, 3.0], 3) == pytest.approx(2.0)
    assert smooth([], 5) == 0.0
    with pytest.raises(ValueError):
        smooth([1.0], 0)
    assert imbalance(lopsided()) > 0.2
    even = ClusterSnapshot(hosts=(host("h1"), host("h2")), vms=(vm("a", "h1"), vm("b", "h2")))
    assert imbalance(even) == pytest.approx(0.0)


def test_moves_that_need_room_freed_first_depend_on_it() -> None:
    snap = ClusterSnapshot(
        hosts=(host("h1", mem=16 * GIB), host("h2", mem=8 * GIB)),
        vms=(vm("a", "h1", mem=8 * GIB), vm("b", "h2", mem=4 * GIB)),
        rules=(Rule(name="a-on-2", kind=RuleKind.VM_HOST_MUST, vms=("a",), hosts=("h2",)),
               Rule(name="b-on-1", kind=RuleKind.VM_HOST_MUST, vms=("b",), hosts=("h1",))))
    p = plan(snap, DrsSettings(threshold=1))
    # a cannot go first (h2 is half full), so b goes, then a once b's room is free.
    assert [m.vm for m in p.moves] == ["b", "a"] and p.moves[1].depends_on == (0,)
