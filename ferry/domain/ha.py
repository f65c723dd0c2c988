"""VM high availability, the pure part: settings, host health, restart order, and the
admission control that keeps room to restart every protected VM.

Host health is judged on the control plane's own clock from two heartbeats: the agent's
over the network (received here) and the host's counter on the shared datastore, as the
other agents read it and report it (the control plane notes when it last saw that counter
change). A host is

    connected   its network heartbeat arrives
    isolated    the network heartbeat is silent, its datastore counter still advances
                (the host lives; it applies its isolation response on its own)
    dead        both are silent

VMs of a dead host are restarted elsewhere; those of an isolated host only once their
leases are released (the power-off isolation response releases them), never while held.
The restart itself acquires the lease on the target host, which waits until that host's
agent has seen the lease expire: a host that is merely slow never gets its VM twice.
With power fencing, a dead host is first powered off through its power driver; once the
driver confirms it off nothing of it runs, and the leases are taken at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum

from pydantic import Field

from ferry.domain.specs import Frozen


class Priority(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    DISABLED = "disabled"  # never restarted by HA

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Priority.HIGH: 0, Priority.MEDIUM: 1, Priority.LOW: 2, Priority.DISABLED: 3}


class IsolationResponse(StrEnum):
    POWER_OFF = "power_off"  # stop the VMs hard and release their leases
    LEAVE_RUNNING = "leave_running"  # keep them running, leases held: never restarted


class HaSettings(Frozen):
    """The cluster's HA settings (`ferry cluster ha`). Off by default, as vSphere HA is:
    an operator enables it for a cluster whose hosts share the HA datastore."""

    enabled: bool = False
    host_failures_to_tolerate: int = Field(default=1, ge=0, le=8)
    isolation_response: IsolationResponse = IsolationResponse.POWER_OFF
    # The control plane's clock: no network heartbeat for this long → not connected;
    # no change of the datastore counter for this long → datastore silent.
    network_timeout_s: float = Field(default=3.0, gt=0)
    datastore_timeout_s: float = Field(default=3.0, gt=0)
    # An agent that cannot deliver heartbeats for this long, reaches no peer, and still
    # writes the datastore applies the isolation response.
    isolation_s: float = Field(default=4.0, gt=0)
    # Fence a dead host through its power driver (IPMI, the lab's) before restarting its
    # VMs: once the driver confirms it off, its leases are taken at once instead of
    # after they expire. Hosts without a driver that can confirm (none, Wake-on-LAN)
    # wait for the leases.
    power_fencing: bool = True
    retry_s: float = Field(default=2.0, gt=0)  # first retry after a failed restart
    retry_max_s: float = Field(default=30.0, gt=0)


class HaDirective(Frozen):
    """What the control plane answers to each agent heartbeat: the HA settings an agent
    acts on by itself (it keeps the latest; with none it never applies a response)."""

    enabled: bool = False
    isolation_response: IsolationResponse = IsolationResponse.POWER_OFF
    isolation_s: float = 4.0


class Health(StrEnum):
    CONNECTED = "connected"
    ISOLATED = "isolated"
    DEAD = "dead"


def health(now: float, last_beat: float | None, last_datastore_change: float | None,
           settings: HaSettings) -> Health:
    """A host's health from when the control plane last received its heartbeat and last
    saw its datastore counter change (both on the control plane's monotonic clock; None:
    never since the control plane started, which counts as silent from `now`)."""
    if last_beat is not None and now - last_beat < settings.network_timeout_s:
        return Health.CONNECTED
    if last_datastore_change is not None and \
            now - last_datastore_change < settings.datastore_timeout_s:
        return Health.ISOLATED
    return Health.DEAD


class Protected(Frozen):
    """A VM HA would restart: where it is recorded, its memory and its priority."""

    name: str
    host: str
    memory_mib: int = Field(ge=0)
    priority: Priority = Priority.MEDIUM


def restart_order(vms: Iterable[Protected]) -> list[Protected]:
    """High first, then medium, then low, by name within a priority; never disabled."""
    return sorted((v for v in vms if v.priority is not Priority.DISABLED),
                  key=lambda v: (v.priority.rank, v.name))


def backoff(failures: int, settings: HaSettings) -> float:
    """Seconds before the next attempt after `failures` failed ones (doubling)."""
    return float(min(settings.retry_max_s, settings.retry_s * 2 ** max(0, failures - 1)))


class Reserve(Frozen):
    """What admission control found: can every protected VM be restarted after any
    `failures` hosts fail? `worst` names the failure it checked that leaves least room."""

    ok: bool
    failures: int
    protected_mib: int
    capacity_mib: int
    worst: tuple[str, ...] = ()
    spare_mib: int = 0  # free memory left in that worst case (negative: missing)
    reason: str = ""


_MAX_COMBINATIONS = 2000


def reserve(hosts: Mapping[str, int], vms: Sequence[Protected], failures: int) -> Reserve:
    """For every set of `failures` hosts (memory MiB each): the survivors keep the VMs
    they run (protected or not), and the protected VMs of the failed hosts are placed on
    them, largest first, each on the survivor with most room left. Not ok if some set
    leaves a protected VM without room.

    First-fit decreasing is not optimal bin packing, so this errs on the side of refusing:
    it never admits a state it could not restart."""
    protected = [v for v in vms if v.priority is not Priority.DISABLED]
    total = sum(v.memory_mib for v in protected)
    capacity = sum(hosts.values())
    names = sorted(hosts)
    if failures > 0 and len(names) <= failures:
        return Reserve(ok=not protected, failures=failures, protected_mib=total,
                       capacity_mib=capacity, worst=tuple(names), spare_mib=-total,
                       reason=f"{len(names)} host(s) cannot tolerate {failures} failure(s)")
    combos = itertools.islice(itertools.combinations(names, failures), _MAX_COMBINATIONS)
    worst: tuple[str, ...] = ()
    worst_spare: int | None = None
    for down in combos:
        left = {h: hosts[h] for h in names if h not in down}
        for v in vms:
            if v.host in left:
                left[v.host] -= v.memory_mib
        moving = sorted((v for v in protected if v.host not in left),
                        key=lambda v: (-v.memory_mib, v.name))
        for v in moving:
            best = max(left, key=lambda h: (left[h], h), default=None)
            room = left[best] if best is not None else 0
            if best is None or room < v.memory_mib:
                what = f"if {', '.join(down)} failed" if down else "even with every host up"
                return Reserve(ok=False, failures=failures, protected_mib=total,
                               capacity_mib=capacity, worst=down,
                               spare_mib=room - v.memory_mib,
                               reason=f"{what}, VM {v.name} ({v.memory_mib} MiB) would fit "
                               f"on no other host (the most free would be {max(room, 0)} "
                               "MiB)")
            left[best] -= v.memory_mib
        spare = sum(left.values())
        if worst_spare is None or spare < worst_spare:
            worst, worst_spare = down, spare
    return Reserve(ok=True, failures=failures, protected_mib=total, capacity_mib=capacity,
                   worst=worst, spare_mib=worst_spare if worst_spare is not None else 0)


__all__ = [
    "HaDirective", "HaSettings", "Health", "IsolationResponse", "Priority", "Protected",
    "Reserve", "backoff", "health", "reserve", "restart_order",
]
