"""Rules compiled for the planner: which VMs move together, where each group may go.

Affinity rules join VMs into units (union-find) that the planner only moves whole.
VM-host rules become, per unit, the allowed/forbidden (must) and preferred/avoided
(should) host sets. Rules that contradict each other are reported and not acted on:
the planner never guesses which of two must-rules the user meant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ferry.domain.drs_model import Rule, RuleKind


@dataclass
class Unit:
    vms: list[int]  # VM indices in the snapshot
    allowed: frozenset[int] | None = None  # must: only these hosts (None: any)
    forbidden: frozenset[int] = frozenset()  # must not
    preferred: frozenset[int] | None = None  # should
    avoided: frozenset[int] = frozenset()  # should not
    host_rules: list[tuple[Rule, frozenset[int]]] = field(default_factory=list)
    anti: list[int] = field(default_factory=list)  # indices into Book.anti
    affinity: list[str] = field(default_factory=list)  # affinity rules that made the unit
    frozen: str | None = None  # why the planner may not move it


@dataclass
class Book:
    units: list[Unit]
    unit_of: list[int]  # VM index -> unit index
    anti: list[tuple[str, list[int]]]  # rule name, member VM indices
    conflicts: list[str]


class _Groups:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _groups(n: int, affinity: Sequence[tuple[str, list[int]]]) -> _Groups:
    g = _Groups(n)
    for _, members in affinity:
        for j in members[1:]:
            g.join(members[0], j)
    return g


def compile_rules(vm_names: Sequence[str], host_index: dict[str, int],
                  rules: Sequence[Rule]) -> Book:
    vm_index = {n: i for i, n in enumerate(vm_names)}
    conflicts: list[str] = []
    # Rules may name VMs or hosts that are gone: they bind only what exists.
    mapped: list[tuple[Rule, list[int], frozenset[int]]] = []
    for r in rules:
        members = sorted({vm_index[v] for v in r.vms if v in vm_index})
        hosts = frozenset(host_index[h] for h in r.hosts if h in host_index)
        if members:
            mapped.append((r, members, hosts))
    affinity = [(r.name, m) for r, m, _ in mapped if r.kind is RuleKind.AFFINITY and len(m) > 1]
    anti = [(r.name, m) for r, m, _ in mapped if r.kind is RuleKind.ANTI_AFFINITY and len(m) > 1]

    # Together and apart at once: report both sides, enforce neither.
    groups = _groups(len(vm_names), affinity)
    dropped_aff: set[str] = set()
    kept_anti: list[tuple[str, list[int]]] = []
    for name, members in anti:
        clash = [(a, b) for i, a in enumerate(members) for b in members[i + 1:]
                 if groups.find(a) == groups.find(b)]
        if not clash:
            kept_anti.append((name, members))
            continue
        a, b = clash[0]
        root = groups.find(a)
        together = sorted(n for n, m in affinity if groups.find(m[0]) == root)
        dropped_aff.update(together)
        conflicts.append(f"rule {name} (anti_affinity) conflicts with {', '.join(together)} "
                         f"(affinity): {vm_names[a]} and {vm_names[b]} must be both apart "
                         "and together; neither is enforced")
    undone = {j for n, m in affinity if n in dropped_aff for j in m}
    if dropped_aff:
        affinity = [(n, m) for n, m in affinity if n not in dropped_aff]
        groups = _groups(len(vm_names), affinity)

    roots: dict[int, int] = {}
    units: list[Unit] = []
    unit_of = [0] * len(vm_names)
    for j in range(len(vm_names)):
        root = groups.find(j)
        if root not in roots:
            roots[root] = len(units)
            units.append(Unit(vms=[]))
        unit_of[j] = roots[root]
        units[roots[root]].vms.append(j)
    for name, members in affinity:
        units[unit_of[members[0]]].affinity.append(name)
    for k, (_, members) in enumerate(kept_anti):
        for j in members:
            units[unit_of[j]].anti.append(k)
    for r, members, hosts in mapped:
        if r.kind in (RuleKind.VM_HOST_MUST, RuleKind.VM_HOST_MUST_NOT,
                      RuleKind.VM_HOST_SHOULD, RuleKind.VM_HOST_SHOULD_NOT):
            for u in sorted({unit_of[j] for j in members}):
                units[u].host_rules.append((r, hosts))
    for unit in units:
        _host_sets(unit, vm_names, conflicts)
    # Neither side of a together-and-apart conflict is enforced, so its VMs stay put:
    # moving them could break the rule the user meant.
    for name, members in anti:
        if (name, members) not in kept_anti:
            for j in members:
                units[unit_of[j]].frozen = f"rule {name} conflicts with an affinity rule"
    for j in undone:
        units[unit_of[j]].frozen = "its affinity rules conflict with an anti-affinity rule"

    return Book(units=units, unit_of=unit_of, anti=kept_anti, conflicts=conflicts)


def _host_sets(u: Unit, vm_names: Sequence[str], conflicts: list[str]) -> None:
    allowed: frozenset[int] | None = None
    preferred: frozenset[int] | None = None
    forbidden: frozenset[int] = frozenset()
    avoided: frozenset[int] = frozenset()
    for r, hosts in u.host_rules:
        if r.kind is RuleKind.VM_HOST_MUST:
            allowed = hosts if allowed is None else allowed & hosts
        elif r.kind is RuleKind.VM_HOST_MUST_NOT:
            forbidden |= hosts
        elif r.kind is RuleKind.VM_HOST_SHOULD:
            preferred = hosts if preferred is None else preferred & hosts
        else:
            avoided |= hosts
    who = ", ".join(vm_names[j] for j in u.vms)
    must = [r.name for r, _ in u.host_rules if r.kind in (RuleKind.VM_HOST_MUST,
                                                           RuleKind.VM_HOST_MUST_NOT)]
    should = [r.name for r, _ in u.host_rules if r.kind in (RuleKind.VM_HOST_SHOULD,
                                                             RuleKind.VM_HOST_SHOULD_NOT)]
    if allowed is not None and not allowed - forbidden:
        together = f" (kept together by {', '.join(u.affinity)})" if u.affinity else ""
        conflicts.append(f"rules {', '.join(must)} leave no host for {who}{together}; "
                         "they are not moved")
        u.frozen = "its host rules conflict"
        return
    u.allowed = None if allowed is None else allowed - forbidden
    u.forbidden = forbidden
    if preferred is None and not avoided:
        return
    pool = preferred if preferred is not None else None
    usable = (pool - avoided) if pool is not None else None
    if usable is not None and u.allowed is not None:
        usable &= u.allowed
    if usable is not None and not usable:
        conflicts.append(f"should-rules {', '.join(should)} cannot be met for {who} "
                         f"under {', '.join(must) or 'each other'}; they are ignored for it")
        return
    u.preferred = usable
    u.avoided = avoided


def should_misses(u: Unit, host: int) -> int:
    """How many of the unit's should-preferences a host breaks (0, 1 or 2)."""
    miss = 0
    if u.preferred is not None and host not in u.preferred:
        miss += 1
    if host in u.avoided:
        miss += 1
    return miss


def must_allows(u: Unit, host: int) -> bool:
    return (u.allowed is None or host in u.allowed) and host not in u.forbidden


def must_rule_broken(u: Unit, host: int) -> str | None:
    """The first VM-host must-rule that the host breaks for this unit, by name."""
    for r, hosts in u.host_rules:
        if (r.kind is RuleKind.VM_HOST_MUST and host not in hosts) or (
                r.kind is RuleKind.VM_HOST_MUST_NOT and host in hosts):
            return r.name
    return None


def should_rule_broken(u: Unit, host: int) -> str | None:
    for r, hosts in u.host_rules:
        if (r.kind is RuleKind.VM_HOST_SHOULD and host not in hosts) or (
                r.kind is RuleKind.VM_HOST_SHOULD_NOT and host in hosts):
            return r.name
    return None
