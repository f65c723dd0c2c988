"""Distributed Power Management: when to put one host in standby, when to wake one. Pure.

The caller (the DRS loop) hands a snapshot of every host with its measured load and the
history it got back from the previous round; `decide` answers NOTHING, STANDBY(host) or
WAKE(host) with a sentence saying why, and the history to pass next round.

- Demand is the load of every host whose VMs count (on, maintenance: a host in
  maintenance is being emptied onto the others; standby: should be none), as a fraction,
  per dimension, of the capacity of the hosts that are on. A host that is unavailable
  reports nothing to trust, so no host is put in standby while one is.
- Below the band (cpu AND memory under `low`): one host may go to standby if the others
  carry all demand within `high` and keep the HA reserve. Above (cpu OR memory over
  `high`), or the reserve broken (a host failed): wake one standby host.
- The HA reserve: the hosts left on, less their `ha_reserve_hosts` largest, still carry
  the demand within `high`. Per dimension the largest are taken separately (which may
  be different hosts), which errs on the safe side. It implies the count rule: never
  fewer hosts on than `hosts_needed` + `ha_reserve_hosts`.
- No flapping: a standby needs `hysteresis_rounds` rounds in a row below the band (a
  host too many only costs power), a wake `wake_rounds` above it (a host too few costs
  the guests), and after any action DPM holds still for `hold_rounds` rounds, since a
  host takes minutes to boot or be emptied. A standby never leaves the others above the
  band, so on unchanged demand it cannot be undone by a wake (and a wake after a standby
  is therefore not held: demand rose, or a host failed).

Choices are deterministic: the standby candidate is the on host with the least memory
in use, then least CPU in use, then by name (the cheapest to empty); the host woken is
the smallest standby host that restores the band and the reserve (less power drawn),
else the largest one, ties by name. Emptying the chosen host is the caller's job, with
the DRS planner; `may_power_off` says when it is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ferry.domain.errors import InvalidInput


class PowerMode(StrEnum):
    """A host as DPM sees it."""

    ON = "on"
    STANDBY = "standby"
    MAINTENANCE = "maintenance"
    UNAVAILABLE = "unavailable"


class ActionKind(StrEnum):
    NOTHING = "nothing"
    STANDBY = "standby"
    WAKE = "wake"


class Trend(StrEnum):
    """Where this round's demand sits; a streak of one trend is what DPM acts on."""

    WITHIN = "within"
    BELOW = "below"
    ABOVE = "above"
    SHORT = "short"  # within the band, but the HA reserve or `min_hosts_on` is not met


@dataclass(frozen=True)
class Load:
    cpus: float
    memory_mib: float

    def __add__(self, other: Load) -> Load:
        return Load(self.cpus + other.cpus, self.memory_mib + other.memory_mib)


@dataclass(frozen=True)
class DpmHost:
    name: str
    cpus: int
    memory_mib: int
    state: PowerMode
    used_cpus: float = 0.0  # cores its VMs use, smoothed by the caller
    used_memory_mib: int = 0
    vms: int = 0

    def __post_init__(self) -> None:
        if self.cpus <= 0 or self.memory_mib <= 0:
            raise InvalidInput(f"host {self.name}: capacity must be positive "
                               f"(cpus={self.cpus}, memory_mib={self.memory_mib})")
        if self.used_cpus < 0 or self.used_memory_mib < 0 or self.vms < 0:
            raise InvalidInput(f"host {self.name}: load cannot be negative")

    @property
    def load(self) -> Load:
        return Load(self.used_cpus, self.used_memory_mib)

    @property
    def capacity(self) -> Load:
        return Load(self.cpus, self.memory_mib)


@dataclass(frozen=True)
class DpmSettings:
    low: float = 0.45  # vSphere DPM's default target band, 63 ± 18 %
    high: float = 0.81
    ha_reserve_hosts: int = 1
    min_hosts_on: int = 1  # a floor even with no reserve and no load
    hysteresis_rounds: int = 3  # rounds below the band before a standby
    wake_rounds: int = 1  # rounds above the band (or short of reserve) before a wake
    hold_rounds: int = 5  # rounds after any action with no other action

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high <= 1:
            raise InvalidInput(f"DPM band {self.low}-{self.high} is not 0 < low < high <= 1",
                               "use fractions, for example low=0.45 high=0.81")
        if self.ha_reserve_hosts < 0 or self.min_hosts_on < 1:
            raise InvalidInput("ha_reserve_hosts must be >= 0 and min_hosts_on >= 1")
        if self.hysteresis_rounds < 1 or self.wake_rounds < 1 or self.hold_rounds < 0:
            raise InvalidInput("hysteresis_rounds and wake_rounds must be >= 1, "
                               "hold_rounds >= 0")


