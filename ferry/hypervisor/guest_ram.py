"""A paused QEMU's guest RAM, seen through the memfd that backs it (argv: RAM_BACKEND).

Each function takes the path to open: `ram_file(pid, size)` (the QEMU's own descriptor
under /proc), or `held(fd)` for a descriptor the caller keeps open, which outlives the
QEMU (agent/memory.py holds a source's RAM from its stream's completion on).

The agent compares and repairs a migration's copy of the guest before the destination
runs (ferry/control/migration_memory.py says why: QEMU's TCG can lose a guest write
during pre-copy, so the copy may differ from the source in a few pages). Blocking file
I/O: callers run these in a thread.
"""

from __future__ import annotations

import array
import errno
import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import xxhash

from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.memory_check import CHUNK_BYTES, PAGE_BYTES, PAGES_PER_CHUNK

# QEMU names the memfd of a memory-backend-memfd object after the object's type.
MEMFD_LINK = "/memfd:memory-backend-memfd"
# Threads reading one RAM's chunks at once (chunk_digests): as many as cores, up to 4
# (beyond that the memory bus, not the CPU, limits a copy out of the page cache).
DIGEST_THREADS = max(1, min(4, os.cpu_count() or 1))


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


def held(fd: int) -> Path:
    """The path through which this process opens its own descriptor `fd` again."""
    return Path(f"/proc/self/fd/{fd}")


def hold(pid: int, size: int) -> int:
    """A read-only descriptor of QEMU `pid`'s guest RAM, for the caller to close: the
    memfd lives on while it is open, whatever becomes of the QEMU."""
    try:
        return os.open(ram_file(pid, size), os.O_RDONLY)
    except OSError as exc:
        raise Conflict(f"cannot open QEMU {pid}'s guest RAM: {exc}") from exc


