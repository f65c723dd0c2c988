"""A paused QEMU's guest RAM, seen through the memfd that backs it (argv: RAM_BACKEND).

The agent compares and repairs a migration's copy of the guest before the destination
runs (ferry/control/migration_memory.py says why: QEMU's TCG can lose a guest write
during pre-copy, so the copy may differ from the source in a few pages). Blocking file
I/O: callers run these in a thread.
"""

from __future__ import annotations

import array
import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import xxhash

from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.memory_check import CHUNK_BYTES, PAGE_BYTES, PAGES_PER_CHUNK

# QEMU names the memfd of a memory-backend-memfd object after the object's type.
MEMFD_LINK = "/memfd:memory-backend-memfd"


def ram_file(pid: int, size: int) -> Path:
    """The /proc path of the memfd holding QEMU `pid`'s guest RAM of `size` bytes."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError as exc:
        raise Conflict(f"cannot look at QEMU {pid}'s files: {exc}") from exc
    for entry in entries:
        try:
            if os.readlink(entry).startswith(MEMFD_LINK) and entry.stat().st_size == size:
                return entry
        except OSError:
            continue
    raise Conflict(f"QEMU {pid} has no memfd-backed guest RAM of {size} bytes",
                   "only VMs started by this version of the agent can be verified")


@contextmanager
def mapped(pid: int, size: int, writable: bool = False, populate: bool = False
           ) -> Iterator[memoryview]:
    """The guest RAM mapped shared: what QEMU's guest sees, byte for byte. `populate`
    for a pass over all of it: the kernel maps every page at once (192 MiB measured:
    32 ms instead of 40 to hash it all) rather than one fault per page."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(ram_file(pid, size), flags)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        how = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        with mmap.mmap(fd, size, flags=how, prot=prot) as mem:
            view = memoryview(mem)
            try:
                yield view
            finally:
                view.release()
    finally:
        os.close(fd)


def _packed(values: Iterator[int]) -> bytes:
    return array.array("Q", values).tobytes()


def chunk_digests(pid: int, size: int) -> bytes:
    """One xxh3-64 per CHUNK_BYTES of RAM, packed little-endian u64 (the last chunk may
    be shorter)."""
    with mapped(pid, size, populate=True) as ram:
        return _packed(xxhash.xxh3_64_intdigest(ram[at:at + CHUNK_BYTES])
                       for at in range(0, size, CHUNK_BYTES))


def page_digests(pid: int, size: int, chunks: Sequence[int]) -> bytes:
    """The pages' xxh3-64 of each of `chunks`, chunk after chunk, packed."""
    _check_indexes(chunks, (size + CHUNK_BYTES - 1) // CHUNK_BYTES, "chunk")
    with mapped(pid, size) as ram:
        def digests() -> Iterator[int]:
            for chunk in chunks:
                start = chunk * CHUNK_BYTES
                for at in range(start, min(start + CHUNK_BYTES, size), PAGE_BYTES):
                    yield xxhash.xxh3_64_intdigest(ram[at:at + PAGE_BYTES])
        return _packed(digests())


def read_pages(pid: int, size: int, pages: Sequence[int]) -> bytes:
    """The pages' contents, concatenated."""
    _check_indexes(pages, size // PAGE_BYTES, "page")
    with mapped(pid, size) as ram:
        return b"".join(bytes(ram[p * PAGE_BYTES:(p + 1) * PAGE_BYTES]) for p in pages)


def write_pages(pid: int, size: int, pages: Sequence[int], data: bytes) -> None:
    """Overwrite the pages with `data` (len(pages) pages, in that order)."""
    _check_indexes(pages, size // PAGE_BYTES, "page")
    if len(data) != len(pages) * PAGE_BYTES:
        raise InvalidInput(f"{len(data)} bytes for {len(pages)} pages",
                           f"send exactly {PAGE_BYTES} bytes per page")
    with mapped(pid, size, writable=True) as ram:
        for i, page in enumerate(pages):
            ram[page * PAGE_BYTES:(page + 1) * PAGE_BYTES] = \
                data[i * PAGE_BYTES:(i + 1) * PAGE_BYTES]


def flip_pages(pid: int, size: int, pages: Sequence[int]) -> None:
    """Invert every byte of the pages (the lab's fault: a stale copy of a page)."""
    _check_indexes(pages, size // PAGE_BYTES, "page")
    with mapped(pid, size, writable=True) as ram:
        for page in pages:
            at = page * PAGE_BYTES
            ram[at:at + PAGE_BYTES] = bytes(b ^ 0xFF for b in ram[at:at + PAGE_BYTES])


def _check_indexes(indexes: Sequence[int], count: int, what: str) -> None:
    bad = [i for i in indexes if not 0 <= i < count]
    if bad:
        raise InvalidInput(f"{what} {bad[0]} is out of range (this RAM has {count} "
                           f"{what}s)", f"ask for {what}s 0..{count - 1}")


__all__ = ["PAGES_PER_CHUNK", "chunk_digests", "flip_pages", "page_digests", "ram_file",
           "read_pages", "write_pages"]
