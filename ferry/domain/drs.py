"""DRS planner: which VMs to live-migrate where, and why. Pure: snapshot in, plan out.

The model
- A host's load is its VMs' demand over its capacity, per dimension: CPU (cores in use /
  cores) and memory (MiB in use, plus migrations on their way in / MiB).
- Imbalance = sqrt(w·var(cpu) + (1-w)·var(mem)) over the hosts in the pool (available,
  not in maintenance or standby); w = DrsSettings.cpu_weight (0.5). vSphere's imbalance
  is the standard deviation of normalized entitlement; this is the same over two
  dimensions.
- Gain of a move = the drop of n·(weighted variance), so it does not shrink with the
  cluster's size: only the source and the target change. For a memory-only move of a VM
  holding a share x of both hosts, gain ≈ x·(Lsrc - Ldst) - x².
- Cost (State.cost): memory copied (inflated by the dirty rate) plus CPU demand moved
  (the risk that it changes), as shares of a typical host.
- Threshold t: a balancing move needs gain ≥ SPREAD[t]·cost, so a memory-only VM moves
  only between hosts whose loads differ by more than SPREAD[t] plus its own share:
  30/20/10/5 % at 2/3/4/5, vSphere's pairwise spreads. t=1: mandatory moves only.
- Greedy: the best net move (gain - SPREAD[t]·cost) among the most- and least-loaded
  hosts is applied, the loads updated, repeat until no move pays. So a second plan on the
  result finds nothing, and every move is valid against the state after the previous.
- Mandatory moves come first: split affinity groups gathered, hosts in maintenance or
  standby emptied, VM-host must-rules and anti-affinity repaired. They ignore the
  cooldown; balancing and should-rule repairs respect it.
"""

from __future__ import annotations

import heapq

from ferry.domain.drs_model import (
    ClusterSnapshot,
    DrsHost,
    DrsSettings,
    DrsVm,
    HostLoad,
    Move,
    Plan,
    Rule,
    RuleKind,
    smooth,
)
from ferry.domain.drs_rules import (
    must_allows,
    must_rule_broken,
    should_misses,
    should_rule_broken,
)
from ferry.domain.drs_state import State
from ferry.domain.errors import NotFound

SPREAD = {2: 0.30, 3: 0.20, 4: 0.10, 5: 0.05}
_SIDE = 4  # hosts taken from each end of each dimension as sources/targets per round
_REPAIR_PASSES = 8
_SHORTLIST = 24  # units per source tried against every target


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def _best_target(st: State, u: int, members: list[int], source: int,
                 only: int | None = None) -> int | None:
    """Where must-rules and limits allow, the host breaking fewest should-rules, then the
    one leaving the cluster most balanced."""
    tot = st.totals(members)
    best: tuple[int, float, int] | None = None
    unit = st.book.units[u]
    for b in ([only] if only is not None else st.pool):
        if b == source or not st.fits(u, members, b, tot):
            continue
        key = (should_misses(unit, b), st.trial(source, b, tot[2], tot[3]), b)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def _no_room(st: State, u: int, members: list[int], source: int) -> str:
    tot = st.totals(members)
    eligible = [b for b in st.pool if b != source and must_allows(st.book.units[u], b)
                and st.anti_ok(members, b)]
    who = ", ".join(st.vnames[j] for j in members)
    if not eligible:
        return f"{who}: no eligible host (rules, maintenance, standby or unavailable)"
    free = max(st.cap_m[b] - st.alloc[b] for b in eligible)
    vfree = max(st.vcap[b] - st.vcpu[b] for b in eligible)
    if free < tot[0]:
        return (f"{who}: needs {tot[0]:.0f} MiB, the most free on an eligible host is "
                f"{max(free, 0):.0f} MiB ({tot[0] - max(free, 0):.0f} MiB missing)")
    return (f"{who}: needs {tot[1]:.0f} vCPUs, the most free under the vCPU ratio on an "
            f"eligible host is {max(vfree, 0):.0f}")


def _move_all(st: State, members: list[int], b: int, reason: str, rule: str | None,
              mandatory: bool) -> None:
    for j in members:
        if st.vhost[j] != b:
            st.move(j, b, reason, rule, mandatory)


