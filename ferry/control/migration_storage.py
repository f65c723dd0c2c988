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
import time
from collections.abc import Awaitable, Callable

from ferry.agent.client import AgentClient
from ferry.agent.models import NewDisk
from ferry.domain.compat import Refusal, RefusalReason
from ferry.domain.errors import FerryError, InvalidInput
from ferry.domain.migration import completion_deadline_s
from ferry.domain.records import MigrationRecord
from ferry.domain.specs import DiskSpec, VmSpec
from ferry.domain.storage import CopyWatch

COPY_POLL_S = 0.25


class DiskCopyFailed(Exception):
    pass


def plan_disks(spec: VmSpec, datastore: str, target_sees: bool
               ) -> tuple[tuple[DiskSpec, ...], tuple[DiskSpec, ...]]:
    """(the VM's disks on the target, the source disks to copy there) for a migration
    with `--datastore`. A disk already on that datastore stays put when the target sees
    it (its live image must never be copied onto itself); when nothing moves, both are
    empty: a memory-only migration."""
    if not spec.disks:
        raise InvalidInput(f"VM {spec.name} has no disks to move with --datastore",
                           "leave out --datastore")
    moved = tuple(d for d in spec.disks if not (d.datastore == datastore and target_sees))
    if not moved:
        return (), ()
    names = {d.name for d in moved}
    target = tuple(_on_datastore(d, datastore) if d.name in names else d for d in spec.disks)
    return target, moved


def _on_datastore(disk: DiskSpec, datastore: str) -> DiskSpec:
    return DiskSpec.model_validate(disk.model_dump() | {"datastore": datastore})


def copies(target_disks: tuple[DiskSpec, ...], moved: tuple[DiskSpec, ...]
           ) -> tuple[DiskSpec, ...]:
    """The target-side disks a migration copies (created empty, filled over NBD)."""
    names = {d.name for d in moved}
    return tuple(d for d in target_disks if d.name in names)


def copied_names(rec: MigrationRecord) -> tuple[str, ...]:
    return tuple(d.name for d in rec.moved_disks)


def target_spec(spec: VmSpec, target_disks: tuple[DiskSpec, ...]) -> VmSpec:
    """The VM as it runs on the target (validated again, not a blind copy)."""
    if not target_disks:
        return spec
    return VmSpec.model_validate(spec.model_dump() | {
        "disks": [d.model_dump() for d in target_disks]})


def source_spec(spec: VmSpec, rec: MigrationRecord) -> VmSpec:
    """The VM as it runs on the source: its copied disks as they were there."""
    if not rec.moved_disks:
        return spec
    old = {d.name: d for d in rec.moved_disks}
    return VmSpec.model_validate(spec.model_dump() | {
        "disks": [old.get(d.name, d).model_dump() for d in spec.disks]})


async def check_free_paths(target: AgentClient, host: str, disks: tuple[DiskSpec, ...]
                           ) -> list[Refusal]:
    """A refusal for every image to create that already exists on the target: Ferry
    never writes over (nor, on rollback, deletes) a file it did not create."""
    refusals = []
    for disk in disks:
        try:
            exists = await target.image(disk) is not None
            problem = "already exists"
        except FerryError as exc:
            exists, problem = True, f"cannot be checked ({exc.problem})"
        if exists:
            refusals.append(Refusal(
                reason=RefusalReason.TARGET_PATH_EXISTS,
                message=f"{disk.datastore}:{disk.path} on host {host} {problem}; the copy "
                        f"of disk {disk.name} would go there: remove that file or pick "
                        f"another datastore"))
    return refusals


async def new_disks(source: AgentClient, rec: MigrationRecord) -> tuple[NewDisk, ...]:
    """The images the destination must create: same format, the source's virtual size."""
    out = []
    for old, new in zip(rec.moved_disks, copies(rec.target_disks, rec.moved_disks),
                        strict=True):
        info = await source.image(old)
        if info is None:
            raise InvalidInput(f"the image of disk {old.name} is missing on {rec.source}")
        out.append(NewDisk(disk=new, size=info.virtual_size))
    return tuple(out)


