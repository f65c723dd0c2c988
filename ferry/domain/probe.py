"""The guest probe's serial output, parsed, and what it proves.

The probe (guest/probe.c) prints once per second:
    FERRY-PROBE v1 seq=12 uptime_ms=12004 mem_mib=64 rate_mib_s=10 pages_written=30720
        mem_errors=0 disk_errors=0 disk_written=0 disk_passes=0 mem_passes=2
        boot=16459765182229226411
Fields are only ever appended, and every value is decimal digits (the boot id too), so
an older parser still reads a newer line and this one reads an older probe's lines (the
missing fields take their defaults).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict

_LINE = re.compile(r"FERRY-PROBE v1((?: [a-z_]+=\d+)+)\s*$")
_FIELDS = ("seq", "uptime_ms", "mem_mib", "rate_mib_s", "pages_written", "mem_errors",
           "disk_errors")
_OPTIONAL = ("disk_written", "disk_passes", "mem_passes")
_ADDR = re.compile(r"FERRY-PROBE-ADDR page=0 vaddr=0x([0-9a-f]+) gpa=(?:0x([0-9a-f]+)|none)"
                   r" boot=(\d+)\s*$")
_ERROR = re.compile(r"FERRY-PROBE-ERROR page=(\d+) want_gen=(\d+) word=(\d+)"
                    r" got=0x([0-9a-f]+) want=0x([0-9a-f]+)")


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
    mem_passes: int = 0  # full verify passes over the probe's memory block
    boot_id: str = ""  # random per probe start; "" from a probe too old to print one

    @property
    def integrity_errors(self) -> int:
        return self.mem_errors + self.disk_errors


class ProbeAddress(BaseModel):
    """Where page 0 of the probe's memory block lives (printed once, before READY)."""

    model_config = ConfigDict(frozen=True)

    vaddr: int
    gpa: int | None  # guest-physical address; None when the guest kernel would not say
    boot_id: str


class PageError(BaseModel):
    """One FERRY-PROBE-ERROR line: a memory word that did not hold what the probe wrote."""

    model_config = ConfigDict(frozen=True)

    page: int
    want_gen: int
    word: int
    got: int
    want: int


