"""Disk operations of one host's agent: images on its datastores and live mirrors.

Used by HostRuntime; kept apart so that each file keeps one job.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ferry.domain.errors import Conflict, InvalidInput, NotFound
from ferry.domain.specs import DiskSpec, VmSpec
from ferry.domain.storage import ImageInfo, MirrorProgress
from ferry.hypervisor import blockjobs
from ferry.hypervisor.argv import disk_path
from ferry.hypervisor.errors import CommandFailed, MonitorError
from ferry.hypervisor.images import create_image, image_info
from ferry.hypervisor.monitor import Monitor

PIVOT_TIMEOUT_S = 60.0


def target_nodes(disk: str, job_id: str) -> tuple[str, str]:
    """(file node, format node) names for a mirror target, unique per job."""
    return f"file-{disk}-{job_id[-8:]}", f"disk-{disk}-{job_id[-8:]}"


class DiskOps:
    def __init__(self, datastores: dict[str, str]) -> None:
        self.datastores = datastores

    def path(self, disk: DiskSpec) -> Path:
        if disk.datastore not in self.datastores:
            raise NotFound(f"this host does not see datastore {disk.datastore}")
        return disk_path(disk, self.datastores)

    def image_path(self, disk: DiskSpec) -> Path:
        """The image's path; InvalidInput if something other than a file is there (a
        directory made qemu-img fail, a 502, and unlink raise, a 500: found fuzzing)."""
        path = self.path(disk)
        if path.exists() and not path.is_file():
            raise InvalidInput(f"{disk.datastore}:{disk.path} is not an image file",
                               "name an image file inside the datastore")
        return path

    async def info(self, disk: DiskSpec) -> ImageInfo | None:
        path = self.image_path(disk)
        return await image_info(path) if path.exists() else None

    def delete(self, disk: DiskSpec) -> bool:
        path = self.image_path(disk)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    async def start_mirror(self, monitor: Monitor, spec: VmSpec, job_id: str,
                           target: DiskSpec, speed_bytes_s: int = 0) -> MirrorProgress:
        """Create the target image and mirror the live disk into it."""
        if target.name not in {d.name for d in spec.disks}:
            raise NotFound(f"VM {spec.name} has no disk {target.name}")
        state = await blockjobs.job(monitor, job_id)
        if not state.missing:
            return state  # asked again after a control plane restart: already running
        path = self.path(target)
        if path.exists():
            raise Conflict(f"{target.datastore}:{target.path} already exists",
                           "remove it or pick another path")
        nodes = await blockjobs.disk_nodes(monitor, target.name)
        await create_image(path, target.format, nodes.virtual_size, target.provisioning)
        file_node, fmt_node = target_nodes(target.name, job_id)
        try:
            await blockjobs.add_image(monitor, file_node, fmt_node, str(path), target.format,
                                      target.cache)
            await blockjobs.start_mirror(monitor, job_id, nodes.format_node, fmt_node,
                                         speed_bytes_s)
        except Exception:
            await blockjobs.remove_nodes(monitor, fmt_node, file_node)
            path.unlink(missing_ok=True)
            raise
        return await blockjobs.job(monitor, job_id)

    async def pivot(self, monitor: Monitor, spec: VmSpec, job_id: str,
                    target: DiskSpec) -> VmSpec:
        """Switch the guest to the copy (job-complete) and release the old image."""
        state = await blockjobs.job(monitor, job_id)
        if not state.ready:
            raise Conflict(f"mirror {job_id} is {state.status}, not in sync yet")
        old = await blockjobs.disk_nodes(monitor, target.name)
        await monitor.execute("job-complete", {"id": job_id})
        final = await blockjobs.wait_concluded(monitor, job_id, PIVOT_TIMEOUT_S)
        if final.error:
            raise MonitorError(f"pivot of disk {target.name} failed: {final.error}")
        new = await blockjobs.disk_nodes(monitor, target.name)
        if Path(new.filename) != self.path(target):
            raise MonitorError(f"after the pivot disk {target.name} still uses {new.filename}")
        await blockjobs.remove_nodes(monitor, old.format_node, old.file_node)
        disks = tuple(target if d.name == target.name else d for d in spec.disks)
        return spec.model_copy(update={"disks": disks})

    async def cancel_mirror(self, monitor: Monitor | None, job_id: str,
                            target: DiskSpec) -> None:
        """Stop the mirror and remove the partial copy; the guest keeps its disk."""
        if monitor is not None:
            state = await blockjobs.job(monitor, job_id)
            if not state.missing and state.status != "concluded":
                await monitor.execute("job-cancel", {"id": job_id})
            await blockjobs.wait_concluded(monitor, job_id, PIVOT_TIMEOUT_S)
            await blockjobs.remove_nodes(monitor, *reversed(target_nodes(target.name, job_id)))
        self.delete(target)


def check_disk_target(spec: VmSpec, target: DiskSpec) -> DiskSpec:
    current = next((d for d in spec.disks if d.name == target.name), None)
    if current is None:
        raise InvalidInput(f"VM {spec.name} has no disk {target.name}")
    return current


def nbd_job_id(migration_id: str, disk: str) -> str:
    return f"mig-{migration_id[:8]}-{disk}"


async def export_disks(monitor: Monitor, address: str, port: int,
                       disks: tuple[str, ...], tls: Mapping[str, str]) -> None:
    """Serve the incoming VM's (still inactive) disks over NBD for the source to fill;
    with `tls` (tls-creds, tls-authz) only the migration's source host may connect."""
    await monitor.execute("nbd-server-start", {
        "addr": {"type": "inet", "data": {"host": address, "port": str(port)}}, **tls})
    for disk in disks:
        await monitor.execute("block-export-add", {
            "type": "nbd", "id": f"exp-{disk}", "node-name": f"disk-{disk}",
            "name": disk, "writable": True})