def _gather(st: State, conflicts: list[str]) -> None:
    """Affinity groups split over hosts: bring them onto the host holding most of them."""
    for u, unit in enumerate(st.book.units):
        if not unit.affinity or st.uhost[u] >= 0 or unit.frozen:
            continue
        if any(st.vhost[j] < 0 for j in unit.vms):
            continue  # part of it is nowhere known: nothing to gather to
        name = unit.affinity[0]
        pinned = {st.vhost[j] for j in unit.vms if not st.movable([j])}
        held: dict[int, float] = {}
        for j in unit.vms:
            held[st.vhost[j]] = held.get(st.vhost[j], 0.0) + st.v_alloc[j]
        order = sorted(pinned) if pinned else sorted(held, key=lambda h: (-held[h], h)) + [
            b for b in st.pool if b not in held]
        chosen = None
        for b in order if len(pinned) <= 1 else []:
            moving = [j for j in unit.vms if st.vhost[j] != b]
            if st.fits(u, moving, b, st.totals(moving)):
                chosen = b
                break
        who = ", ".join(st.vnames[j] for j in unit.vms)
        if chosen is None:
            conflicts.append(f"affinity rule {name} is broken and cannot be repaired: no "
                             f"host can take all of {who}")
            continue
        _move_all(st, unit.vms, chosen, f"affinity rule {name}: {who} run together on "
                  f"{st.hnames[chosen]}", name, True)


def _drain(st: State, host: int, unplaced: list[str]) -> None:
    """Every VM off a host in maintenance or standby (or being evacuated), largest first."""
    on = [j for j in range(len(st.vnames)) if st.vhost[j] == host]
    seen: set[int] = set()
    groups: list[tuple[int, list[int]]] = []
    for j in on:
        u = st.book.unit_of[j]
        if u not in seen:
            seen.add(u)
            groups.append((u, [x for x in st.book.units[u].vms if st.vhost[x] == host]))
    groups.sort(key=lambda g: (-st.totals(g[1])[0], st.vnames[g[1][0]]))
    why = st.why_drained[host]
    for u, members in groups:
        who = ", ".join(st.vnames[j] for j in members)
        if not st.avail[host]:
            unplaced.append(f"{who}: {st.hnames[host]} is unavailable, nothing moves off it")
            continue
        stuck = [st.vnames[j] for j in members if not st.vms[j].movable]
        unit = st.book.units[u]
        if stuck:
            held = [st.vnames[j] for j in members if st.vms[j].movable]
            tied = (f"; {', '.join(held)} stay with it (affinity {', '.join(unit.affinity)})"
                    if held else "")
            unplaced.append(f"{', '.join(stuck)}: not movable{tied}")
            continue
        if unit.frozen:
            unplaced.append(f"{who}: {unit.frozen}")
            continue
        # Members of a split affinity group first try the host the rest of it is on.
        rest = {st.vhost[x] for x in unit.vms if st.vhost[x] not in (host, -1)}
        b = _best_target(st, u, members, host, only=min(rest)) if len(rest) == 1 else None
        if b is None:
            b = _best_target(st, u, members, host)
        if b is None:
            unplaced.append(_no_room(st, u, members, host))
            continue
        _move_all(st, members, b, f"{st.hnames[host]} is entering {why}", None, True)


def _repair_host_rules(st: State, conflicts: list[str]) -> None:
    """Units on a host a must-rule forbids, moved; one that has no room yet is tried again
    after the others moved (their departures may free it)."""
    todo = [u for u, unit in enumerate(st.book.units)
            if st.uhost[u] >= 0 and not unit.frozen and not must_allows(unit, st.uhost[u])]
    while todo:
        left = []
        for u in todo:
            unit, h = st.book.units[u], st.uhost[u]
            rule = must_rule_broken(unit, h)
            who = ", ".join(st.vnames[j] for j in unit.vms)
            if not st.movable(unit.vms):
                conflicts.append(f"rule {rule} is broken for {who} on {st.hnames[h]}, which "
                                 "cannot be moved (not movable or its host unavailable)")
                continue
            b = _best_target(st, u, unit.vms, h)
            if b is None:
                left.append(u)
                continue
            _move_all(st, unit.vms, b, f"rule {rule}: {who} may not run on {st.hnames[h]}",
                      rule, True)
        if len(left) == len(todo):
            for u in left:
                unit, h = st.book.units[u], st.uhost[u]
                conflicts.append(
                    f"rule {must_rule_broken(unit, h)} is broken on {st.hnames[h]} and cannot "
                    f"be repaired: {_no_room(st, u, unit.vms, h)}")
            return
        todo = left


