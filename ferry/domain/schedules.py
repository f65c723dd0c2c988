"""Scheduled tasks (pure): what a task does, when it is due, and what to do about a run
that came due while nobody could run it.

A task's runs are identified by their scheduled time (whole seconds since the epoch).
The control plane claims a run by persisting (task, scheduled time) under a unique
constraint before it acts, so one scheduled time never runs twice. The decision here
only ever proposes scheduled times after the task's latest recorded one (its
watermark), so the history of a task is a sequence of ranges of due times, each ending
in one recorded run: run, or reported missed.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, tzinfo
from enum import StrEnum
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter
from pydantic import Field

from ferry.domain.auth import Privilege
from ferry.domain.errors import InvalidInput
from ferry.domain.specs import Frozen, Name

# The fields of an expression, in croniter's order: five as in crontab(5), and an
# optional sixth for seconds (croniter puts it last; Quartz's seconds-first form is not
# accepted, so a six-field line means one thing only).
FIELDS = ("minute", "hour", "day of month", "month", "day of week", "second")
RANGES = ("0-59", "0-23", "1-31", "1-12 or jan-dec", "0-6 or sun-sat", "0-59")
ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# croniter's random (R) and hashed (H) fields give other times at each evaluation; a run
# is claimed by its scheduled time, so that time must be the same however often it is
# computed, or one run could be claimed twice under two times.
_RANDOM_FIELD = re.compile(r"^[HhRr](\(|/|$)")
DEFAULT_GRACE_S = 3600
MAX_COUNTED = 1000  # missed runs counted one by one up to this (a cron every second…)
CRON_HELP = ("five fields `minute hour day-of-month month day-of-week` (e.g. `0 2 * * *` "
             "for 02:00 every day), an optional sixth for seconds, or @daily/@hourly/…")


class ActionKind(StrEnum):
    MIGRATE = "migrate"
    RELOCATE = "relocate"
    MAINTENANCE = "maintenance"
    DRS_APPLY = "drs_apply"


class MissedPolicy(StrEnum):
    """What a run that came due while the control plane was down gets once it is up."""

    SKIP = "skip"  # reported missed, not run (the default: 02:00's migration at 09:00 can hurt)
    RUN = "run"  # run late, if still within the task's grace window


class RunOutcome(StrEnum):
    RUNNING = "running"  # claimed and started; its action (or the job it began) not ended
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSED = "missed"  # never started: came due while down (skip) or past the grace window
    # The control plane stopped while the run was in progress and it had not yet started
    # a job that could be followed: whether its action happened is not known here.
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        return self is not RunOutcome.RUNNING


class MigrateAction(Frozen):
    kind: Literal[ActionKind.MIGRATE] = ActionKind.MIGRATE
    vm: Name
    target: Name

    def describe(self) -> str:
        return f"migrate {self.vm} to {self.target}"


class RelocateAction(Frozen):
    kind: Literal[ActionKind.RELOCATE] = ActionKind.RELOCATE
    vm: Name
    datastore: Name
    disk: Name | None = None  # needed when the VM has several

    def describe(self) -> str:
        which = f"disk {self.disk}" if self.disk else "disk"
        return f"relocate {self.vm}'s {which} to {self.datastore}"


class MaintenanceAction(Frozen):
    kind: Literal[ActionKind.MAINTENANCE] = ActionKind.MAINTENANCE
    host: Name
    on: bool = True

    def describe(self) -> str:
        return f"maintenance {self.host} {'on' if self.on else 'off'}"


class DrsApplyAction(Frozen):
    kind: Literal[ActionKind.DRS_APPLY] = ActionKind.DRS_APPLY

    def describe(self) -> str:
        return "DRS apply"


Action = Annotated[MigrateAction | RelocateAction | MaintenanceAction | DrsApplyAction,
                   Field(discriminator="kind")]

# The privilege a token needs to schedule an action, the same its REST call needs.
PRIVILEGE_OF: dict[ActionKind, Privilege] = {
    ActionKind.MIGRATE: Privilege.VM_MIGRATE,
    ActionKind.RELOCATE: Privilege.VM_RELOCATE,
    ActionKind.MAINTENANCE: Privilege.HOST_MAINTENANCE,
    ActionKind.DRS_APPLY: Privilege.DRS_APPLY,
}


class ScheduleSpec(Frozen):
    """What a user asks for: an action, when (cron in `tz`), and what a missed run gets."""

    cron: str
    action: Action
    tz: str = "UTC"
    missed: MissedPolicy = MissedPolicy.SKIP
    # How late a run may still start: past it a run is reported missed, whatever the
    # policy (a run due while the control plane was down runs late only with `run`).
    grace_s: int = Field(DEFAULT_GRACE_S, ge=1, le=7 * 86400)

    def checked(self) -> ScheduleSpec:
        """This spec with its cron normalised; InvalidInput naming what is wrong (not a
        pydantic validator: those report ValueErrors, without our problem and fix)."""
        zone(self.tz)
        return self.model_copy(update={"cron": check_cron(self.cron)})


class Schedule(Frozen):
    id: str
    spec: ScheduleSpec
    created_at: float
    # Runs act with their creator's rights: checked again at each run (a revoked token's
    # schedules stop running).
    created_by: str | None = None  # token id
    created_by_name: str | None = None


class ScheduleRun(Frozen):
    id: int
    schedule_id: str
    scheduled_at: int
    outcome: RunOutcome
    started_at: float | None = None
    ended_at: float | None = None
    detail: str = ""
    late: bool = False  # started after an outage (policy run), not at its time
    # For a missed row: how many due times it stands for (the earliest first_missed_at).
    missed_count: int = 0
    first_missed_at: int | None = None
    # The jobs the run started (followed to their end, also after a restart).
    migrations: tuple[str, ...] = ()
    relocations: tuple[str, ...] = ()


class MissedRange(Frozen):
    first: int
    last: int  # the run recorded (as missed) is this one; it stands for all from `first`
    count: int  # capped at MAX_COUNTED
    while_down: bool  # came due before this control plane's loop was up
    why: str


class Decision(Frozen):
    """What to do now for one task: report a range missed, run one time, both, or wait."""

    missed: MissedRange | None = None
    run_at: int | None = None
    late: bool = False
    next_check: float


# --- cron ----------------------------------------------------------------------------
def zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"time zone {name!r} is not known",
                           "give an IANA name such as UTC or Europe/Paris") from None


def check_cron(expr: str) -> str:
    """The expression, normalised; InvalidInput naming the wrong field otherwise."""
    text = " ".join(expr.split())
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise InvalidInput(f"cron {expr!r}: {text} is not a schedule alias",
                               f"use one of {', '.join(ALIASES)}, or {CRON_HELP}")
        return text.lower()
    fields = text.split(" ") if text else []
    if len(fields) not in (5, 6):
        raise InvalidInput(f"cron {expr!r} has {len(fields)} fields, not 5 or 6",
                           f"give {CRON_HELP}; quote it on the command line")
    for index, field in enumerate(fields):
        name = f"the {FIELDS[index]} field {field!r}"
        if _RANDOM_FIELD.match(field):
            raise InvalidInput(f"cron {expr!r}: {name} is random or hashed",
                               "give fixed times: a run is known by its scheduled time")
        alone = ["*"] * len(fields)
        alone[index] = field
        if not croniter.is_valid(" ".join(alone)):
            raise InvalidInput(f"cron {expr!r}: {name} is not valid",
                               f"the {FIELDS[index]} takes {RANGES[index]}, lists (1,5), "
                               "ranges (1-5) and steps (*/10)")
    try:
        croniter(text, 0.0).get_next(float)
    except CroniterBadDateError:
        raise InvalidInput(f"cron {expr!r} matches no date",
                           "check the day of month against the month (e.g. 30 February)"
                           ) from None
    except CroniterError as exc:  # every field alone was fine: their combination is not
        raise InvalidInput(f"cron {expr!r} is not valid: {exc}", f"give {CRON_HELP}"
                           ) from None
    return text


def _iter(spec: ScheduleSpec, at: float) -> croniter[float]:
    """croniter over the spec's zone (DST handled there), times as epoch floats."""
    try:
        return croniter(spec.cron, datetime.fromtimestamp(at, zone(spec.tz)),
                        ret_type=float)
    except CroniterBadCronError as exc:  # validated when made; stored data went bad
        raise InvalidInput(f"cron {spec.cron!r} is not valid: {exc}") from None


