"""The event log's vocabulary (pure): the kinds of events, the `since` a user types, and
a page request. The store keeps the events (store/events.py); control/eventlog.py
records them; api/event_routes.py serves them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from ferry.domain.errors import InvalidInput
from ferry.domain.units import parse_duration_ms

# Who caused an event that no API request caused (the DRS loop, a resumed job, HA).
SYSTEM = "system"
# Event ids are 64-bit signed (SQLite INTEGER, PostgreSQL BIGINT): a larger one is no
# id at all, and would reach the database as an int it cannot bind (an HTTP 500 before
# this bound).
MAX_EVENT_ID = 2**63 - 1
MAX_PAGE = 1000


class EventKind(StrEnum):
    # Requests: every action the API took (`audit`) and every request it refused.
    AUDIT = "audit"
    REQUEST_REFUSED = "request_refused"
    RECONCILE = "reconcile"  # the inventory corrected to what the agents report
    MIGRATION_STARTED = "migration_started"
    MIGRATION_ENDED = "migration_ended"
    LEVER = "lever"  # a convergence lever pulled during a migration (throttle, ...)
    DRS_MOVE = "drs_move"
    RELOCATION_STARTED = "relocation_started"
    RELOCATION_ENDED = "relocation_ended"
    HA_RESTART = "ha_restart"
    SCHEDULE_RUN = "schedule_run"  # a scheduled task's run ended (or was missed)
    HA = "ha"  # HA settings, priorities, host health changes, admission refusals


def parse_since(text: str, now: float) -> float:
    """The epoch time `text` names: a duration back from `now` ("1h", "30min", "90s",
    "2d"), an ISO 8601 time ("2026-11-26T14:00:00Z"; without a zone, UTC), or epoch
    seconds ("1764165600.5", what older clients send). InvalidInput names `since`."""
    value = text.strip()
    if not value:
        raise InvalidInput("since is empty", "pass e.g. since=1h, 30min or an ISO time")
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidInput(f"since {text!r} is not a time",
                               "pass a duration (1h), an ISO time or epoch seconds >= 0")
        return seconds
    if value[-1:].isalpha() and value[:1].isdigit() and "-" not in value:
        back = _duration_s(value, text)
        if not math.isfinite(now - back):
            raise InvalidInput(f"since {text!r} is too far back", "pass e.g. since=30d")
        return now - back
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"since {text!r} is neither a duration nor an ISO time",
                           "pass e.g. since=1h, since=30min or "
                           "since=2026-11-26T14:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _duration_s(value: str, text: str) -> float:
    # Days and "m" for minutes are what people type for a log's window; the rest is
    # the units the CLI accepts elsewhere (ms, s, min, h).
    lowered = value.lower()
    if lowered.endswith("d") and lowered[:-1].replace(".", "", 1).isdigit():
        return float(lowered[:-1]) * 86_400
    if lowered.endswith("m") and lowered[:-1].replace(".", "", 1).isdigit():
        return float(lowered[:-1]) * 60
    try:
        return parse_duration_ms(lowered) / 1000
    except OverflowError:  # more digits than a float holds
        return math.inf
    except InvalidInput:
        raise InvalidInput(f"since {text!r} has an unknown unit",
                           "use s, m or min, h or d (e.g. since=30m)") from None


@dataclass(frozen=True)
class EventQuery:
    """One page of the log. Without `after`: the newest events, newest first (page back
    with `before`, the last id seen). With `after`: the events after that id, oldest
    first (catch up, then follow). Filters: the VM the event is about, a start time."""

    limit: int = 100
    after: int | None = None
    before: int | None = None
    vm: str | None = None
    since: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE:
            raise InvalidInput(f"limit {self.limit} is out of range",
                               f"pass limit between 1 and {MAX_PAGE}")
        for name, value in (("after", self.after), ("before", self.before)):
            if value is not None and not 0 <= value <= MAX_EVENT_ID:
                raise InvalidInput(f"{name} {value} is not an event id",
                                   f"pass an id between 0 and {MAX_EVENT_ID}")
        if self.after is not None and self.before is not None:
            raise InvalidInput("after and before together are ambiguous",
                               "page forward with after, or back with before")

    @property
    def ascending(self) -> bool:
        return self.after is not None