@dataclass(frozen=True)
class DpmHistory:
    """What `decide` must remember between rounds; start with `DpmHistory()`."""

    trend: Trend = Trend.WITHIN
    rounds: int = 0  # rounds in a row with this trend, the last one included
    since_action: int | None = None  # rounds since DPM last acted; None: not yet
    last_action: ActionKind = ActionKind.NOTHING


@dataclass(frozen=True)
class DpmAction:
    kind: ActionKind
    host: str | None
    reason: str


@dataclass(frozen=True)
class DpmDecision:
    action: DpmAction
    history: DpmHistory  # pass it to the next round's `decide`
    demand: Load
    capacity_on: Load


def demand_of(hosts: Iterable[DpmHost]) -> Load:
    """The load that the hosts on must carry (unavailable hosts report nothing)."""
    total = Load(0.0, 0.0)
    for h in hosts:
        if h.state is not PowerMode.UNAVAILABLE:
            total += h.load
    return total


def _capacity(hosts: Iterable[DpmHost]) -> Load:
    total = Load(0.0, 0.0)
    for h in hosts:
        total += h.capacity
    return total


def _fits(demand: Load, capacity: Load, high: float) -> bool:
    return demand.cpus <= high * capacity.cpus and demand.memory_mib <= high * capacity.memory_mib


def _without_largest(hosts: Sequence[DpmHost], k: int) -> Load:
    """Capacity left when the k largest hosts fail, the largest taken per dimension."""
    cpus = sorted((h.cpus for h in hosts), reverse=True)[k:]
    memory = sorted((h.memory_mib for h in hosts), reverse=True)[k:]
    return Load(sum(cpus), sum(memory))


def keeps_reserve(hosts_on: Sequence[DpmHost], demand: Load, settings: DpmSettings) -> bool:
    """True if these hosts carry `demand` within the band after losing the reserve."""
    return len(hosts_on) >= settings.min_hosts_on and _fits(
        demand, _without_largest(hosts_on, settings.ha_reserve_hosts), settings.high)


def hosts_needed(hosts_on: Sequence[DpmHost], demand: Load, high: float) -> int | None:
    """The fewest of these hosts that can carry `demand` within `high` (a lower bound:
    per dimension the largest first); None if all of them cannot."""
    need = 0
    for sizes, wanted in (([h.cpus for h in hosts_on], demand.cpus),
                          ([h.memory_mib for h in hosts_on], demand.memory_mib)):
        total, count = 0.0, 0
        for size in sorted(sizes, reverse=True):
            if wanted <= high * total:
                break
            total, count = total + size, count + 1
        if wanted > high * total:
            return None
        need = max(need, count)
    return need


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "n/a"


def _describe(demand: Load, capacity: Load, count: int) -> str:
    return (f"cpu {_pct(demand.cpus, capacity.cpus)} / memory "
            f"{_pct(demand.memory_mib, capacity.memory_mib)} of the {count} host(s) on")


def trend_of(hosts: Sequence[DpmHost], settings: DpmSettings) -> Trend:
    on = [h for h in hosts if h.state is PowerMode.ON]
    demand, capacity = demand_of(hosts), _capacity(on)
    if not _fits(demand, capacity, settings.high):
        return Trend.ABOVE
    if not keeps_reserve(on, demand, settings):
        return Trend.SHORT
    if demand.cpus < settings.low * capacity.cpus \
            and demand.memory_mib < settings.low * capacity.memory_mib:
        return Trend.BELOW
    return Trend.WITHIN