_MASK = (1 << 64) - 1
_WORD_STEP = 0x9E3779B97F4A7C15
PAGE_SIZE = 4096


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def page_pattern(page: int, gen: int) -> bytes:
    """The 4 KiB the probe keeps in page `page` of its memory block at generation `gen`
    (fill_page() in guest/probe.c; x86 byte order): word 0 is (page << 32 | gen), word i
    is seed + i * step, seed a hash of word 0."""
    header = (page << 32) | gen
    seed = _mix64(header ^ 0x46455252595052)
    words = [header] + [(seed + i * _WORD_STEP) & _MASK for i in range(1, PAGE_SIZE // 8)]
    return b"".join(w.to_bytes(8, "little") for w in words)


def parse_heartbeat(line: str) -> Heartbeat | None:
    """Return the heartbeat in `line`, or None if the line is not a complete one."""
    match = _LINE.search(line)
    if not match:
        return None
    values: dict[str, int] = {}
    raw: dict[str, str] = {}
    for pair in match.group(1).split():
        key, _, value = pair.partition("=")
        values[key] = int(value)
        raw[key] = value
    if not all(f in values for f in _FIELDS):
        return None
    extra = {k: values[k] for k in _OPTIONAL if k in values}
    return Heartbeat(**{f: values[f] for f in _FIELDS}, **extra,
                     boot_id=raw.get("boot", ""))


def heartbeats(lines: Iterable[str]) -> list[Heartbeat]:
    return [hb for hb in map(parse_heartbeat, lines) if hb is not None]


def last_heartbeat(lines: Iterable[str]) -> Heartbeat | None:
    found = heartbeats(lines)
    return found[-1] if found else None


def probe_address(lines: Iterable[str]) -> ProbeAddress | None:
    """The last FERRY-PROBE-ADDR line in `lines` (one per probe start), parsed."""
    found = None
    for line in lines:
        match = _ADDR.search(line)
        if match:
            vaddr, gpa, boot = match.groups()
            found = ProbeAddress(vaddr=int(vaddr, 16), gpa=int(gpa, 16) if gpa else None,
                                 boot_id=boot)
    return found


def page_errors(lines: Iterable[str]) -> list[PageError]:
    """The FERRY-PROBE-ERROR lines in `lines` (the probe prints the first 10 only)."""
    found = []
    for line in lines:
        match = _ERROR.search(line)
        if match:
            page, gen, word, got, want = match.groups()
            found.append(PageError(page=int(page), want_gen=int(gen), word=int(word),
                                   got=int(got, 16), want=int(want, 16)))
    return found


def full_pass_after(after: Sequence[Heartbeat]) -> bool:
    """Whether a full memory verify pass that began after `after[0]` was printed has
    completed by `after[-1]`.

    The pass running when after[0] was printed (number p+1, p = after[0].mem_passes)
    began before it; the next one (p+2) began after p+1 ended, so after[0]'s moment, and
    mem_passes >= p+2 says it completed.
    """
    return bool(after) and after[-1].mem_passes >= after[0].mem_passes + 2


def judge_intact(before: Heartbeat, after: Sequence[Heartbeat]) -> list[str]:
    """What is wrong with a guest that should have lived through an event (a migration,
    a failed one, a relocation) untouched; [] if nothing.

    `before` was printed before the event; `after` are the distinct heartbeats seen
    afterwards in the order printed, the first one printed after the event ended (after
    the switch, for a migration). Intact means: the same probe run (boot id) throughout,
    counters that never went back, uptime (and pages written, when the probe dirties
    memory) grown, a full memory pass that began after the event completed, and no
    memory or disk integrity error ever (the counters are cumulative since boot).
    """
    if not after:
        return ["no probe heartbeat after the event"]
    problems: list[str] = []
    if not before.boot_id or any(not hb.boot_id for hb in after):
        problems.append("the probe prints no boot id (an old probe?): a rebooted guest "
                        "cannot be told from a migrated one")
    rebooted = sorted({hb.boot_id for hb in after if hb.boot_id != before.boot_id})
    if rebooted:
        problems.append(f"the guest rebooted: boot id {before.boot_id or '?'} before, "
                        f"{', '.join(b or '?' for b in rebooted)} after")
    chain = [before, *after]
    for prev, cur in itertools.pairwise(chain):
        for field in ("seq", "uptime_ms", "pages_written", "mem_passes"):
            old, new = getattr(prev, field), getattr(cur, field)
            if new < old:
                problems.append(f"{field} went back from {old} to {new} "
                                f"(seq {prev.seq} -> {cur.seq})")
    last = after[-1]
    if last.uptime_ms <= before.uptime_ms:
        problems.append(f"uptime did not grow: {before.uptime_ms} ms before, "
                        f"{last.uptime_ms} ms at the last heartbeat")
    if before.rate_mib_s > 0 and last.pages_written <= before.pages_written:
        problems.append(f"the probe stopped dirtying memory: pages_written "
                        f"{before.pages_written} before, {last.pages_written} last")
    if not full_pass_after(after):
        problems.append(f"no full memory verify pass that began after the event has "
                        f"completed: mem_passes {after[0].mem_passes} just after, "
                        f"{last.mem_passes} last (needs {after[0].mem_passes + 2})")
    bad = [hb for hb in chain if hb.integrity_errors]
    if bad:
        mem_errors = max(hb.mem_errors for hb in chain)
        disk_errors = max(hb.disk_errors for hb in chain)
        problems.append(f"integrity errors: mem_errors={mem_errors} "
                        f"disk_errors={disk_errors} (first seen at seq {bad[0].seq})")
    return problems
