"""Reading, comparing and repairing a paused VM's guest RAM (see domain/memory_check.py).

Only a paused copy is read (a running guest's RAM changes under the digest), and only a
migration's destination that never ran is written: the control plane copies the source's
pages into it before `cont`, never into a guest that has executed.
"""

from __future__ import annotations

import asyncio
import base64

from ferry.agent.faults import FaultStage
from ferry.agent.host import HostRuntime
from ferry.agent.models import RamDigestRequest, RamDigests, RamPages, RamPagesRequest
from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.memory_check import PAGE_BYTES
from ferry.hypervisor import guest_ram
from ferry.hypervisor.errors import NotRunning

READABLE = ("paused", "postmigrate")


def fault_pages(size: int) -> tuple[int, ...]:
    """The pages the lab's CORRUPT_RAM fault makes stale: three, far apart."""
    last = size // PAGE_BYTES - 1
    return (last // 7, last // 2, last - 3)


class GuestMemory:
    """The agent's /v1/vms/{name}/ram endpoints."""

    def __init__(self, host: HostRuntime) -> None:
        self._host = host

    async def _paused_pid(self, name: str, write: bool) -> tuple[int, int]:
        rec = self._host.vm_record(name)
        monitor, pid = rec.monitor, rec.process.pid
        if monitor is None or pid is None:
            raise NotRunning(f"VM {name} has no running QEMU on {self._host.config.name}")
        state = await monitor.runstate()
        if state not in READABLE:
            raise Conflict(f"VM {name} on {self._host.config.name} is {state}",
                           "its memory is compared only while it is paused")
        if write and not (rec.never_ran and state == "paused"):
            raise Conflict(f"VM {name} on {self._host.config.name} is not a paused "
                           "migration destination that never ran",
                           "only such a copy's memory may be repaired")
        return pid, rec.spec.memory_mib << 20

    async def digests(self, name: str, body: RamDigestRequest) -> RamDigests:
        pid, size = await self._paused_pid(name, write=False)
        if body.chunks is None and self._host.vm_record(name).never_ran:
            pages = fault_pages(size)
            self._host.faults.reach(FaultStage.RAM_DIGESTS, name, pid, corrupt=lambda: (
                guest_ram.flip_pages(pid, size, pages)))
        if body.chunks is None:
            packed = await asyncio.to_thread(guest_ram.chunk_digests, pid, size)
        else:
            packed = await asyncio.to_thread(guest_ram.page_digests, pid, size, body.chunks)
        return RamDigests(digests=base64.b64encode(packed).decode())

    async def read(self, name: str, body: RamPagesRequest) -> RamPages:
        pid, size = await self._paused_pid(name, write=False)
        data = await asyncio.to_thread(guest_ram.read_pages, pid, size, body.pages)
        return RamPages(pages=body.pages, data=base64.b64encode(data).decode())

    async def write(self, name: str, body: RamPages) -> None:
        pid, size = await self._paused_pid(name, write=True)
        try:
            data = base64.b64decode(body.data, validate=True)
        except ValueError as exc:
            raise InvalidInput(f"the page data is not base64: {exc}",
                               "send the pages as standard base64") from exc
        await asyncio.to_thread(guest_ram.write_pages, pid, size, body.pages, data)