def _repeated(spec: ScheduleSpec, at: float) -> bool:
    """`at` is the second occurrence of a local time (the hour a zone's clocks go back
    repeats): runs once, at the first, as crontab does, not once in each."""
    return datetime.fromtimestamp(at, zone(spec.tz)).fold == 1


def next_due(spec: ScheduleSpec, after: float) -> int:
    """The first scheduled time strictly after `after`."""
    it = _iter(spec, math.floor(after))
    due = it.get_next(float)
    while _repeated(spec, due):
        due = it.get_next(float)
    return int(due)


def latest_due(spec: ScheduleSpec, at: float) -> int:
    """The latest scheduled time at or before `at`."""
    # croniter's get_prev is strictly before its base: base one second on.
    it = _iter(spec, math.floor(at) + 1)
    due = it.get_prev(float)
    while _repeated(spec, due):
        due = it.get_prev(float)
    return int(due)


def count_due(spec: ScheduleSpec, first: int, last: int, cap: int = MAX_COUNTED) -> int:
    """How many scheduled times lie in [first, last] (first is one), at most `cap`."""
    count, due = 1, first
    while count < cap:
        due = next_due(spec, due)
        if due > last:
            break
        count += 1
    return count


def watermark(schedule: Schedule, last_run: ScheduleRun | None) -> int:
    """Every scheduled time at or before this is dealt with (run or reported missed)."""
    if last_run is not None:
        return last_run.scheduled_at
    # Created at 14:00:00.5 with `* * * * *`: the first run is 14:01, not 14:00.
    return math.floor(schedule.created_at)