def _repair_anti(st: State, conflicts: list[str]) -> None:
    for k, (name, members) in enumerate(st.book.anti):
        by_host: dict[int, list[int]] = {}
        for j in members:
            if st.vhost[j] >= 0:
                by_host.setdefault(st.vhost[j], []).append(j)
        for h in sorted(by_host):
            crowd = by_host[h]
            if len(crowd) < 2:
                continue
            # Keep the one that cannot move, else the biggest: fewer bytes cross the wire.
            crowd.sort(key=lambda j: (st.movable([j]), -st.v_alloc[j], st.vnames[j]))
            for j in crowd[1:]:
                u = st.book.unit_of[j]
                unit = st.book.units[u]
                if unit.frozen or not st.movable(unit.vms) or st.uhost[u] != h:
                    conflicts.append(f"anti-affinity rule {name}: {st.vnames[j]} shares "
                                     f"{st.hnames[h]} with {st.vnames[crowd[0]]} and "
                                     "cannot be moved")
                    continue
                b = _best_target(st, u, unit.vms, h)
                if b is None:
                    conflicts.append(f"anti-affinity rule {name} cannot be met: "
                                     f"{_no_room(st, u, unit.vms, h)}")
                    continue
                _move_all(st, unit.vms, b, f"anti-affinity rule {name}: {st.vnames[j]} "
                          f"apart from {st.vnames[crowd[0]]}", name, True)
        del k


def _balanceable(st: State, u: int) -> bool:
    unit = st.book.units[u]
    return not unit.frozen and st.movable(unit.vms) and not st.cooling(unit.vms)


def _repair_should(st: State, budget: int) -> int:
    used = 0
    for u, unit in enumerate(st.book.units):
        h = st.uhost[u]
        if used >= budget or h < 0 or not should_misses(unit, h) or not _balanceable(st, u):
            continue
        b = _best_target(st, u, unit.vms, h)
        if b is None or should_misses(unit, b) >= should_misses(unit, h):
            continue
        rule = should_rule_broken(unit, h)
        who = ", ".join(st.vnames[j] for j in unit.vms)
        _move_all(st, unit.vms, b, f"rule {rule}: {who} should not run on {st.hnames[h]}",
                  rule, False)
        used += 1
    return used


def _ends(st: State, k: int) -> tuple[list[int], list[int], int]:
    """The k most and least loaded pool hosts by combined load, CPU and memory, and the
    least loaded by combined load."""
    n = st.n_act
    mc, mm, w = st.sc / n, st.sm / n, st.w
    lc, lm, pool = st.lc, st.lm, st.pool
    keys = (lambda i: w * (lc[i] - mc) + (1 - w) * (lm[i] - mm), lc.__getitem__,
            lm.__getitem__)
    src: set[int] = set()
    dst: set[int] = set()
    for key in keys:
        src.update(heapq.nlargest(k, pool, key=key))
        dst.update(heapq.nsmallest(k, pool, key=key))
    return sorted(src), sorted(dst), min(pool, key=keys[0])


def _candidates(st: State, a: int, probe: int, need: float, f0: float) -> list[int]:
    """A source's units worth trying everywhere: with many units on a host, only the
    _SHORTLIST that pay best when moved to the least-loaded host (`probe`)."""
    units = [u for u in sorted(st.units_on[a]) if _balanceable(st, u)]
    if len(units) <= _SHORTLIST or probe == a:
        return units
    scored = []
    for u in units:
        tot = st.u_tot[u]
        scored.append((f0 - st.trial(a, probe, tot[2], tot[3]) - need * st.u_cost[u], u))
    return [u for _, u in heapq.nlargest(_SHORTLIST, scored)]


def _balance(st: State, budget: int) -> None:
    need = SPREAD[st.settings.threshold]
    for _ in range(budget):
        if st.n_act < 2:
            return
        f0 = st.objective()
        sources, targets, probe = _ends(st, _SIDE)
        best: tuple[float, int, int, int] | None = None
        for a in sources:
            for u in _candidates(st, a, probe, need, f0):
                members = st.book.units[u].vms
                unit = st.book.units[u]
                tot = st.u_tot[u]
                price = need * st.u_cost[u]
                misses = should_misses(unit, a)
                for b in targets:
                    if b == a or not st.fits(u, members, b, tot):
                        continue
                    gain = f0 - st.trial(a, b, tot[2], tot[3])
                    net = gain - price
                    if gain <= 1e-12 or net < 0 or (best is not None and net <= best[0]):
                        continue
                    if should_misses(unit, b) > misses:
                        continue  # balancing never breaks a should-rule
                    best = (net, u, a, b)
        if best is None:
            return
        _, u, a, b = best
        before = st.imbalance()
        la, lb = st.load(a), st.load(b)
        members = st.book.units[u].vms
        _move_all(st, members, b, "", None, False)
        reason = (f"balance: {st.hnames[a]} at cpu {_pct(la.cpu)} mem {_pct(la.memory)}, "
                  f"{st.hnames[b]} at cpu {_pct(lb.cpu)} mem {_pct(lb.memory)}; imbalance "
                  f"{before:.3f} -> {st.imbalance():.3f}")
        for i in range(len(st.moves) - len(members), len(st.moves)):
            st.moves[i] = st.moves[i].model_copy(update={"reason": reason})


