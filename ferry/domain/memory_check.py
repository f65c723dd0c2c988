"""Comparing a migration's copy of the guest RAM with the source before it runs.

Why: under TCG, QEMU 7.2 can lose a guest write during pre-copy. A store that takes the
"not dirty" slow path marks its page dirty and then makes the TLB entry writable again;
when the migration thread syncs the dirty bitmap in between (vCPUs run without the big
lock), the page is sent, its dirty bit cleared, and later stores through the fast path
are never tracked. The destination then holds a stale page. Seen here as guests spinning
right after a completed migration (a kernel hrtimer tree with a node pointing at itself,
written on the source and stale on the destination). KVM tracks dirty pages itself and
has no such race; the check is for TCG hosts unless asked for.

The check runs while both copies are paused (after the stream, before `cont`): xxh3-64
digests of CHUNK_BYTES chunks first, then of the pages of the chunks that differ; those
pages are copied from the source to the destination and compared again.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

PAGE_BYTES = 4096
CHUNK_BYTES = 2 << 20
PAGES_PER_CHUNK = CHUNK_BYTES // PAGE_BYTES
MAX_PAGES_PER_CALL = 4096  # 16 MiB of page data in one agent request
# More differing pages than this is not a lost write or two: the copy is not repaired
# (the migration reverts to the source instead).
MAX_REPAIR_PAGES = 16384


class VerifyMemory(StrEnum):
    AUTO = "auto"  # on when the source or the target host runs TCG
    ON = "on"
    OFF = "off"


class MemoryCheck(BaseModel):
    """What the check before `cont` found (MigrationRecord.memory_check)."""

    model_config = ConfigDict(frozen=True)
    chunks: int = Field(ge=0)
    differing_chunks: int = Field(default=0, ge=0)
    repaired_pages: int = Field(default=0, ge=0)
    ms: int = Field(default=0, ge=0)
    # Set when the check could not run (the migration went on unverified, as before).
    skipped: str | None = None


def wanted(mode: VerifyMemory, accels: Sequence[str]) -> bool:
    """Whether to check, given the accelerators of the two hosts."""
    if mode is VerifyMemory.AUTO:
        return any(accel == "tcg" for accel in accels)
    return mode is VerifyMemory.ON


def unpack(packed: bytes) -> list[int]:
    if len(packed) % 8:
        raise ValueError(f"{len(packed)} bytes is not a list of u64 digests")
    return array.array("Q", packed).tolist()


def differing(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """Indexes where the two digest lists differ; unequal lengths differ everywhere
    (a RAM size mismatch is not a few lost writes)."""
    if len(source) != len(target):
        raise ValueError(f"the source has {len(source)} digests, the target "
                         f"{len(target)}: the copies are not the same size")
    return [i for i, (a, b) in enumerate(zip(source, target, strict=True)) if a != b]


def pages_of(chunks: Sequence[int], page_indexes: Sequence[int]) -> list[int]:
    """Global page numbers from positions in the page digests of `chunks` (listed chunk
    after chunk, PAGES_PER_CHUNK each; a short last chunk only ends the list)."""
    return [chunks[i // PAGES_PER_CHUNK] * PAGES_PER_CHUNK + i % PAGES_PER_CHUNK
            for i in page_indexes]


def batches(pages: Sequence[int], size: int = MAX_PAGES_PER_CALL) -> list[list[int]]:
    return [list(pages[i:i + size]) for i in range(0, len(pages), size)]
