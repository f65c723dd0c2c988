"""Reading, comparing and repairing a paused VM's guest RAM (see domain/memory_check.py).

Only a paused copy is read (a running guest's RAM changes under the digest), and only a
migration's destination that never ran is written: the control plane copies the source's
pages into it before `cont`, never into a guest that has executed.

The digests of the whole RAM are the slow part (~30 ms per 256 MiB) and the guest is
paused on both hosts meanwhile: so each side starts them itself the moment its copy is
final (the source when its stream completed, the destination when it received the whole
stream), and the control plane's request takes what was computed. A result is handed out
only while nothing can have changed the RAM since: same QEMU, no `cont` sent through its
monitor, no page written.

A source's RAM is held open from its stream's completion until the migration ends (or
HOLD_S): a source QEMU that dies after sending everything takes its memfd with it
otherwise, and the destination, which may have lost a write on TCG, would run unchecked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ferry.agent.faults import FaultStage
from ferry.agent.host import HostRuntime, VmRecord
from ferry.agent.models import RamDigestRequest, RamDigests, RamPages, RamPagesRequest
from ferry.domain.errors import Conflict, FerryError, InvalidInput
from ferry.domain.memory_check import PAGE_BYTES, wanted
from ferry.domain.migration import StreamOptions
from ferry.hypervisor import guest_ram
from ferry.hypervisor.errors import NotRunning
from ferry.hypervisor.monitor import Monitor
from ferry.hypervisor.process import ProcessState

log = logging.getLogger("ferry.agent")

READABLE = ("paused", "postmigrate")
EVENT_WAIT_S = 1.0  # how often a destination's watch looks whether its QEMU still runs
# A held source RAM goes at the latest after this (a migration's end lets it go first):
# a control plane that never comes back must not pin a dead guest's memory for ever.
HOLD_S = 600.0
FREE_AFTER_S = 1.0


@dataclass(frozen=True)
class _Copy:
    """One QEMU's RAM as it was when read or held: stale once the monitor sent `cont`."""

    monitor: Monitor
    pid: int
    conts: int

    def current(self, monitor: Monitor | None, pid: int | None) -> bool:
        return monitor is self.monitor and pid == self.pid and monitor.conts == self.conts


@dataclass(frozen=True)
class _Early(_Copy):
    """Whole-RAM digests started as soon as the copy was final."""

    task: asyncio.Task[bytes]


@dataclass(frozen=True)
class _Held(_Copy):
    """A source's RAM held open from its stream's completion (its guest paused, and
    QEMU changes it again only after a `cont`)."""

    fd: int
    expiry: asyncio.TimerHandle


@dataclass(frozen=True)
class _Readable:
    """Where a paused copy is read (or written) now."""

    ram: Path
    size: int
    pid: int
    monitor: Monitor