def decide(hosts: Sequence[DpmHost], settings: DpmSettings | None = None,
           history: DpmHistory | None = None) -> DpmDecision:
    """This round's DPM action; the same snapshot in any order gives the same answer."""
    settings = settings or DpmSettings()
    history = history or DpmHistory()
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise InvalidInput("DPM snapshot names a host twice")
    hosts = sorted(hosts, key=lambda h: h.name)  # order independence
    on = [h for h in hosts if h.state is PowerMode.ON]
    demand, capacity = demand_of(hosts), _capacity(on)
    trend = trend_of(hosts, settings)
    rounds = history.rounds + 1 if trend is history.trend else 1
    since = None if history.since_action is None else history.since_action + 1
    now = _describe(demand, capacity, len(on))
    band = f"{settings.low:.0%}-{settings.high:.0%}"

    def answer(kind: ActionKind, host: str | None, reason: str) -> DpmDecision:
        acted = kind is not ActionKind.NOTHING
        # An action starts the streak and the hold anew: the next one must be earned.
        after = (DpmHistory(trend, 0, 0, kind) if acted else
                 DpmHistory(trend, rounds, since, history.last_action))
        return DpmDecision(DpmAction(kind, host, reason), after, demand, capacity)

    if trend is Trend.WITHIN:
        return answer(ActionKind.NOTHING, None, f"demand {now}, within the band {band}")
    # A wake right after a standby is not held: the standby left the others within the
    # band, so demand rose or a host failed since, and the guests should not wait.
    waking_after_standby = trend is not Trend.BELOW \
        and history.last_action is ActionKind.STANDBY
    if since is not None and since < settings.hold_rounds and not waking_after_standby:
        return answer(ActionKind.NOTHING, None,
                      f"demand {now} ({trend}), but DPM acted {since} round(s) ago and holds "
                      f"for {settings.hold_rounds}")
    if trend is Trend.BELOW:
        if rounds < settings.hysteresis_rounds:
            return answer(ActionKind.NOTHING, None,
                          f"demand {now}, below the band {band} for {rounds} of "
                          f"{settings.hysteresis_rounds} rounds")
        kind, host, why = _standby(hosts, on, demand, settings)
        return answer(kind, host, f"demand {now}, below the band {band}: {why}")
    what = (f"above the band {band}" if trend is Trend.ABOVE else
            f"the HA reserve of {settings.ha_reserve_hosts} host(s) "
            f"(at least {settings.min_hosts_on} on) does not hold")
    if rounds < settings.wake_rounds:
        return answer(ActionKind.NOTHING, None,
                      f"demand {now}, {what} for {rounds} of {settings.wake_rounds} rounds")
    kind, host, why = _wake(hosts, on, demand, settings)
    return answer(kind, host, f"demand {now}, {what}: {why}")


def _standby(hosts: Sequence[DpmHost], on: Sequence[DpmHost], demand: Load,
             settings: DpmSettings) -> tuple[ActionKind, str | None, str]:
    unavailable = [h.name for h in hosts if h.state is PowerMode.UNAVAILABLE]
    if unavailable:
        return (ActionKind.NOTHING, None,
                f"no standby while {', '.join(unavailable)} is unavailable (its load is unknown)")
    candidates = sorted(on, key=lambda h: (h.used_memory_mib, h.used_cpus, h.name))
    for host in candidates:
        rest = [h for h in on if h is not host]
        if keeps_reserve(rest, demand, settings):
            return (ActionKind.STANDBY, host.name,
                    f"{host.name} goes to standby (the least loaded that can go); the "
                    f"others would run at {_describe(demand, _capacity(rest), len(rest))}, "
                    f"keeping {settings.ha_reserve_hosts} host(s) in reserve")
    return (ActionKind.NOTHING, None,
            f"no host can go: without any one of them the others would exceed "
            f"{settings.high:.0%} or lose the HA reserve of {settings.ha_reserve_hosts} host(s)")


def _wake(hosts: Sequence[DpmHost], on: Sequence[DpmHost], demand: Load,
          settings: DpmSettings) -> tuple[ActionKind, str | None, str]:
    standby = [h for h in hosts if h.state is PowerMode.STANDBY]
    if not standby:
        return ActionKind.NOTHING, None, "no host is in standby to wake"
    for host in sorted(standby, key=lambda h: (h.memory_mib, h.cpus, h.name)):
        if keeps_reserve([*on, host], demand, settings):
            return (ActionKind.WAKE, host.name,
                    f"wake {host.name} (the smallest standby host that restores the band "
                    f"and the reserve)")
    largest = min(standby, key=lambda h: (-h.memory_mib, -h.cpus, h.name))
    return (ActionKind.WAKE, largest.name,
            f"wake {largest.name} (the largest standby host; one alone does not restore "
            f"the band, more follow in later rounds)")


def may_power_off(host: DpmHost) -> str | None:
    """None if this host (chosen for standby) is empty and may be powered off now; else
    what still holds it. Evacuating it is the caller's job, with the DRS planner."""
    if host.state is not PowerMode.ON:
        return f"{host.name} is {host.state}, not on"
    if host.vms or host.used_memory_mib or host.used_cpus:
        return (f"{host.name} still runs {host.vms} VM(s) using {host.used_memory_mib} MiB; "
                f"evacuate it first")
    return None
