"""VM leases on a shared datastore: who may run a VM, judged without clocks in common.

A VM runs only on the host that holds its lease. The lease is one small JSON file per VM
on a datastore every host sees (`<datastore>/.ferry/leases/<vm>.json`), holding a
`LeaseRecord`: the owner (a host), a generation (bumped by every new owner) and a counter
(bumped by every renewal, about every `renew_s`). Each host also keeps a heartbeat file
with its own counter, so others can tell a host that stopped writing from one that only
stopped talking to the control plane.

Time is only ever measured on one host's own monotonic clock, never compared between
hosts (the idea of sanlock's delta leases):

- An observer (any other host) judges a lease expired only after it has seen the record
  unchanged (same owner, generation and counter) for `expire_s` of its own clock. A record
  it has just started watching is "unchanged since now", never "old".
- The owner fences (stops its guests) once it has not renewed successfully for `fence_s`
  of its own clock, before anyone can judge the lease expired: the owner's last successful
  write is at t0; it stops by t0 + fence_s; an observer reads every `renew_s`, so it has
  seen that write by t0 + renew_s and cannot judge the lease expired before
  t0 + renew_s + expire_s. Hence `expire_s > fence_s + 2 * renew_s` (one renew_s of read
  lag, one of slack for the fencing itself).
- A taker that judged a lease expired writes itself as owner with generation + 1, waits
  `confirm_s` (two renewals) and reads again: it starts the VM only if the record is still
  its own. An owner reads the record before each renewal and stops at once if it shows a
  higher generation (or another owner at its generation). So a stalled owner that comes
  back and renews over a taker's write makes the taker back off (its confirmation read
  sees the owner's newer counter), and a taker's write that lands after the owner's
  renewal is seen by the owner within one renewal, before the taker's confirmation ends.
- A record with a *lower* generation than the one an owner wrote is a stale renewal by a
  previous owner that raced the handover (read before it, written after it): the owner
  writes its own record again and the previous owner, on its next read, sees the higher
  generation and yields. Higher generation always wins.

Why this is safe on a shared filesystem where locks across hosts are unreliable (NFS
locks are advisory, lost with a lease break or a client's reboot, and some servers do not
honour them at all): nothing here takes a lock. Every write replaces the whole file by an
atomic rename of a freshly written temporary file in the same directory, so a reader sees
either the old record or the new one, never a torn mix; NFS's close-to-open consistency
makes each open-and-read see every write closed before it. Two writers racing are
resolved by the rules above (last rename wins, the generation orders owners, and each
side re-reads before acting), not by mutual exclusion. A release (`released=True`) is
written only after the VM's QEMU is gone, so a released lease can be taken at once.

What the leases alone cannot cover: a host whose agent hangs (not the host) keeps its
QEMU running while the lease expires. sanlock pairs its leases with wdmd and the kernel
watchdog for exactly that; Ferry's host watchdog (ferry/agent/watchdog.py, a process of
its own) kills the host's QEMUs before the lease can be judged expired, and power
fencing (ferry/control/ha.py) powers a dead host off before its leases are taken early.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from ferry.domain.specs import Frozen, Name


class LeaseTiming(Frozen):
    renew_s: float = Field(default=0.5, gt=0)
    fence_s: float = Field(default=3.0, gt=0)
    expire_s: float = Field(default=6.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LeaseTiming:
        if not self.expire_s > self.fence_s + 2 * self.renew_s:
            raise ValueError(f"expire_s ({self.expire_s}) must exceed fence_s + 2 * renew_s "
                             f"({self.fence_s + 2 * self.renew_s}): the owner must have "
                             "stopped before anyone can judge its lease expired")
        if not self.fence_s > self.renew_s:
            raise ValueError("fence_s must exceed renew_s: one missed renewal is no failure")
        return self

    @property
    def confirm_s(self) -> float:
        """How long a taker waits after writing before it reads its record again."""
        return 2 * self.renew_s


class LeaseRecord(Frozen):
    vm: Name
    owner: Name
    generation: int = Field(ge=1)
    counter: int = Field(ge=0)
    released: bool = False

    @property
    def key(self) -> tuple[str, int, int, bool]:
        """What must change for an observer to count the lease as alive."""
        return (self.owner, self.generation, self.counter, self.released)


class HostBeat(Frozen):
    """A host's heartbeat on the datastore: the counter is bumped every renewal."""

    host: Name
    counter: int = Field(ge=0)
    address: str = ""  # where its agent listens (host:port): peers probe it for isolation


class Observed(Frozen):
    """What one observer saw of a record, and since when (the observer's own clock)."""

    key: tuple[str, int, int, bool]
    since: float


def observe(previous: Observed | None, key: tuple[str, int, int, bool], now: float
            ) -> Observed:
    """The observation after reading `key` at `now`: unchanged keeps its `since`."""
    if previous is not None and previous.key == key:
        return previous
    return Observed(key=key, since=now)


def expired(seen: Observed | None, record: LeaseRecord | None, now: float,
            timing: LeaseTiming) -> bool:
    """May this observer take the lease? A missing or released record is free; a held
    one only once this observer has seen it unchanged for expire_s."""
    if record is None or record.released:
        return True
    if seen is None or seen.key != record.key:
        return False  # not watched yet (or it just changed): alive for all we know
    return now - seen.since >= timing.expire_s


class Verdict(StrEnum):
    HOLD = "hold"  # still ours: renew
    STALE = "stale"  # a previous owner's late renewal: write ours again
    LOST = "lost"  # another owner holds it now: stop at once


def verdict(mine: LeaseRecord, found: LeaseRecord | None) -> Verdict:
    """What an owner concludes from the record it read before renewing."""
    if found is None:
        return Verdict.STALE  # deleted under us: ours is the only claim; write it again
    if found.generation < mine.generation:
        return Verdict.STALE
    if found.generation == mine.generation and found.owner == mine.owner \
            and not found.released:
        return Verdict.HOLD
    return Verdict.LOST


def must_fence(last_renewed: float, now: float, timing: LeaseTiming) -> bool:
    """The owner stops its guests once it has not renewed for fence_s (its own clock)."""
    return now - last_renewed >= timing.fence_s


def take(found: LeaseRecord | None, vm: str, owner: str) -> LeaseRecord:
    """The record a new owner writes: one generation above anything seen."""
    generation = found.generation + 1 if found is not None else 1
    return LeaseRecord(vm=vm, owner=owner, generation=generation, counter=0)


def renewed(mine: LeaseRecord) -> LeaseRecord:
    return mine.model_copy(update={"counter": mine.counter + 1})


def released(mine: LeaseRecord) -> LeaseRecord:
    return mine.model_copy(update={"counter": mine.counter + 1, "released": True})


def confirmed(written: LeaseRecord, found: LeaseRecord | None) -> bool:
    """After confirm_s: is the record a taker wrote still its own? Anything else (a
    previous owner's renewal, another taker) means it must not start the VM."""
    return found is not None and found.key == written.key


__all__ = [
    "HostBeat", "LeaseRecord", "LeaseTiming", "Observed", "Verdict", "confirmed", "expired",
    "must_fence", "observe", "released", "renewed", "take", "verdict",
]
