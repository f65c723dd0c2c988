"""The memory check's pure parts, and guest_ram on a real memfd of this process."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.memory_check import (
    CHUNK_BYTES,
    PAGE_BYTES,
    PAGES_PER_CHUNK,
    VerifyMemory,
    batches,
    differing,
    pages_of,
    unpack,
    wanted,
)
from ferry.hypervisor import guest_ram

SIZE = 3 * CHUNK_BYTES + 5 * PAGE_BYTES  # a short last chunk, as odd RAM sizes give


def test_wanted_by_accelerator() -> None:
    assert wanted(VerifyMemory.AUTO, ["tcg", "kvm"])
    assert not wanted(VerifyMemory.AUTO, ["kvm", "kvm"])
    assert wanted(VerifyMemory.ON, ["kvm", "kvm"])
    assert not wanted(VerifyMemory.OFF, ["tcg", "tcg"])


def test_differing_refuses_unequal_sizes() -> None:
    assert differing([1, 2, 3], [1, 9, 3]) == [1]
    with pytest.raises(ValueError, match="not the same size"):
        differing([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="not a list of u64"):
        unpack(b"1234567")


@given(st.lists(st.integers(0, 63), unique=True, min_size=1, max_size=5).map(sorted),
       st.data())
def test_pages_of_maps_positions_back(chunks: list[int], data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(chunks) * PAGES_PER_CHUNK - 1))
    page = pages_of(chunks, [position])[0]
    assert page // PAGES_PER_CHUNK == chunks[position // PAGES_PER_CHUNK]
    assert page % PAGES_PER_CHUNK == position % PAGES_PER_CHUNK


def test_batches_cover_everything_once() -> None:
    pages = list(range(10_000))
    got = batches(pages, 4096)
    assert [len(b) for b in got] == [4096, 4096, 1808]
    assert [p for b in got for p in b] == pages


@pytest.fixture
def ram() -> Iterator[mmap.mmap]:
    """A memfd named as QEMU names a memory-backend-memfd, held open by this process."""
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, SIZE)
    mem = mmap.mmap(fd, SIZE)
    mem[:] = bytes(range(256)) * (SIZE // 256)
    try:
        yield mem
    finally:
        mem.close()
        os.close(fd)


def test_compare_and_repair_through_the_memfd(ram: mmap.mmap) -> None:
    ram_of = guest_ram.ram_file(os.getpid(), SIZE)
    before = unpack(guest_ram.chunk_digests(ram_of, SIZE))
    assert len(before) == 4  # three whole chunks and the short one
    saved = guest_ram.read_pages(ram_of, SIZE, [700, 1536 + 2])
    guest_ram.flip_pages(ram_of, SIZE, [700, 1536 + 2])  # chunk 1 and the last chunk
    after = unpack(guest_ram.chunk_digests(ram_of, SIZE))
    chunks = differing(before, after)
    assert chunks == [1, 3]
    page_before = unpack(guest_ram.page_digests(ram_of, SIZE, [1, 3]))
    assert len(page_before) == PAGES_PER_CHUNK + 5
    guest_ram.write_pages(ram_of, SIZE, [700, 1538], saved)
    assert unpack(guest_ram.chunk_digests(ram_of, SIZE)) == before
    assert ram[700 * PAGE_BYTES:701 * PAGE_BYTES] == bytes(range(256)) * 16


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 9])
def test_threads_share_the_chunks_and_agree(ram: mmap.mmap, threads: int) -> None:
    """However many threads read it, each chunk's digest is the xxh3-64 of that chunk,
    in order, the short last one included (the other host may use another count)."""
    ram[CHUNK_BYTES + 3] ^= 0xFF  # chunks differ from one another
    ram[3 * CHUNK_BYTES + 1] ^= 0x0F
    expected = [xxhash.xxh3_64_intdigest(ram[at:min(at + CHUNK_BYTES, SIZE)])
                for at in range(0, SIZE, CHUNK_BYTES)]
    ram_of = guest_ram.ram_file(os.getpid(), SIZE)
    assert unpack(guest_ram.chunk_digests(ram_of, SIZE, threads=threads)) == expected


def test_bad_requests_name_the_problem(ram: mmap.mmap) -> None:
    pid = os.getpid()
    ram_of = guest_ram.ram_file(pid, SIZE)
    with pytest.raises(InvalidInput, match="page 1541 is out of range"):
        guest_ram.read_pages(ram_of, SIZE, [1541])
    with pytest.raises(InvalidInput, match="chunk 4 is out of range"):
        guest_ram.page_digests(ram_of, SIZE, [4])
    with pytest.raises(InvalidInput, match="4095 bytes for 1 pages"):
        guest_ram.write_pages(ram_of, SIZE, [0], b"x" * 4095)
    with pytest.raises(Conflict, match="no memfd-backed guest RAM of 4096 bytes"):
        guest_ram.ram_file(pid, 4096)


def test_digests_of_untouched_ram_allocate_none_of_it() -> None:
    """RAM the guest never touched (or a destination's zero pages, which QEMU skips) is
    a hole in the memfd: digesting it reads zeros and allocates nothing (a mapping
    would allocate and zero every page it reads)."""
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, SIZE)
        os.pwrite(fd, b"\x01" * PAGE_BYTES, 5 * PAGE_BYTES)  # one page touched
        blocks = os.fstat(fd).st_blocks
        ram_of = guest_ram.ram_file(os.getpid(), SIZE)
        digests = unpack(guest_ram.chunk_digests(ram_of, SIZE))
        assert os.fstat(fd).st_blocks == blocks
        zero = xxhash.xxh3_64_intdigest(bytes(CHUNK_BYTES))
        assert digests[1:3] == [zero, zero] and digests[0] != zero
        assert digests[3] == xxhash.xxh3_64_intdigest(bytes(SIZE - 3 * CHUNK_BYTES))
        pages = unpack(guest_ram.page_digests(ram_of, SIZE, [0]))
        assert pages[5] != pages[4] == xxhash.xxh3_64_intdigest(bytes(PAGE_BYTES))
        assert os.fstat(fd).st_blocks == blocks
        # zeros written (the source's copy of a page the destination skipped) digest as
        # the hole does
        os.pwrite(fd, bytes(PAGE_BYTES), CHUNK_BYTES + 7 * PAGE_BYTES)
        assert os.fstat(fd).st_blocks > blocks
        assert unpack(guest_ram.chunk_digests(ram_of, SIZE)) == digests
    finally:
        os.close(fd)


def test_held_ram_outlives_its_owner() -> None:
    """A source QEMU that dies after its stream completed closes its memfd; the agent's
    held descriptor keeps the guest it sent readable for the check and the repair."""
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, b"\x5a" * PAGE_BYTES, 9 * PAGE_BYTES)
    before = guest_ram.chunk_digests(guest_ram.ram_file(os.getpid(), SIZE), SIZE)
    kept = guest_ram.hold(os.getpid(), SIZE)
    try:
        os.close(fd)  # the owner let go of it
        ram_of = guest_ram.held(kept)
        assert guest_ram.chunk_digests(ram_of, SIZE) == before
        assert guest_ram.read_pages(ram_of, SIZE, [9]) == b"\x5a" * PAGE_BYTES
    finally:
        os.close(kept)
