"""Scheduled tasks, the pure part: cron checking, due times, what a missed run gets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.domain.errors import InvalidInput
from ferry.domain.schedules import (
    DrsApplyAction,
    MigrateAction,
    MissedPolicy,
    RunOutcome,
    Schedule,
    ScheduleRun,
    ScheduleSpec,
    check_cron,
    count_due,
    decide_missed,
    latest_due,
    next_due,
)


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def task(cron: str = "0 2 * * *", missed: MissedPolicy = MissedPolicy.SKIP,
         grace_s: int = 3600, created: str = "2026-01-01T00:00:00", tz: str = "UTC"
         ) -> Schedule:
    spec = ScheduleSpec(cron=cron, action=MigrateAction(vm="web1", target="host2"),
                        tz=tz, missed=missed, grace_s=grace_s).checked()
    return Schedule(id="t1", spec=spec, created_at=ts(created))


def ran(at: int, outcome: RunOutcome = RunOutcome.SUCCEEDED) -> ScheduleRun:
    return ScheduleRun(id=1, schedule_id="t1", scheduled_at=at, outcome=outcome)


# --- cron ------------------------------------------------------------------------
@pytest.mark.parametrize("expr, says", [
    ("61 * * * *", "the minute field '61' is not valid"),
    ("0 25 * * *", "the hour field '25' is not valid"),
    ("0 2 * 13 *", "the month field '13' is not valid"),
    ("0 2 * * funday", "the day of week field 'funday' is not valid"),
    ("0 2 * *", "has 4 fields, not 5 or 6"),
    ("0 2 * * * * 2030", "has 7 fields"),
    ("", "has 0 fields"),
    ("0 2 30 2 *", "matches no date"),
    ("R 2 * * *", "random or hashed"),
    ("H 2 * * *", "random or hashed"),
    ("@reboot", "not a schedule alias"),
])
def test_a_bad_cron_names_what_is_wrong(expr: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as info:
        check_cron(expr)
    assert info.value.fix  # and what to do


def test_a_cron_is_normalised_and_aliases_and_seconds_are_taken() -> None:
    assert check_cron("  0   2 * * * ") == "0 2 * * *"
    assert check_cron("@Daily") == "@daily"
    assert check_cron("* * * * * */10") == "* * * * * */10"
    assert check_cron("0 2 * * mon-fri") == "0 2 * * mon-fri"


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(InvalidInput, match="time zone 'Mars/Olympus' is not known"):
        task(tz="Mars/Olympus")


def test_due_times_in_utc_and_in_a_zone() -> None:
    spec = task().spec
    assert next_due(spec, ts("2026-01-01T01:59:59")) == ts("2026-01-01T02:00:00")
    assert next_due(spec, ts("2026-01-01T02:00:00")) == ts("2026-01-02T02:00:00")
    assert latest_due(spec, ts("2026-01-01T02:00:00")) == ts("2026-01-01T02:00:00")
    assert latest_due(spec, ts("2026-01-01T01:59:59")) == ts("2025-12-31T02:00:00")
    paris = task(tz="Europe/Paris").spec  # 02:00 in Paris is 01:00 UTC in winter
    assert next_due(paris, ts("2026-01-01T00:00:00")) == ts("2026-01-01T01:00:00")
    seconds = task(cron="* * * * * */10").spec  # sixth field: seconds
    assert next_due(seconds, ts("2026-01-01T00:00:01")) == ts("2026-01-01T00:00:10")
    assert count_due(seconds, ts("2026-01-01T00:00:10"), ts("2026-01-01T00:01:00")) == 6


def test_a_local_time_the_clocks_repeat_runs_once() -> None:
    paris = task(cron="30 2 * * *", tz="Europe/Paris").spec
    # 25 October 2026: 02:30 comes twice in Paris (00:30 and 01:30 UTC); run at the first
    first = next_due(paris, ts("2026-10-24T12:00:00"))
    assert first == ts("2026-10-25T00:30:00")
    assert next_due(paris, first) == ts("2026-10-26T01:30:00")
    assert latest_due(paris, ts("2026-10-25T02:00:00")) == first
    # 29 March: 02:30 does not exist; croniter runs it at 03:00 local (01:00 UTC)
    assert next_due(paris, ts("2026-03-28T12:00:00")) == ts("2026-03-29T01:00:00")


# --- decide_missed -----------------------------------------------------------------
UP_LONG_AGO = 0.0


def test_nothing_due_waits_until_the_next_time() -> None:
    d = decide_missed(task(), ts("2026-01-01T01:00:00"), None, UP_LONG_AGO)
    assert d.run_at is None and d.missed is None
    assert d.next_check == ts("2026-01-01T02:00:00")


def test_due_while_up_runs_on_time_and_never_again() -> None:
    t = task()
    now = ts("2026-01-01T02:00:00") + 0.2
    d = decide_missed(t, now, None, UP_LONG_AGO)
    assert d.run_at == ts("2026-01-01T02:00:00") and not d.late and d.missed is None
    again = decide_missed(t, now + 5, ran(d.run_at), UP_LONG_AGO)
    assert again.run_at is None and again.missed is None


def test_a_time_before_the_task_existed_is_not_due() -> None:
    t = task(created="2026-01-01T02:00:00")  # made at the very second: not this one
    d = decide_missed(t, ts("2026-01-01T02:00:30"), None, UP_LONG_AGO)
    assert d.run_at is None and d.missed is None


def test_due_while_down_is_skipped_by_default() -> None:
    up = ts("2026-01-01T02:10:00")
    d = decide_missed(task(), up + 1, None, up)
    assert d.run_at is None
    assert d.missed is not None and d.missed.while_down
    assert d.missed.first == d.missed.last == ts("2026-01-01T02:00:00")
    assert d.missed.count == 1 and "skipped" in d.missed.why


def test_due_while_down_runs_late_with_policy_run_within_grace() -> None:
    up = ts("2026-01-01T02:10:00")
    d = decide_missed(task(missed=MissedPolicy.RUN, grace_s=900), up + 1, None, up)
    assert d.run_at == ts("2026-01-01T02:00:00") and d.late and d.missed is None


def test_past_the_grace_window_even_policy_run_is_missed() -> None:
    up = ts("2026-01-01T03:00:00")
    d = decide_missed(task(missed=MissedPolicy.RUN, grace_s=900), up + 1, None, up)
    assert d.run_at is None
    assert d.missed is not None and "grace window of 900 s" in d.missed.why


def test_several_missed_are_one_range_and_only_the_latest_may_run() -> None:
    up = ts("2026-01-05T02:05:00")  # down since 1 January: four 02:00 runs due
    skip = decide_missed(task(), up + 1, None, up)
    assert skip.run_at is None and skip.missed is not None
    assert (skip.missed.first, skip.missed.last, skip.missed.count) == (
        ts("2026-01-01T02:00:00"), ts("2026-01-05T02:00:00"), 5)
    late = decide_missed(task(missed=MissedPolicy.RUN), up + 1, None, up)
    assert late.run_at == ts("2026-01-05T02:00:00") and late.late
    assert late.missed is not None and late.missed.last == ts("2026-01-04T02:00:00")
    assert late.missed.count == 4


# --- the promise: one scheduled time never runs twice, none is left unaccounted -------
CRONS = ("* * * * * */7", "* * * * * */3", "*/1 * * * *", "* * * * * 0,30", "@hourly")
Step = tuple[int, bool]  # (seconds later, up or down from then on)


@settings(max_examples=200, deadline=None)
@given(cron=st.sampled_from(CRONS), policy=st.sampled_from(list(MissedPolicy)),
       grace=st.integers(1, 120),
       steps=st.lists(st.tuples(st.integers(0, 200), st.booleans()), min_size=1,
                      max_size=40),
       stale=st.lists(st.booleans(), min_size=40, max_size=40),
       tz=st.sampled_from(["UTC", "Europe/Paris"]))
def test_no_scheduled_time_is_ever_run_twice(cron: str, policy: MissedPolicy, grace: int,
                                             steps: list[Step], stale: list[bool],
                                             tz: str) -> None:
    """Loops wake at any times, the control plane goes down and up, and a second loop
    sometimes decides from a stale history (it read before the other's claim landed):
    the store's claim (unique, and refused at or below the latest recorded time) keeps
    every scheduled time to one record, the
    decision never proposes a recorded time to a loop that has read it, every run is a
    due time, on time or late only by policy and grace, and every due time up to the
    last wake is accounted for."""
    # Paris's clocks go back at 01:00 UTC that night: a local hour repeats
    t = task(cron=cron, missed=policy, grace_s=grace, created="2026-10-25T00:50:00", tz=tz)
    now = float(t.created_at)
    up_since, up = now, True
    claimed: dict[int, RunOutcome] = {}
    history: list[ScheduleRun] = []
    for i, (gap, goes_up) in enumerate(steps):
        now += gap + 0.25
        if goes_up and not up:
            up_since = now
        up = goes_up
        if not up:
            continue
        seen = history[:-1] if stale[i] and history else history
        last = max(seen, key=lambda r: r.scheduled_at) if seen else None
        d = decide_missed(t, now, last, up_since)
        mark = last.scheduled_at if last else int(t.created_at)
        for at, outcome in ((d.missed.last if d.missed else None, RunOutcome.MISSED),
                            (d.run_at, RunOutcome.SUCCEEDED)):
            if at is None:
                continue
            assert at > mark, "proposed a time the loop had seen recorded"
            assert latest_due(t.spec, at) == at, "not a due time"
            if outcome is RunOutcome.SUCCEEDED:
                assert now - at <= grace
                assert at >= up_since or policy is MissedPolicy.RUN
            if claimed and at <= max(claimed):  # the store's claim refuses: not acted on
                continue
            claimed[at] = outcome
            history.append(ran(at, outcome))
    runs = [r.scheduled_at for r in history]
    assert len(runs) == len(set(runs))
    assert runs == sorted(runs)  # each record moves the watermark on
    if up:  # one fresh look: then every due time up to now is run or reported missed
        final = decide_missed(t, now, ran(max(runs)) if runs else None, up_since)
        mark = max([*runs, final.run_at or 0, final.missed.last if final.missed else 0,
                    int(t.created_at)])
        assert next_due(t.spec, mark) > now


def test_describe_is_short_and_names_the_action() -> None:
    assert DrsApplyAction().describe() == "DRS apply"
    assert MigrateAction(vm="web1", target="host2").describe() == "migrate web1 to host2"