@contextmanager
def opened(ram: Path, writable: bool = False) -> Iterator[int]:
    """A file descriptor of the guest RAM: what QEMU's guest sees, byte for byte.

    Read and written with pread/pwrite, not mapped: a mapping must first be populated
    (~29 ms of page-table work per 256 MiB here, before a byte is hashed), and each
    hole (RAM the guest never touched, or a destination's zero page that QEMU skipped)
    it touches is allocated and zeroed (a half-empty 256 MiB copy: 112 ms, and all of
    it allocated). A read of a hole allocates nothing and reads zeros."""
    try:
        fd = os.open(ram, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise Conflict(f"cannot open the guest RAM at {ram}: {exc}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _read_into(fd: int, buf: memoryview, at: int) -> memoryview:
    """Fill `buf` from offset `at` (the view of what was read: short only at the end)."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], at + got)
        if n == 0:
            break
        got += n
    return buf[:got]


def _packed(values: Iterator[int]) -> bytes:
    return array.array("Q", values).tobytes()


def _has_data(fd: int, start: int, end: int) -> bool:
    """Whether [start, end) of the memfd holds any page at all (SEEK_DATA: shmem
    reports each page it has; a hole reads as zeros)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data from `start` to the end of the file
            return False
        raise


def chunk_digests(ram: Path, size: int, threads: int = DIGEST_THREADS) -> bytes:
    """One xxh3-64 per CHUNK_BYTES of RAM, packed little-endian u64 (the last chunk may
    be shorter). A chunk that is a hole is known to be zeros: not read. `threads` read
    contiguous shares of the chunks side by side (a read releases the GIL): the paused
    guest waits for this, and a 1 GiB copy took 62 ms with two threads here against 100
    with one (bench/ram_digest.py)."""
    count = (size + CHUNK_BYTES - 1) // CHUNK_BYTES
    share = max(1, -(-count // max(1, min(threads, count))))
    with opened(ram) as fd:
        starts = range(share, count, share)
        with ThreadPoolExecutor(len(starts) or 1, thread_name_prefix="ram-digest") as pool:
            rest = [pool.submit(_chunk_range, fd, size, first, min(first + share, count))
                    for first in starts]
            digests = _chunk_range(fd, size, 0, min(share, count))
            for part in rest:
                digests.extend(part.result())
    return array.array("Q", digests).tobytes()


def _chunk_range(fd: int, size: int, first: int, end: int) -> array.array[int]:
    """The digests of chunks [first, end) of the RAM open at `fd`."""
    buf = memoryview(bytearray(CHUNK_BYTES))
    out = array.array("Q")
    for chunk in range(first, end):
        at = chunk * CHUNK_BYTES
        n = min(CHUNK_BYTES, size - at)
        out.append(xxhash.xxh3_64_intdigest(_read_into(fd, buf[:n], at))
                   if _has_data(fd, at, at + n) else _zeros_digest(n))
    return out


@functools.cache
def _zeros_digest(n: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(n))


def page_digests(ram: Path, size: int, chunks: Sequence[int]) -> bytes:
    """The pages' xxh3-64 of each of `chunks`, chunk after chunk, packed."""
    _check_indexes(chunks, (size + CHUNK_BYTES - 1) // CHUNK_BYTES, "chunk")
    buf = memoryview(bytearray(CHUNK_BYTES))
    with opened(ram) as fd:
        def digests() -> Iterator[int]:
            for chunk in chunks:
                start = chunk * CHUNK_BYTES
                data = _read_into(fd, buf[:min(CHUNK_BYTES, size - start)], start)
                for at in range(0, len(data), PAGE_BYTES):
                    yield xxhash.xxh3_64_intdigest(data[at:at + PAGE_BYTES])
        return _packed(digests())


def read_pages(ram: Path, size: int, pages: Sequence[int]) -> bytes:
    """The pages' contents, concatenated."""
    _check_indexes(pages, size // PAGE_BYTES, "page")
    out = memoryview(bytearray(len(pages) * PAGE_BYTES))
    with opened(ram) as fd:
        for i, page in enumerate(pages):
            slot = out[i * PAGE_BYTES:(i + 1) * PAGE_BYTES]
            if len(_read_into(fd, slot, page * PAGE_BYTES)) != PAGE_BYTES:
                raise Conflict(f"page {page} of the guest RAM could not be read whole")
    return out.tobytes()


def write_pages(ram: Path, size: int, pages: Sequence[int], data: bytes) -> None:
    """Overwrite the pages with `data` (len(pages) pages, in that order)."""
    _check_indexes(pages, size // PAGE_BYTES, "page")
    if len(data) != len(pages) * PAGE_BYTES:
        raise InvalidInput(f"{len(data)} bytes for {len(pages)} pages",
                           f"send exactly {PAGE_BYTES} bytes per page")
    with opened(ram, writable=True) as fd:
        for i, page in enumerate(pages):
            _write_page(fd, page, data[i * PAGE_BYTES:(i + 1) * PAGE_BYTES])


def _write_page(fd: int, page: int, data: bytes) -> None:
    done = 0
    while done < PAGE_BYTES:
        n = os.pwrite(fd, data[done:], page * PAGE_BYTES + done)
        if n == 0:  # not for a memfd within its size; never loop on it
            raise Conflict(f"page {page} of the guest RAM could not be written whole")
        done += n


def flip_pages(ram: Path, size: int, pages: Sequence[int]) -> None:
    """Invert every byte of the pages (the lab's fault: a stale copy of a page)."""
    _check_indexes(pages, size // PAGE_BYTES, "page")
    write_pages(ram, size, pages, bytes(b ^ 0xFF for b in read_pages(ram, size, pages)))


def _check_indexes(indexes: Sequence[int], count: int, what: str) -> None:
    bad = [i for i in indexes if not 0 <= i < count]
    if bad:
        raise InvalidInput(f"{what} {bad[0]} is out of range (this RAM has {count} "
                           f"{what}s)", f"ask for {what}s 0..{count - 1}")


__all__ = ["PAGES_PER_CHUNK", "chunk_digests", "flip_pages", "held", "hold", "page_digests",
           "ram_file", "read_pages", "write_pages"]