def _result(st: State, before: float, conflicts: list[str], unplaced: list[str]) -> Plan:
    return Plan(moves=tuple(st.moves), imbalance_before=before,
                imbalance_after=st.imbalance(), conflicts=tuple(conflicts),
                unplaced=tuple(unplaced))


def _repair(st: State) -> tuple[list[str], list[str]]:
    """Mandatory moves until nothing more can be done: one may free the room another
    needs. Returns what is still broken (conflicts) and what could not leave (unplaced)."""
    found: list[str] = []
    unplaced: list[str] = []
    for _ in range(_REPAIR_PASSES):
        done = len(st.moves)
        found, unplaced = [], []
        _gather(st, found)
        for h in range(len(st.hnames)):
            if st.drained[h]:
                _drain(st, h, unplaced)
        _repair_host_rules(st, found)
        _repair_anti(st, found)
        if len(st.moves) == done:
            break
    return found, unplaced


def plan(snapshot: ClusterSnapshot, settings: DrsSettings) -> Plan:
    """Rule repairs and evacuations of hosts in maintenance/standby, then balancing; again
    while balancing freed room for a repair, so a second plan on the result is empty."""
    st = State(snapshot, settings)
    before = st.imbalance()
    found, unplaced = _repair(st)
    budget = settings.max_moves if settings.threshold >= 2 else 0
    while budget > 0:
        done = len(st.moves)
        budget -= _repair_should(st, budget)
        start = len(st.moves)
        _balance(st, budget)
        budget -= len({st.moves[i].vm for i in range(start, len(st.moves))})
        if len(st.moves) == done:
            break
        found, unplaced = _repair(st)  # and round again: room freed may serve a should-rule
    return _result(st, before, [*st.book.conflicts, *found], unplaced)


def evacuate(snapshot: ClusterSnapshot, host: str, settings: DrsSettings) -> Plan:
    """Every VM off `host`, spread by the same model; what fits nowhere is in `unplaced`."""
    if host not in {h.name for h in snapshot.hosts}:
        raise NotFound(f"there is no host {host!r}", "name a host of the cluster")
    st = State(snapshot, settings, drain=frozenset({host}))
    before = st.imbalance()
    unplaced: list[str] = []
    i = st.hidx[host]
    if not st.avail[i]:
        unplaced.extend(f"{st.vnames[j]}: {host} is unavailable, nothing moves off it"
                        for j in range(len(st.vnames)) if st.vhost[j] == i)
    else:
        _drain(st, i, unplaced)
    return _result(st, before, list(st.book.conflicts), unplaced)


def place_initial(snapshot: ClusterSnapshot, vm: DrsVm,
                  settings: DrsSettings) -> tuple[str | None, str]:
    """The host for a VM being created or powered on, or None and why."""
    others = tuple(v for v in snapshot.vms if v.name != vm.name)
    fresh = vm.model_copy(update={"host": ""})  # nowhere yet: adds nothing to any host
    st = State(snapshot.model_copy(update={"vms": (*others, fresh)}), settings)
    j = len(others)
    u = st.book.unit_of[j]
    unit = st.book.units[u]
    if unit.frozen:
        return None, f"{vm.name}: {unit.frozen}"
    partners = {st.vhost[x] for x in unit.vms if x != j and st.vhost[x] >= 0}
    if len(partners) > 1:
        return None, (f"{vm.name}: its affinity group ({', '.join(unit.affinity)}) is "
                      "split over hosts")
    only = partners.pop() if partners else None
    if only is not None and not st.active[only]:
        return None, (f"{vm.name}: affinity rule {unit.affinity[0]} ties it to "
                      f"{st.hnames[only]}, which cannot take VMs now")
    b = _best_target(st, u, [j], -1, only=only)
    if b is None:
        return None, _no_room(st, u, [j], -1)
    if only is not None:
        return st.hnames[b], f"affinity rule {unit.affinity[0]}: with its group"
    miss = should_rule_broken(unit, b) if should_misses(unit, b) else None
    note = f" (should-rule {miss} cannot be met)" if miss else ""
    return st.hnames[b], f"the most balanced cluster after placing it{note}"


def imbalance(snapshot: ClusterSnapshot) -> float:
    return State(snapshot, DrsSettings()).imbalance()


def loads(snapshot: ClusterSnapshot) -> dict[str, HostLoad]:
    """Each host's load as the planner reads it (demand over capacity, migrations on
    their way in counted on their target), so what an operator sees is what DRS acts on."""
    st = State(snapshot, DrsSettings())
    return {name: st.load(i) for i, name in enumerate(st.hnames)}


__all__ = [
    "SPREAD", "ClusterSnapshot", "DrsHost", "DrsSettings", "DrsVm", "HostLoad", "Move", "Plan",
    "Rule", "RuleKind", "evacuate", "imbalance", "loads", "place_initial", "plan", "smooth",
]
