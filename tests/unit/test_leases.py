"""The lease rules (ferry/domain/leases.py): their promises as hypothesis properties, and a
simulated owner and taker on one datastore that must never both run the guest."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ferry.domain.leases import (
    LeaseRecord,
    LeaseTiming,
    Verdict,
    confirmed,
    expired,
    must_fence,
    observe,
    renewed,
    take,
    verdict,
)

TIMING = LeaseTiming()


def test_timing_must_leave_the_owner_time_to_stop() -> None:
    with pytest.raises(ValidationError):
        LeaseTiming(renew_s=0.5, fence_s=3.0, expire_s=4.0)
    assert LeaseTiming(renew_s=0.5, fence_s=3.0, expire_s=4.1).confirm_s == 1.0


@given(st.integers(1, 50), st.integers(0, 1000), st.floats(0, 100), st.floats(0, 100))
def test_an_observer_needs_expire_s_of_its_own_watching(gen: int, counter: int, first: float,
                                                       later: float) -> None:
    rec = LeaseRecord(vm="v", owner="h1", generation=gen, counter=counter)
    seen = observe(None, rec.key, first)
    assert not expired(None, rec, first, TIMING)  # never watched: alive for all we know
    now = first + later
    # The time watched is now - first as the clock's floats give it (first + later may
    # round: 58.96... + 6.0 - 58.96... is 5.999...).
    watched = now - first
    assert expired(observe(seen, rec.key, now), rec, now, TIMING) == (
        watched >= TIMING.expire_s)
    bumped = renewed(rec)
    assert not expired(observe(seen, bumped.key, now), bumped, now, TIMING)


def test_a_released_or_missing_lease_is_free_at_once() -> None:
    rec = LeaseRecord(vm="v", owner="h1", generation=3, counter=7, released=True)
    assert expired(None, rec, 0.0, TIMING)
    assert expired(None, None, 0.0, TIMING)


@given(st.integers(1, 20), st.integers(0, 100), st.integers(-3, 3), st.booleans(),
       st.booleans())
def test_higher_generation_always_wins(gen: int, counter: int, delta: int, other: bool,
                                       rel: bool) -> None:
    mine = LeaseRecord(vm="v", owner="h1", generation=gen, counter=counter)
    found_gen = max(1, gen + delta)
    found = LeaseRecord(vm="v", owner="h2" if other else "h1", generation=found_gen,
                        counter=0, released=rel)
    v = verdict(mine, found)
    if found_gen < gen:
        assert v is Verdict.STALE
    elif found_gen > gen or other or rel:
        assert v is Verdict.LOST
    else:
        assert v is Verdict.HOLD
    taken = take(found, "v", "h3")
    assert taken.generation == found_gen + 1
    assert confirmed(taken, taken) and not confirmed(taken, found)


def test_fencing_comes_at_fence_s() -> None:
    assert not must_fence(10.0, 12.9, TIMING)
    assert must_fence(10.0, 13.0, TIMING)


# --- a simulated owner (host h1) and taker (h2) sharing one record ----------------------
@dataclass
class World:
    record: LeaseRecord | None
    owner_runs: bool = True
    taker_runs: bool = False


@dataclass
class Scenario:
    fail_from: float  # h1 cannot reach the datastore from here ...
    fail_len: float  # ... for this long
    freeze_from: float  # h1's agent and guest are frozen (SIGSTOP) from here ...
    freeze_len: float  # ... for this long
    taker_phase: float  # h2's renewal ticks are offset by this
    write_lag: float  # h1 writes this long after it read (a slow rename)
    timing: LeaseTiming


DT = 0.01


def simulate(sc: Scenario, until: float = 40.0) -> tuple[list[float], World]:
    """Step both hosts; the times at which both guests ran, and the world at the end."""
    t = sc.timing
    world = World(record=LeaseRecord(vm="v", owner="h1", generation=1, counter=0))
    mine: LeaseRecord | None = world.record
    last_ok = 0.0
    stalled = False  # h1 paused its guest itself (fenced) and may get it back
    unfence_at: tuple[float, LeaseRecord] | None = None
    # A renewal read at [2] and written at [0]: it proves the lease held at [2] only.
    pending_write: tuple[float, LeaseRecord, float] | None = None
    seen = None
    taker_claim: tuple[float, LeaseRecord] | None = None
    taker_mine: LeaseRecord | None = None
    next_owner, next_taker = 0.0, sc.taker_phase
    overlaps = []
    steps = int(until / DT)
    for i in range(steps):
        now = i * DT
        frozen = sc.freeze_from <= now < sc.freeze_from + sc.freeze_len
        reachable = not (sc.fail_from <= now < sc.fail_from + sc.fail_len)
        # --- h1, the first owner
        if not frozen:
            if pending_write is not None and now >= pending_write[0]:
                if reachable:
                    world.record = pending_write[1]
                    last_ok = pending_write[2]
                pending_write = None
            if unfence_at is not None and now >= unfence_at[0]:
                if reachable and confirmed(unfence_at[1], world.record):
                    world.owner_runs, stalled = True, False
                unfence_at = None
            if mine is not None and must_fence(last_ok, now, t) and world.owner_runs:
                world.owner_runs, stalled = False, True
            if mine is not None and now >= next_owner and pending_write is None:
                next_owner = now + t.renew_s
                if reachable:
                    v = verdict(mine, world.record)
                    if v is Verdict.LOST:
                        world.owner_runs, stalled, mine = False, False, None
                    else:
                        mine = renewed(mine)
                        pending_write = (now + sc.write_lag, mine, now)
                        if stalled:
                            unfence_at = (now + sc.write_lag + t.confirm_s, mine)
        # --- h2, the observer that takes over
        if now >= next_taker:
            next_taker = now + t.renew_s
            rec = world.record
            if taker_mine is not None:
                v = verdict(taker_mine, rec)
                if v is Verdict.LOST:
                    world.taker_runs, taker_mine = False, None
                else:
                    taker_mine = renewed(taker_mine)
                    world.record = taker_mine
            elif taker_claim is None and rec is not None:
                seen = observe(seen, rec.key, now)
                if expired(seen, rec, now, t):
                    claim = take(rec, "v", "h2")
                    world.record = claim
                    taker_claim = (now + t.confirm_s, claim)
        if taker_claim is not None and now >= taker_claim[0]:
            if confirmed(taker_claim[1], world.record):
                world.taker_runs, taker_mine = True, taker_claim[1]
            taker_claim, seen = None, None
        if world.owner_runs and world.taker_runs and not frozen:
            overlaps.append(now)
    return overlaps, world


timings = st.builds(
    lambda r, f, extra: LeaseTiming(renew_s=r, fence_s=f, expire_s=f + 2 * r + extra),
    st.sampled_from([0.2, 0.5]), st.sampled_from([1.0, 3.0]), st.sampled_from([0.1, 1.0]))


@settings(max_examples=80, deadline=None)
@given(st.floats(0, 10), st.floats(0, 20), st.floats(0, 10), st.floats(0, 12),
       st.floats(0, 0.5), st.sampled_from([0.0, 0.05, 0.15]), timings)
def test_owner_and_taker_never_run_together(fail_from: float, fail_len: float,
                                            freeze_from: float, freeze_len: float,
                                            phase: float, lag: float,
                                            timing: LeaseTiming) -> None:
    sc = Scenario(fail_from, fail_len, freeze_from, freeze_len, phase * timing.renew_s * 2,
                  lag, timing)
    assert simulate(sc)[0] == []


def test_an_unreachable_owner_is_replaced_after_it_fenced() -> None:
    sc = Scenario(fail_from=2.0, fail_len=100.0, freeze_from=99.0, freeze_len=0.0,
                  taker_phase=0.1, write_lag=0.0, timing=TIMING)
    overlaps, world = simulate(sc, until=20.0)
    assert overlaps == [] and world.taker_runs and not world.owner_runs