async def unexport_disks(monitor: Monitor, disks: tuple[str, ...]) -> None:
    for disk in disks:
        try:
            await monitor.execute("block-export-del", {"id": f"exp-{disk}"})
        except CommandFailed as exc:  # QEMU answered: only "no such export" is fine
            if "not found" not in exc.desc.lower():
                raise
    try:
        await monitor.execute("nbd-server-stop")
    except CommandFailed as exc:  # QEMU 7.2 has no query for the NBD server
        if "not running" not in exc.desc.lower():
            raise


async def start_nbd_mirrors(monitor: Monitor, migration_id: str, nbd: str,
                            disks: tuple[str, ...], tls: Mapping[str, str]) -> None:
    host, _, port = nbd.rpartition(":")
    for disk in disks:
        job_id = nbd_job_id(migration_id, disk)
        if not (await blockjobs.job(monitor, job_id)).missing:
            continue  # already mirroring (asked again after a restart)
        source = await blockjobs.disk_nodes(monitor, disk)
        await monitor.execute("blockdev-add", {
            "driver": "nbd", "node-name": f"nbd-{disk}", "export": disk,
            "server": {"type": "inet", "host": host, "port": port}, **tls})
        # Write-blocking: when the source pauses at switchover the target disk must
        # already hold every write, because the destination resumes at once.
        await blockjobs.start_mirror(monitor, job_id, source.format_node, f"nbd-{disk}",
                                     write_blocking=True)


async def nbd_mirrors(monitor: Monitor, migration_id: str,
                      disks: tuple[str, ...]) -> list[MirrorProgress]:
    return [await blockjobs.job(monitor, nbd_job_id(migration_id, d)) for d in disks]


async def stop_nbd_mirrors(monitor: Monitor, migration_id: str,
                           disks: tuple[str, ...]) -> None:
    """Cancel the mirrors (a ready mirror ends in sync) and drop the NBD client nodes."""
    for disk in disks:
        job_id = nbd_job_id(migration_id, disk)
        state = await blockjobs.job(monitor, job_id)
        if not state.missing and state.status != "concluded":
            await monitor.execute("job-cancel", {"id": job_id})
        await blockjobs.wait_concluded(monitor, job_id, PIVOT_TIMEOUT_S)
        await blockjobs.remove_nodes(monitor, f"nbd-{disk}")