def decide_missed(schedule: Schedule, now: float, last_run: ScheduleRun | None,
                  up_since: float) -> Decision:
    """What to do at `now` for every due time since the task's watermark.

    `last_run` is the task's run with the latest scheduled time; `up_since` is when this
    control plane's schedule loop started: a time due before it came while the loop
    could not run it. Of all due times not yet dealt with, at most the latest runs
    (on time; late after an outage only with policy `run`; never past the grace
    window); all earlier ones are reported missed as one range. Never proposes a time
    at or before the watermark, so a recorded time is never proposed again."""
    spec = schedule.spec
    mark = watermark(schedule, last_run)
    first = next_due(spec, mark)
    if first > now:
        return Decision(next_check=first)
    latest = latest_due(spec, now)
    while_down = latest < up_since
    runnable = now - latest <= spec.grace_s and (
        not while_down or spec.missed is MissedPolicy.RUN)
    missed_last = latest if not runnable else (
        latest_due(spec, latest - 1) if first < latest else None)
    missed = None
    if missed_last is not None and missed_last >= first:
        down = missed_last < up_since
        if runnable:
            why = "only the latest due run is run, late" if while_down else \
                "the scheduler fell behind; only the latest due run is run"
        elif now - latest > spec.grace_s:
            why = f"past the grace window of {spec.grace_s} s"
        else:
            why = f"missed runs are skipped (policy {spec.missed})"
        missed = MissedRange(first=first, last=missed_last,
                             count=count_due(spec, first, missed_last), while_down=down,
                             why=why)
    return Decision(missed=missed, run_at=latest if runnable else None,
                    late=runnable and while_down, next_check=next_due(spec, now))


def describe_missed(missed: MissedRange, spec: ScheduleSpec) -> str:
    """E.g. `missed 3 runs due from 2026-01-01T02:00:00+00:00 while the control plane
    was down: missed runs are skipped (policy skip); not run`."""
    when = "while the control plane was down" if missed.while_down else "late"
    if missed.count > 1:
        count = f"{missed.count}+" if missed.count >= MAX_COUNTED else str(missed.count)
        first = datetime.fromtimestamp(missed.first, zone(spec.tz)).isoformat()
        return f"missed {count} runs due from {first} {when}: {missed.why}; not run"
    return f"missed {when}: {missed.why}; not run"
