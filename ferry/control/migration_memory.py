"""The check of the destination's RAM before it runs (domain/memory_check.py says why).

Both copies are paused: the source sent everything, the destination never ran. Chunk
digests of both sides are compared; pages of differing chunks are compared; differing
pages are copied from the source into the destination and compared again. A copy that
cannot be made equal is rolled back (the switch is not recorded yet: the destination
goes, the paused source runs on with the only current guest). A check that cannot
run at all (an agent or a QEMU without memfd RAM) is recorded as skipped and the
migration goes on as it would have without it.
"""

from __future__ import annotations

import asyncio
import time

from ferry.control.migration_job import Job, RollBack, log
from ferry.domain.errors import FerryError
from ferry.domain.memory_check import (
    MAX_REPAIR_PAGES,
    MemoryCheck,
    batches,
    differing,
    pages_of,
    unpack,
    wanted,
)
from ferry.domain.records import MigrationRecord


async def is_wanted(job: Job, rec: MigrationRecord) -> bool:
    hosts = await asyncio.gather(job.store.host(rec.source), job.store.host(rec.target))
    # A host whose facts are unknown: assume the risky accelerator.
    accels = [h.facts.accel if h.facts else "tcg" for h in hosts]
    return wanted(rec.options.verify_memory, accels)


def whole_digests(job: Job, rec: MigrationRecord) -> asyncio.Task[tuple[bytes, bytes]]:
    """Both copies' chunk digests, asked for at once (read-only: a request that comes
    before the destination holds the whole stream is refused there, and asked again by
    verify_and_repair)."""
    async def both() -> tuple[bytes, bytes]:
        src, dst = await asyncio.gather(job.source.ram_digests(rec.vm),
                                        job.target.ram_digests(rec.vm))
        return src, dst
    task = asyncio.create_task(both())
    # One dropped unawaited (the destination turned out not to be checkable) keeps its
    # error to itself.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def verify_and_repair(job: Job, rec: MigrationRecord,
                            asked: asyncio.Task[tuple[bytes, bytes]] | None = None,
                            began: float | None = None) -> MemoryCheck:
    """What was found (and repaired); for a migration where is_wanted, once the paused
    destination was confirmed. `asked`: whole_digests started before that (at
    `began`)."""
    began = began or time.monotonic()
    try:
        try:
            src, dst = await (asked or whole_digests(job, rec))
        except FerryError:
            if asked is None:
                raise
            src, dst = await whole_digests(job, rec)  # asked too early: again, now
        chunks = differing(unpack(src), unpack(dst))
    except (FerryError, ValueError) as exc:
        reason = exc.problem if isinstance(exc, FerryError) else str(exc)
        log.warning("migration %s: memory not verified: %s", rec.id, reason)
        return MemoryCheck(chunks=0, skipped=reason, ms=_ms(began))
    total = len(src) // 8
    if not chunks:
        return MemoryCheck(chunks=total, ms=_ms(began))
    try:
        pages = await _differing_pages(job, rec, tuple(chunks))
    except FerryError as exc:
        raise RollBack(f"the destination's memory differs from the source's and cannot "
                       f"be compared page by page ({exc.problem}); the VM stays on "
                       f"{rec.source}") from exc
    log.warning("migration %s: the destination's RAM differs from the source's in %d "
                "pages of %d chunks; copying them again", rec.id, len(pages), len(chunks))
    if len(pages) > MAX_REPAIR_PAGES:
        raise RollBack(f"the destination's memory differs from the source's in "
                       f"{len(pages)} pages: too many to repair, the VM stays on "
                       f"{rec.source}")
    try:
        for batch in batches(pages):
            data = await job.source.read_ram_pages(rec.vm, tuple(batch))
            await job.target.write_ram_pages(rec.vm, tuple(batch), data)
        left = await _differing_pages(job, rec, tuple(chunks))
    except FerryError as exc:
        raise RollBack(f"the destination's memory differs from the source's and could "
                       f"not be repaired ({exc.problem}); the VM stays on {rec.source}") from exc
    if left:
        raise RollBack(f"the destination's memory still differs from the source's in "
                       f"{len(left)} pages after the repair; the VM stays on {rec.source}")
    return MemoryCheck(chunks=total, differing_chunks=len(chunks), repaired_pages=len(pages),
                       ms=_ms(began))


async def _differing_pages(job: Job, rec: MigrationRecord, chunks: tuple[int, ...]
                           ) -> list[int]:
    try:
        src, dst = await asyncio.gather(job.source.ram_digests(rec.vm, chunks),
                                        job.target.ram_digests(rec.vm, chunks))
        return pages_of(chunks, differing(unpack(src), unpack(dst)))
    except ValueError as exc:
        raise RollBack(f"the destination's memory cannot be compared page by page "
                       f"({exc}); the VM stays on {rec.source}") from exc


def _ms(began: float) -> int:
    return round((time.monotonic() - began) * 1000)
