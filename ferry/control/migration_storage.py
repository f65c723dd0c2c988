"""Migration without shared storage: the disks travel with the VM (the libvirt way).

The destination creates empty images and exports them over NBD while its QEMU waits
for memory; the source mirrors each disk there (write-blocking, so guest writes land
on both sides) and only when every mirror is in sync does the memory stream start.
After switchover the mirrors are cancelled (a ready mirror ends in sync), the exports
closed, and the source images deleted only once the destination runs on the copies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from ferry.agent.client import AgentClient
from ferry.agent.models import NewDisk
from ferry.domain.errors import FerryError, InvalidInput
from ferry.domain.records import MigrationRecord
from ferry.domain.specs import DiskSpec, VmSpec

COPY_POLL_S = 0.25


class DiskCopyFailed(Exception):
    pass


def target_disks(spec: VmSpec, datastore: str) -> tuple[DiskSpec, ...]:
    if not spec.disks:
        raise InvalidInput(f"VM {spec.name} has no disks to move with --datastore",
                           "leave out --datastore")
    return tuple(d.model_copy(update={"datastore": datastore}) for d in spec.disks)


def target_spec(spec: VmSpec, rec: MigrationRecord) -> VmSpec:
    return spec.model_copy(update={"disks": rec.target_disks}) if rec.target_disks else spec


async def new_disks(source: AgentClient, spec: VmSpec, rec: MigrationRecord
                    ) -> tuple[NewDisk, ...]:
    """The images the destination must create: same format, the source's virtual size."""
    out = []
    for old, new in zip(spec.disks, rec.target_disks, strict=True):
        info = await source.image(old)
        if info is None:
            raise InvalidInput(f"the image of disk {old.name} is missing on {rec.source}")
        out.append(NewDisk(disk=new, size=info.virtual_size))
    return tuple(out)


async def copy_disks(rec: MigrationRecord, source: AgentClient,
                     report: Callable[[int, int], Awaitable[None]],
                     cancelled: Callable[[], bool]) -> None:
    """Mirror every disk to the target's NBD exports; return once all are in sync."""
    names = tuple(d.name for d in rec.target_disks)
    assert rec.nbd is not None
    await source.start_disk_mirrors(rec.vm, rec.id, rec.nbd, names,
                                    tls_peer=rec.target if rec.encrypted else None)
    while True:
        if cancelled():
            raise DiskCopyFailed("cancelled by the user")
        jobs = await source.disk_mirrors(rec.vm, rec.id, names)
        broken = [j for j in jobs if j.stopped]
        if broken:
            raise DiskCopyFailed(f"copying disk {broken[0].job_id} failed: "
                                 f"{broken[0].error or broken[0].status}")
        await report(sum(j.offset for j in jobs), sum(j.length for j in jobs))
        if all(j.ready for j in jobs):
            return
        await asyncio.sleep(COPY_POLL_S)


async def finish(rec: MigrationRecord, source: AgentClient, target: AgentClient,
                 old_disks: tuple[DiskSpec, ...]) -> list[str]:
    """After the target runs on its copies: end the mirrors and exports, stop the source,
    delete the source images. Returns problems worth reporting (nothing is undone)."""
    names = tuple(d.name for d in rec.target_disks)
    problems = []
    for step in (source.stop_disk_mirrors(rec.vm, rec.id, names),
                 target.finish_incoming_storage(rec.vm, names),
                 source.stop_vm(rec.vm, force=True)):
        try:
            await step
        except FerryError as exc:
            problems.append(exc.problem)
    for disk in old_disks:
        try:
            await source.delete_image(disk)
        except FerryError as exc:
            problems.append(f"old image {disk.datastore}:{disk.path} kept: {exc.problem}")
    return problems


async def undo(rec: MigrationRecord, source: AgentClient, target: AgentClient) -> None:
    """Before the switch: stop the mirrors and remove the half-made copies on the target."""
    names = tuple(d.name for d in rec.target_disks)
    with contextlib.suppress(FerryError):
        await source.stop_disk_mirrors(rec.vm, rec.id, names)
    for disk in rec.target_disks:
        with contextlib.suppress(FerryError):
            await target.delete_image(disk)
