"""The guest probe's serial heartbeat line, parsed.

The probe (guest/probe.c) prints once per second:
    FERRY-PROBE v1 seq=12 uptime_ms=12004 mem_mib=64 rate_mib_s=10 pages_written=30720
        mem_errors=0 disk_errors=0
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

_LINE = re.compile(r"FERRY-PROBE v1((?: [a-z_]+=\d+)+)\s*$")
_FIELDS = ("seq", "uptime_ms", "mem_mib", "rate_mib_s", "pages_written", "mem_errors",
           "disk_errors")


class Heartbeat(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int
    uptime_ms: int
    mem_mib: int
    rate_mib_s: int
    pages_written: int
    mem_errors: int
    disk_errors: int
    disk_written: int = 0  # disk blocks (4 KiB) rewritten since start
    disk_passes: int = 0  # full verify passes over the probe's disk region

    @property
    def integrity_errors(self) -> int:
        return self.mem_errors + self.disk_errors


def parse_heartbeat(line: str) -> Heartbeat | None:
    """Return the heartbeat in `line`, or None if the line is not a complete one."""
    match = _LINE.search(line)
    if not match:
        return None
    values: dict[str, int] = {}
    for pair in match.group(1).split():
        key, _, value = pair.partition("=")
        values[key] = int(value)
    if not all(f in values for f in _FIELDS):
        return None
    extra = {k: values[k] for k in ("disk_written", "disk_passes") if k in values}
    return Heartbeat(**{f: values[f] for f in _FIELDS}, **extra)


def heartbeats(lines: Iterable[str]) -> list[Heartbeat]:
    return [hb for hb in map(parse_heartbeat, lines) if hb is not None]


def last_heartbeat(lines: Iterable[str]) -> Heartbeat | None:
    found = heartbeats(lines)
    return found[-1] if found else None