async def copy_disks(rec: MigrationRecord, source: AgentClient,
                     report: Callable[[int, int], Awaitable[None]],
                     cancelled: Callable[[], bool]) -> None:
    """Mirror every copied disk to the target's NBD exports; return once all are in sync.
    Bounded: DiskCopyFailed when what is left has not shrunk for the migration's
    progress timeout (the guest writes faster than the link carries), or when the copy
    runs past its completion budget (per GiB of disk, as the memory stream's)."""
    names = copied_names(rec)
    assert rec.nbd is not None
    await source.start_disk_mirrors(rec.vm, rec.id, rec.nbd, names,
                                    tls_peer=rec.target if rec.encrypted else None)
    began = time.monotonic()
    watch = CopyWatch()
    while True:
        if cancelled():
            raise DiskCopyFailed("cancelled by the user")
        jobs = await source.disk_mirrors(rec.vm, rec.id, names)
        broken = [j for j in jobs if j.stopped]
        if broken:
            raise DiskCopyFailed(f"copying disk {broken[0].job_id} failed: "
                                 f"{broken[0].error or broken[0].status}")
        done, total = sum(j.offset for j in jobs), sum(j.length for j in jobs)
        await report(done, total)
        if all(j.ready for j in jobs):
            return
        elapsed = time.monotonic() - began
        watch = watch.observe(elapsed, total - done)
        if watch.stalled(elapsed, rec.options.progress_timeout_s):
            raise DiskCopyFailed(
                f"the disk copy made no progress for {rec.options.progress_timeout_s} s "
                f"({(total - done) >> 20} MiB left): the guest writes faster than the "
                "link carries, or the link is down; retry when it writes less")
        budget = completion_deadline_s(max(total >> 20, 1), rec.options)
        if elapsed > budget:
            raise DiskCopyFailed(f"the disk copy did not finish within its budget of "
                                 f"{budget:.0f} s ({rec.options.budget_per_gib_s} "
                                 "s per GiB)")
        await asyncio.sleep(COPY_POLL_S)


async def finish(rec: MigrationRecord, source: AgentClient, target: AgentClient
                 ) -> list[str]:
    """After the target runs on its copies: end the mirrors and exports, stop the source,
    delete the source images of the copied disks (only those: a disk that stayed on
    shared storage is the one the target now uses). Returns problems worth reporting
    (nothing is undone)."""
    names = copied_names(rec)
    problems = []
    for step in (source.stop_disk_mirrors(rec.vm, rec.id, names),
                 target.finish_incoming_storage(rec.vm, names),
                 source.stop_vm(rec.vm, force=True)):
        try:
            await step
        except FerryError as exc:
            problems.append(exc.problem)
    for disk in rec.moved_disks:
        try:
            await source.delete_image(disk)
        except FerryError as exc:
            problems.append(f"old image {disk.datastore}:{disk.path} kept: {exc.problem}")
    return problems


async def undo(rec: MigrationRecord, source: AgentClient, target: AgentClient
               ) -> tuple[DiskSpec, ...]:
    """Before the switch: stop the mirrors and remove the half-made copies on the target:
    only the images this job recorded as created by it, never any other file. Returns
    those it could not delete (to be deleted later, never forgotten)."""
    if rec.moved_disks:
        with contextlib.suppress(FerryError):
            await source.stop_disk_mirrors(rec.vm, rec.id, copied_names(rec))
    return await delete_created(rec.created_images, target)


async def delete_created(images: tuple[DiskSpec, ...], target: AgentClient
                         ) -> tuple[DiskSpec, ...]:
    """Delete images a migration created on its target; returns the ones that failed."""
    left = []
    for disk in images:
        try:
            await target.delete_image(disk)
        except FerryError:
            left.append(disk)
    return tuple(left)
