"""DPM's decision, as a pure function of a snapshot of hosts and the last rounds."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.dpm import (
    ActionKind,
    DpmHistory,
    DpmHost,
    DpmSettings,
    PowerMode,
    Trend,
    decide,
    demand_of,
    hosts_needed,
    keeps_reserve,
    may_power_off,
)
from ferry.domain.errors import InvalidInput

ON, STANDBY, MAINT, GONE = (PowerMode.ON, PowerMode.STANDBY, PowerMode.MAINTENANCE,
                            PowerMode.UNAVAILABLE)
NOW = DpmSettings(hysteresis_rounds=1, wake_rounds=1, hold_rounds=0)  # acts at once


def host(name: str, state: PowerMode = ON, cpu: float = 0.0, mem: int = 0,
         cpus: int = 8, memory: int = 16384, vms: int = 0) -> DpmHost:
    return DpmHost(name, cpus, memory, state, cpu, mem, vms)


def idle_four() -> list[DpmHost]:
    return [host("h1", cpu=1, mem=2000, vms=2), host("h2", cpu=0.5, mem=1000, vms=1),
            host("h3", cpu=0.5, mem=1000, vms=1), host("h4", STANDBY)]


def test_within_the_band_nothing_happens() -> None:
    hosts = [host("h1", cpu=4, mem=8000), host("h2", cpu=4, mem=8000), host("h3", STANDBY)]
    d = decide(hosts, DpmSettings(ha_reserve_hosts=0), DpmHistory())
    assert d.action.kind is ActionKind.NOTHING
    assert "within the band 45%-81%" in d.action.reason


def test_standby_waits_for_the_hysteresis_rounds_then_picks_the_least_loaded() -> None:
    history = DpmHistory()
    kinds = []
    for _ in range(3):
        d = decide(idle_four(), DpmSettings(), history)
        history = d.history
        kinds.append(d.action.kind)
    assert kinds == [ActionKind.NOTHING, ActionKind.NOTHING, ActionKind.STANDBY]
    assert d.action.host == "h2"  # h2 and h3 carry the same load: by name
    assert "least loaded" in d.action.reason and "below the band" in d.action.reason
    assert history == DpmHistory(Trend.BELOW, 0, 0, ActionKind.STANDBY)


def test_after_an_action_dpm_holds_still() -> None:
    settings = DpmSettings(hysteresis_rounds=1, hold_rounds=2)
    first = decide(idle_four(), settings)
    assert first.action.kind is ActionKind.STANDBY
    again = decide(idle_four(), settings, first.history)
    assert again.action.kind is ActionKind.NOTHING and "holds for 2" in again.action.reason
    later = decide(idle_four(), settings, again.history)
    assert later.action.kind is ActionKind.STANDBY


def test_a_wake_right_after_a_standby_is_not_held() -> None:
    settings = DpmSettings(hysteresis_rounds=1, hold_rounds=10)
    first = decide(idle_four(), settings)
    busy = [host("h1", cpu=7, mem=15000), host("h3", cpu=7, mem=15000),
            host("h2", STANDBY), host("h4", STANDBY)]
    d = decide(busy, settings, first.history)
    assert d.action.kind is ActionKind.WAKE


def test_a_wake_is_held_after_a_wake_while_the_host_boots() -> None:
    busy = [host("h1", cpu=7, mem=15000), host("h2", STANDBY), host("h3", STANDBY)]
    settings = DpmSettings(hold_rounds=3)
    first = decide(busy, settings)
    assert first.action.kind is ActionKind.WAKE
    assert decide(busy, settings, first.history).action.kind is ActionKind.NOTHING


def test_the_ha_reserve_keeps_a_second_host_on_for_any_load() -> None:
    hosts = [host("h1", cpu=0.1, mem=100, vms=1), host("h2"), host("h3", STANDBY)]
    d = decide(hosts, NOW)
    assert d.action.kind is ActionKind.NOTHING
    assert "no host can go" in d.action.reason
    # With no load at all no host is needed, so one suffices: the reserve itself.
    d = decide([host("h1"), host("h2")], NOW)
    assert (d.action.kind, d.action.host) == (ActionKind.STANDBY, "h1")
    # Never zero hosts, even with no reserve.
    lone = decide([host("h1"), host("h2", STANDBY)], dataclasses.replace(NOW, ha_reserve_hosts=0))
    assert lone.action.kind is ActionKind.NOTHING


def test_standby_skips_a_candidate_whose_absence_would_break_the_reserve() -> None:
    # big1 carries least, but without it the others lose the reserve for m's VMs.
    hosts = [host("m", MAINT, cpu=20, mem=10000),
             host("big1", cpus=64, memory=262144), host("big2", cpu=0.1, cpus=64, memory=262144),
             host("s1", cpu=0.05), host("s2", cpu=0.05), host("s3", cpu=0.05)]
    d = decide(hosts, NOW)
    assert (d.action.kind, d.action.host) == (ActionKind.STANDBY, "s1")


def test_a_host_in_maintenance_is_never_chosen_and_its_load_counts() -> None:
    hosts = [host("a", MAINT, cpu=6, mem=12000), host("b", cpu=0.1, mem=100),
             host("c", cpu=0.1, mem=100)]
    d = decide(hosts, NOW)
    assert d.action.kind is ActionKind.NOTHING  # the maintenance host's VMs land on b, c
    assert demand_of(hosts).memory_mib == 12200


def test_no_standby_while_a_host_is_unavailable() -> None:
    hosts = [host("a"), host("b"), host("c"), host("d", GONE)]
    d = decide(hosts, NOW)
    assert d.action.kind is ActionKind.NOTHING and "d is unavailable" in d.action.reason


def test_above_the_band_wakes_the_smallest_standby_host_that_suffices() -> None:
    hosts = [host("a", cpu=7, mem=14000), host("b", cpu=7, mem=14000),
             host("huge", STANDBY, cpus=64, memory=262144),
             host("small", STANDBY, cpus=8, memory=16384),
             host("tiny", STANDBY, cpus=1, memory=1024)]
    d = decide(hosts, dataclasses.replace(NOW, ha_reserve_hosts=0))
    assert d.action.kind is ActionKind.WAKE and d.action.host == "small"
    assert "above the band" in d.action.reason


def test_when_no_one_host_suffices_the_largest_is_woken() -> None:
    hosts = [host("a", cpu=8, mem=16000), host("x", STANDBY, cpus=2, memory=2048),
             host("y", STANDBY, cpus=2, memory=2048)]
    d = decide(hosts, dataclasses.replace(NOW, ha_reserve_hosts=0))
    assert d.action.kind is ActionKind.WAKE and d.action.host == "x"  # tie: by name
    assert "largest" in d.action.reason


def test_a_failed_host_that_breaks_the_reserve_wakes_one() -> None:
    hosts = [host("a", cpu=2, mem=4000), host("b", GONE), host("c", STANDBY)]
    d = decide(hosts, NOW)
    assert d.action.kind is ActionKind.WAKE and d.action.host == "c"
    assert "HA reserve" in d.action.reason


def test_above_the_band_with_nothing_in_standby_says_so() -> None:
    d = decide([host("a", cpu=8, mem=16000)], NOW)
    assert d.action.kind is ActionKind.NOTHING and "no host is in standby" in d.action.reason


def test_may_power_off_only_an_empty_host() -> None:
    assert may_power_off(host("a")) is None
    reason = may_power_off(host("a", cpu=0.1, mem=512, vms=1))
    assert reason is not None and "evacuate it first" in reason
    assert may_power_off(host("a", STANDBY)) == "a is standby, not on"


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InvalidInput):
        DpmSettings(low=0.9, high=0.8)
    with pytest.raises(InvalidInput):
        DpmSettings(ha_reserve_hosts=-1)
    with pytest.raises(InvalidInput):
        host("a", cpus=0)
    with pytest.raises(InvalidInput, match="twice"):
        decide([host("a"), host("a")])


def test_hosts_needed_is_a_lower_bound_per_dimension() -> None:
    hosts = [host("a", cpus=16, memory=1024), host("b", cpus=2, memory=65536)]
    demand = demand_of([host("x", cpu=10, mem=40000)])
    assert hosts_needed(hosts, demand, 0.81) == 1
    assert hosts_needed(hosts, demand_of([host("x", cpu=100)]), 0.81) is None


# --- properties ---------------------------------------------------------------------

@st.composite
def clusters(draw: st.DrawFn) -> list[DpmHost]:
    n = draw(st.integers(1, 7))
    hosts = []
    for i in range(n):
        cpus = draw(st.sampled_from([2, 4, 8, 16]))
        memory = draw(st.sampled_from([4096, 8192, 16384, 65536]))
        state = draw(st.sampled_from([ON, ON, ON, STANDBY, MAINT, GONE]))
        busy = state in (ON, MAINT)
        used_cpu = draw(st.floats(0, cpus)) if busy else 0.0
        used_mem = draw(st.integers(0, memory)) if busy else 0
        hosts.append(DpmHost(f"h{i}", cpus, memory, state, used_cpu, used_mem,
                             1 if used_mem else 0))
    return hosts


settings_st = st.builds(
    DpmSettings, low=st.sampled_from([0.3, 0.45]), high=st.sampled_from([0.7, 0.81, 1.0]),
    ha_reserve_hosts=st.integers(0, 2), min_hosts_on=st.integers(1, 2),
    hysteresis_rounds=st.integers(1, 3), wake_rounds=st.integers(1, 2),
    hold_rounds=st.integers(0, 3))
history_st = st.builds(DpmHistory, trend=st.sampled_from(list(Trend)),
                       rounds=st.integers(0, 4),
                       since_action=st.none() | st.integers(0, 5),
                       last_action=st.sampled_from(list(ActionKind)))


def apply(hosts: list[DpmHost], kind: ActionKind, name: str | None) -> list[DpmHost]:
    state = {ActionKind.STANDBY: STANDBY, ActionKind.WAKE: ON}.get(kind)
    return [dataclasses.replace(h, state=state) if h.name == name and state else h
            for h in hosts]


@given(clusters(), settings_st, history_st)
def test_standby_never_breaks_the_reserve_nor_the_band(
        hosts: list[DpmHost], settings: DpmSettings, history: DpmHistory) -> None:
    action = decide(hosts, settings, history).action
    if action.kind is not ActionKind.STANDBY:
        return
    chosen = next(h for h in hosts if h.name == action.host)
    assert chosen.state is ON  # never a host in maintenance, standby or unavailable
    after = apply(hosts, action.kind, action.host)
    on = [h for h in after if h.state is ON]
    demand = demand_of(after)
    needed = hosts_needed(on, demand, settings.high)
    assert needed is not None and len(on) >= needed + settings.ha_reserve_hosts
    assert len(on) >= settings.min_hosts_on
    assert demand.cpus <= settings.high * sum(h.cpus for h in on)
    assert demand.memory_mib <= settings.high * sum(h.memory_mib for h in on)
    assert keeps_reserve(on, demand, settings)
    # ... so on the same demand the next round cannot want that host back.
    again = decide(after, settings, DpmHistory())
    assert again.action.kind is not ActionKind.WAKE


@given(clusters(), settings_st, history_st, st.randoms(use_true_random=False))
def test_the_decision_is_deterministic_whatever_the_order(
        hosts: list[DpmHost], settings: DpmSettings, history: DpmHistory,
        rnd: random.Random) -> None:
    shuffled = list(hosts)
    rnd.shuffle(shuffled)
    assert decide(hosts, settings, history) == decide(shuffled, settings, history)


@given(clusters(), settings_st)
def test_above_the_band_a_standby_host_is_woken(hosts: list[DpmHost],
                                                settings: DpmSettings) -> None:
    on = [h for h in hosts if h.state is ON]
    demand = demand_of(hosts)
    above = demand.cpus > settings.high * sum(h.cpus for h in on) \
        or demand.memory_mib > settings.high * sum(h.memory_mib for h in on)
    standby = {h.name for h in hosts if h.state is STANDBY}
    ready = DpmHistory(Trend.ABOVE, settings.wake_rounds, None)  # the streak is long enough
    action = decide(hosts, settings, ready).action
    if above and standby:
        assert action.kind is ActionKind.WAKE and action.host in standby
    if action.kind is ActionKind.WAKE:
        assert action.host in standby
