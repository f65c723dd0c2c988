"""The DRS planner's promises, over random small clusters."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ferry.domain.drs import (
    ClusterSnapshot,
    DrsHost,
    DrsSettings,
    DrsVm,
    Plan,
    Rule,
    RuleKind,
    evacuate,
    plan,
)

MUST = {RuleKind.AFFINITY, RuleKind.ANTI_AFFINITY, RuleKind.VM_HOST_MUST,
        RuleKind.VM_HOST_MUST_NOT}


@st.composite
def clusters(draw: st.DrawFn) -> ClusterSnapshot:
    n = draw(st.integers(2, 6))
    hosts = []
    for i in range(n):
        state = draw(st.sampled_from(["ok"] * 6 + ["maintenance", "standby", "down"]))
        hosts.append(DrsHost(
            name=f"h{i}", cpus=draw(st.sampled_from([2, 4, 8])),
            memory_mib=draw(st.sampled_from([4096, 8192, 16384])),
            available=state != "down", maintenance=state == "maintenance",
            standby=state == "standby", max_vcpu_ratio=draw(st.sampled_from([1.0, 2.0, 4.0]))))
    incoming = {h.name: draw(st.sampled_from([0, 0, 1024, 2048])) for h in hosts}
    used = {h.name: incoming[h.name] for h in hosts}
    vcpus_used = dict.fromkeys(used, 0)
    vms = []
    for j in range(draw(st.integers(0, 16))):
        # Skewed: low host numbers are picked more often.
        h = hosts[min(draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1)))]
        mem = draw(st.sampled_from([256, 512, 1024, 2048, 4096]))
        vcpus = draw(st.integers(1, 4))
        if (used[h.name] + mem > h.memory_mib
                or vcpus_used[h.name] + vcpus > h.cpus * h.max_vcpu_ratio):
            continue  # the starting point respects the limits; the plan must keep them
        used[h.name] += mem
        vcpus_used[h.name] += vcpus
        vms.append(DrsVm(
            name=f"v{j}", host=h.name, memory_mib=mem, vcpus=vcpus,
            cpu_demand=draw(st.floats(0, vcpus)), mem_demand_mib=draw(st.integers(0, mem)),
            dirty_rate_mib_s=draw(st.sampled_from([0.0, 10.0, 500.0])),
            last_moved_at=draw(st.sampled_from([None, None, -100.0, -10000.0])),
            movable=draw(st.booleans()) or draw(st.booleans())))
    rules = []
    names = [v.name for v in vms]
    for r in range(draw(st.integers(0, 3)) if len(names) >= 2 else 0):
        kind = draw(st.sampled_from(list(RuleKind)))
        members = tuple(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3,
                                      unique=True)))
        if kind in (RuleKind.AFFINITY, RuleKind.ANTI_AFFINITY):
            if len(members) < 2:
                continue
            rules.append(Rule(name=f"r{r}", kind=kind, vms=members))
        else:
            chosen = tuple(draw(st.lists(st.sampled_from([h.name for h in hosts]),
                                         min_size=1, max_size=2, unique=True)))
            rules.append(Rule(name=f"r{r}", kind=kind, vms=members, hosts=chosen))
    return ClusterSnapshot(hosts=tuple(hosts), vms=tuple(vms), rules=tuple(rules),
                           incoming_mib=incoming)


def holds(rule: Rule, where: dict[str, str]) -> bool:
    on = [where[v] for v in rule.vms if v in where]
    if rule.kind is RuleKind.AFFINITY:
        return len(set(on)) <= 1
    if rule.kind is RuleKind.ANTI_AFFINITY:
        return len(set(on)) == len(on)
    if rule.kind is RuleKind.VM_HOST_MUST:
        return all(h in rule.hosts for h in on)
    return all(h not in rule.hosts for h in on)


def replay(snap: ClusterSnapshot, p: Plan) -> dict[str, str]:
    """Apply the moves one by one, checking each against the state after the previous."""
    hosts = {h.name: h for h in snap.hosts}
    vms = {v.name: v for v in snap.vms}
    where = {v.name: v.host for v in snap.vms}
    mem = {h: float(snap.incoming_mib.get(h, 0)) for h in hosts}
    cpu = dict.fromkeys(hosts, 0.0)
    for v in snap.vms:
        mem[v.host] += v.memory_mib
        cpu[v.host] += v.vcpus
    for m in p.moves:
        t = hosts[m.target]
        assert where[m.vm] == m.source and m.source != m.target
        assert t.available and not t.maintenance and not t.standby
        assert hosts[m.source].available and vms[m.vm].movable
        mem[m.source] -= vms[m.vm].memory_mib
        cpu[m.source] -= vms[m.vm].vcpus
        mem[m.target] += vms[m.vm].memory_mib
        cpu[m.target] += vms[m.vm].vcpus
        assert mem[m.target] <= t.memory_mib, "memory overcommitted"
        assert cpu[m.target] <= t.cpus * t.max_vcpu_ratio, "vCPU ratio exceeded"
        assert m.reason
        where[m.vm] = m.target
    return where


def applied(snap: ClusterSnapshot, p: Plan, now: float) -> ClusterSnapshot:
    moved = {m.vm: m.target for m in p.moves}
    return snap.model_copy(update={"vms": tuple(
        v.model_copy(update={"host": moved[v.name], "last_moved_at": now})
        if v.name in moved else v for v in snap.vms)})


fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(clusters(), st.integers(1, 5))
def test_plans_keep_limits_and_must_rules(snap: ClusterSnapshot, threshold: int) -> None:
    p = plan(snap, DrsSettings(threshold=threshold, max_moves=1000))
    before = {v.name: v.host for v in snap.vms}
    after = replay(snap, p)
    for r in snap.rules:
        if r.kind in MUST and holds(r, before):
            assert holds(r, after), f"{r} broken by {p.moves}"
    if threshold == 1:
        assert all(m.mandatory for m in p.moves)
    if all(not m.mandatory and m.rule is None for m in p.moves):
        assert p.imbalance_after <= p.imbalance_before + 1e-9
    cooling = {v.name for v in snap.vms if v.last_moved_at == -100.0}
    assert all(m.mandatory for m in p.moves if m.vm in cooling)


@fast
@given(clusters(), st.integers(1, 5))
def test_a_second_plan_finds_nothing(snap: ClusterSnapshot, threshold: int) -> None:
    s = DrsSettings(threshold=threshold, max_moves=1000)
    p = plan(snap, s)
    again = plan(applied(snap, p, s.now), s)
    assert again.moves == (), (p.moves, again.moves)


@fast
@given(clusters(), st.data())
def test_evacuate_leaves_nothing_unaccounted(snap: ClusterSnapshot, data: st.DataObject) -> None:
    h = data.draw(st.sampled_from([x.name for x in snap.hosts]))
    p = evacuate(snap, h, DrsSettings())
    after = replay(snap, p)
    assert all(m.source == h and m.mandatory for m in p.moves)
    said = " ".join(p.unplaced)
    for v in snap.vms:
        if v.host == h:
            assert after[v.name] != h or v.name in said, (v.name, p.unplaced)
    before = {v.name: v.host for v in snap.vms}
    for r in snap.rules:
        if r.kind in MUST and holds(r, before) and r.kind is not RuleKind.AFFINITY:
            assert holds(r, after)


@fast
@given(clusters())
def test_conflicting_host_rules_are_reported(snap: ClusterSnapshot) -> None:
    assume(snap.vms)
    v = snap.vms[0].name
    hosts = [h.name for h in snap.hosts]
    rules = (Rule(name="in", kind=RuleKind.VM_HOST_MUST, vms=(v,), hosts=(hosts[0],)),
             Rule(name="out", kind=RuleKind.VM_HOST_MUST_NOT, vms=(v,), hosts=(hosts[0],)))
    p = plan(snap.model_copy(update={"rules": rules}), DrsSettings())
    assert any("in" in c and "out" in c for c in p.conflicts)
    assert v not in {m.vm for m in p.moves}  # neither rule guessed at