def fault_pages(size: int) -> tuple[int, ...]:
    """The pages the lab's CORRUPT_RAM fault makes stale: three, far apart."""
    last = size // PAGE_BYTES - 1
    return (last // 7, last // 2, last - 3)


class GuestMemory:
    """The agent's /v1/vms/{name}/ram endpoints."""

    def __init__(self, host: HostRuntime) -> None:
        self._host = host
        self._early: dict[str, _Early] = {}
        self._held: dict[str, _Held] = {}
        self._outgoing: set[str] = set()  # sources to digest once their stream completed
        self._watches: dict[str, asyncio.Task[None]] = {}

    # --- digests computed ahead of the request -----------------------------------
    def _wanted(self, options: StreamOptions) -> bool:
        # This host's view only: a TCG peer of a KVM host computes on request.
        return wanted(options.verify_memory, [self._host.accel])

    def expect_outgoing(self, name: str, options: StreamOptions) -> None:
        """A source's stream starts: digest its RAM when the stream completed."""
        self._early.pop(name, None)
        self.release(name)
        if self._wanted(options):
            self._outgoing.add(name)
        else:
            self._outgoing.discard(name)

    def outgoing_completed(self, name: str) -> None:
        """The source's stream completed (its guest stays paused from here on)."""
        if name in self._outgoing:
            self._outgoing.discard(name)
            self._hold(name)
            with contextlib.suppress(FerryError):
                # QEMU stopped the guest before it said so (and runs it again only on
                # a `cont`, which the digests' monitor counts): no need to ask it.
                self._start(name, stopped=True)

    def _hold(self, name: str) -> None:
        """Keep the source's RAM open (now, before anything can kill its QEMU)."""
        self.release(name)
        rec = self._host.vm_record(name)
        if rec.monitor is None or rec.process.pid is None:
            return
        try:
            fd = guest_ram.hold(rec.process.pid, rec.spec.memory_mib << 20)
        except FerryError as exc:
            log.warning("VM %s: its RAM is not held past its QEMU: %s", name, exc.problem)
            return
        expiry = asyncio.get_running_loop().call_later(HOLD_S, self.release, name)
        self._held[name] = _Held(rec.monitor, rec.process.pid, rec.monitor.conts, fd, expiry)

    def release(self, name: str) -> None:
        """Let a held RAM go: the migration ended, the VM stopped or runs again."""
        held = self._held.pop(name, None)
        if held is not None:
            held.expiry.cancel()
            # The last reference to a dead QEMU's RAM: the kernel frees every page in
            # this close (tens of ms of CPU per GiB), in a thread, a moment after the
            # migration (not while the guest starts on its destination).
            loop = asyncio.get_running_loop()
            loop.call_later(FREE_AFTER_S, loop.run_in_executor, None, os.close, held.fd)

    def expect_incoming(self, name: str, options: StreamOptions) -> None:
        """A destination listens: digest its RAM the moment the stream is received."""
        self._early.pop(name, None)
        old = self._watches.pop(name, None)
        if old is not None:
            old.cancel()
        if self._wanted(options):
            rec = self._host.vm_record(name)
            self._watches[name] = asyncio.create_task(self._watch_incoming(name, rec))

    async def _watch_incoming(self, name: str, rec: VmRecord) -> None:
        try:
            while rec.monitor is not None and rec.process.state is ProcessState.RUNNING \
                    and self._host.record(name) is rec:
                try:
                    event = await asyncio.wait_for(rec.monitor.migration_events.get(),
                                                   EVENT_WAIT_S)
                except TimeoutError:
                    continue
                data = event.get("data")
                status = data.get("status") if isinstance(data, dict) else None
                if status == "completed":
                    if rec.never_ran:
                        self._start(name, stopped=False)
                    return
                if status in ("failed", "cancelled", "postcopy-active"):
                    return
        except FerryError as exc:
            log.warning("VM %s: digests not started ahead: %s", name, exc.problem)
        finally:
            if self._watches.get(name) is asyncio.current_task():
                del self._watches[name]

    def _start(self, name: str, stopped: bool) -> None:
        """Digests of the RAM from now on (unless already under way for this copy);
        `stopped`: the guest is known to be paused, else QEMU is asked first."""
        rec = self._host.vm_record(name)
        if rec.monitor is None or rec.process.pid is None:
            return
        pid = rec.process.pid
        early = self._early.get(name)
        if early is not None and early.current(rec.monitor, pid):
            return
        work = self._whole(name, pid) if stopped else \
            self._whole_if_paused(name, rec.monitor, pid)
        task = asyncio.create_task(work)
        task.add_done_callback(_quiet)
        self._early[name] = _Early(rec.monitor, pid, rec.monitor.conts, task)

    async def _taken_early(self, name: str, monitor: Monitor, pid: int) -> bytes | None:
        # Kept, not popped: a watch that sees the stream complete only now finds the
        # work under way instead of doing it twice. A write, a `cont` or another QEMU
        # makes it stale (current()).
        early = self._early.get(name)
        if early is None or not early.current(monitor, pid):
            return None
        try:
            packed = await early.task
        except (FerryError, OSError):
            return None  # computed again below, and its error answered from there
        return packed if early.current(monitor, pid) else None

    async def _whole_if_paused(self, name: str, monitor: Monitor, pid: int) -> bytes:
        if await monitor.runstate() not in READABLE:
            raise Conflict(f"VM {name} on {self._host.config.name} is not paused")
        return await self._whole(name, pid)

    def _path(self, name: str, pid: int, size: int) -> Path:
        """Where QEMU `pid`'s RAM is read: the held descriptor while it is current."""
        held = self._held.get(name)
        rec = self._host.vm_record(name)
        if held is not None and held.current(rec.monitor, pid):
            return guest_ram.held(held.fd)
        return guest_ram.ram_file(pid, size)

    async def _whole(self, name: str, pid: int) -> bytes:
        """Digests of every chunk of the RAM, paused as the caller checked (the lab's
        CORRUPT_RAM fault makes a destination's copy stale first)."""
        rec = self._host.vm_record(name)
        size = rec.spec.memory_mib << 20
        ram = self._path(name, pid, size)
        if rec.never_ran:
            pages = fault_pages(size)
            self._host.faults.reach(FaultStage.RAM_DIGESTS, name, pid, corrupt=lambda: (
                guest_ram.flip_pages(ram, size, pages)))
        return await asyncio.to_thread(guest_ram.chunk_digests, ram, size)

    async def _readable(self, name: str, write: bool) -> _Readable:
        """The paused copy to read (or, `write`, to repair), or why there is none."""
        rec = self._host.vm_record(name)
        monitor, pid = rec.monitor, rec.process.pid
        size = rec.spec.memory_mib << 20
        if monitor is None or pid is None or rec.process.state is not ProcessState.RUNNING:
            held = self._held.get(name)
            if not write and held is not None and held.current(monitor, pid):
                # Died after its stream completed: what it held is the guest it sent.
                return _Readable(guest_ram.held(held.fd), size, held.pid, held.monitor)
            raise NotRunning(f"VM {name} has no running QEMU on {self._host.config.name}")
        state = await monitor.runstate()
        if state not in READABLE:
            raise Conflict(f"VM {name} on {self._host.config.name} is {state}",
                           "its memory is compared only while it is paused")
        if write and not (rec.never_ran and state == "paused"):
            raise Conflict(f"VM {name} on {self._host.config.name} is not a paused "
                           "migration destination that never ran",
                           "only such a copy's memory may be repaired")
        ram = guest_ram.ram_file(pid, size) if write else self._path(name, pid, size)
        return _Readable(ram, size, pid, monitor)

    async def digests(self, name: str, body: RamDigestRequest) -> RamDigests:
        copy = await self._readable(name, write=False)
        if body.chunks is None:
            packed = await self._taken_early(name, copy.monitor, copy.pid)
            if packed is None:
                # _readable found it paused: start the digests as a watch would (so
                # one that sees the stream complete later does not start them again)
                self._start(name, stopped=True)
                packed = await self._taken_early(name, copy.monitor, copy.pid)
            if packed is None:
                packed = await self._whole(name, copy.pid)
        else:
            packed = await asyncio.to_thread(guest_ram.page_digests, copy.ram, copy.size,
                                             body.chunks)
        return RamDigests(digests=base64.b64encode(packed).decode())

    async def read(self, name: str, body: RamPagesRequest) -> RamPages:
        copy = await self._readable(name, write=False)
        data = await asyncio.to_thread(guest_ram.read_pages, copy.ram, copy.size, body.pages)
        return RamPages(pages=body.pages, data=base64.b64encode(data).decode())

    async def write(self, name: str, body: RamPages) -> None:
        copy = await self._readable(name, write=True)
        self._early.pop(name, None)  # what it held is about to change
        try:
            data = base64.b64decode(body.data, validate=True)
        except ValueError as exc:
            raise InvalidInput(f"the page data is not base64: {exc}",
                               "send the pages as standard base64") from exc
        await asyncio.to_thread(guest_ram.write_pages, copy.ram, copy.size, body.pages, data)


def _quiet(task: asyncio.Task[bytes]) -> None:
    """A digest started ahead whose result nobody took: its error is not news."""
    if not task.cancelled():
        task.exception()
