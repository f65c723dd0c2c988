"""DRS's vocabulary: what the planner reads (hosts, VMs, rules, settings) and what it answers.

Frozen value objects, like specs.py. Loads are normalized to a host's capacity (1.0 = the
host's cores or memory fully used). The planner itself is in drs.py, the rules in
drs_rules.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import Field, model_validator

from ferry.domain.specs import Frozen


class RuleKind(StrEnum):
    AFFINITY = "affinity"  # the VMs run on one host
    ANTI_AFFINITY = "anti_affinity"  # the VMs run on different hosts
    VM_HOST_MUST = "vm_host_must"  # the VMs run only on these hosts
    VM_HOST_MUST_NOT = "vm_host_must_not"  # the VMs never run on these hosts
    VM_HOST_SHOULD = "vm_host_should"  # preferably on these hosts
    VM_HOST_SHOULD_NOT = "vm_host_should_not"  # preferably not on these hosts


MUST_KINDS = frozenset({RuleKind.AFFINITY, RuleKind.ANTI_AFFINITY, RuleKind.VM_HOST_MUST,
                        RuleKind.VM_HOST_MUST_NOT})
HOST_KINDS = frozenset({RuleKind.VM_HOST_MUST, RuleKind.VM_HOST_MUST_NOT,
                        RuleKind.VM_HOST_SHOULD, RuleKind.VM_HOST_SHOULD_NOT})


class DrsHost(Frozen):
    name: str
    cpus: int = Field(ge=1)
    memory_mib: int = Field(ge=1)
    available: bool = True  # False: disconnected or unknown, nothing moves on or off it
    maintenance: bool = False
    standby: bool = False
    max_vcpu_ratio: float = Field(default=4.0, gt=0)


class DrsVm(Frozen):
    name: str
    host: str
    memory_mib: int = Field(ge=0)
    vcpus: int = Field(ge=0)
    cpu_demand: float = Field(ge=0)  # cores, smoothed by the caller (see smooth())
    mem_demand_mib: int = Field(ge=0)  # memory in use; read as at most memory_mib
    dirty_rate_mib_s: float = Field(default=0.0, ge=0)
    last_moved_at: float | None = None
    movable: bool = True


# A rule's name is stored in a 64-character column (PostgreSQL refuses a longer one).
RULE_NAME_MAX = 64


class Rule(Frozen):
    name: str = Field(min_length=1, max_length=RULE_NAME_MAX)
    kind: RuleKind
    vms: tuple[str, ...]
    hosts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _shape(self) -> Rule:
        if not self.vms:
            raise ValueError(f"rule {self.name!r} names no VMs")
        if self.kind in HOST_KINDS and not self.hosts:
            raise ValueError(f"rule {self.name!r} ({self.kind}) names no hosts")
        if self.kind not in HOST_KINDS and self.hosts:
            raise ValueError(f"rule {self.name!r} ({self.kind}) is between VMs: no hosts")
        return self


class DrsSettings(Frozen):
    # vSphere's migration threshold: 1 = only mandatory moves (rules, maintenance),
    # 5 = act on slight gains.
    threshold: int = Field(default=3, ge=1, le=5)
    cooldown_s: float = Field(default=3600.0, ge=0)
    now: float = 0.0
    max_moves: int = Field(default=64, ge=0)  # balancing moves per plan; mandatory ones always
    cpu_weight: float = Field(default=0.5, ge=0, le=1)  # memory weighs 1 - cpu_weight
    link_mib_s: float = Field(default=1000.0, gt=0)  # a 10 GbE migration stream
    move_overhead_mib: float = Field(default=64.0, ge=0)  # fixed cost of any migration


class ClusterSnapshot(Frozen):
    hosts: tuple[DrsHost, ...]
    vms: tuple[DrsVm, ...]
    rules: tuple[Rule, ...] = ()
    incoming_mib: dict[str, int] = Field(default_factory=dict)  # migrations on their way in

    @model_validator(mode="after")
    def _unique(self) -> ClusterSnapshot:
        for what, names in (("host", [h.name for h in self.hosts]),
                            ("VM", [v.name for v in self.vms]),
                            ("rule", [r.name for r in self.rules])):
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"{what} names repeat: {', '.join(dup)}")
        return self


class HostLoad(Frozen):
    cpu: float  # demand / cores
    memory: float  # memory demand / memory


class Move(Frozen):
    vm: str
    source: str
    target: str
    reason: str
    rule: str | None
    mandatory: bool
    gain: float  # drop of the imbalance objective (n x weighted variance)
    cost: float  # copied memory plus demand risk, in host fractions (see drs.py)
    source_after: HostLoad
    target_after: HostLoad
    # Earlier moves (indices in Plan.moves) that must finish first: they free the room
    # this one needs on its target. Empty: it may start at once.
    depends_on: tuple[int, ...] = ()


class Plan(Frozen):
    moves: tuple[Move, ...]
    imbalance_before: float
    imbalance_after: float
    conflicts: tuple[str, ...] = ()
    unplaced: tuple[str, ...] = ()


def smooth(samples: Sequence[float], window: int) -> float:
    """Demand over the last `window` samples: their mean, so one spike moves nothing.

    A plain mean rather than the peak: DRS balances sustained demand; a short burst is
    over before a migration could help it."""
    if window < 1:
        raise ValueError("window must be at least 1")
    tail = list(samples)[-window:]
    return sum(tail) / len(tail) if tail else 0.0
