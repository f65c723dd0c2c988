"""An agent's images and disk moves: image facts and deletion; the mirror of a running
VM's disk to another datastore on this host (Storage vMotion), its pivot and its cancel;
and the NBD mirrors of a migration without shared storage (this host the source, the
destination's NBD export the target). Built on the HostRuntime's VMs; the agent's
routes call it."""

from __future__ import annotations

from ferry.agent import stream_tls
from ferry.agent.disks import (
    check_disk_target,
    nbd_mirrors,
    start_nbd_mirrors,
    stop_nbd_mirrors,
    unexport_disks,
)
from ferry.agent.faults import FaultStage
from ferry.agent.host import HostRuntime, running_monitor
from ferry.agent.models import DiskMirrors, VmInfo
from ferry.agent.vmfiles import write_spec
from ferry.domain.errors import Conflict
from ferry.domain.specs import DiskSpec
from ferry.domain.storage import ImageInfo, MirrorProgress
from ferry.domain.streams import nbd_endpoint
from ferry.hypervisor import blockjobs
from ferry.hypervisor.process import ProcessState


class DiskMoves:
    def __init__(self, host: HostRuntime) -> None:
        self._host = host

    async def image(self, disk: DiskSpec) -> ImageInfo | None:
        return await self._host.disks.info(disk)

    def delete_image(self, disk: DiskSpec) -> bool:
        self._refuse_if_in_use(disk)
        return self._host.disks.delete(disk)

    def _refuse_if_in_use(self, disk: DiskSpec) -> None:
        in_use = [r.spec.name for r in self._host.records()
                  if r.process.state is ProcessState.RUNNING and any(
                      (d.datastore, d.path) == (disk.datastore, disk.path)
                      for d in r.spec.disks)]
        if in_use:
            raise Conflict(f"{disk.datastore}:{disk.path} is in use by VM {in_use[0]}")

    async def disk_files(self, name: str) -> dict[str, str]:
        """Each disk's image file as QEMU itself reports it (query-block)."""
        rec = self._host.vm_record(name)
        monitor = running_monitor(rec, self._host.config.name)
        return {d.name: (await blockjobs.disk_nodes(monitor, d.name)).filename
                for d in rec.spec.disks}

    async def start_mirror(self, name: str, job_id: str, target: DiskSpec,
                           speed_bytes_s: int = 0) -> MirrorProgress:
        rec = self._host.vm_record(name)
        check_disk_target(rec.spec, target)
        async with rec.lock:
            return await self._host.disks.start_mirror(running_monitor(rec, self._host.config.name),
                                                 rec.spec, job_id, target, speed_bytes_s)

    async def mirror(self, name: str, job_id: str, wait_s: float = 0.0) -> MirrorProgress:
        """The mirror job's state; with wait_s, once it is ready or after wait_s."""
        rec = self._host.vm_record(name)
        progress = await blockjobs.wait_ready(running_monitor(rec, self._host.config.name), job_id,
                                              wait_s)
        if progress.ready:
            self._host.faults.reach(FaultStage.MIRROR_READY, name, rec.process.pid)
        return progress

    async def pivot(self, name: str, job_id: str, target: DiskSpec) -> VmInfo:
        rec = self._host.vm_record(name)
        self._host.faults.reach(FaultStage.PIVOT, name, rec.process.pid)
        async with rec.lock:
            rec.spec = await self._host.disks.pivot(running_monitor(rec, self._host.config.name),
                                              rec.spec, job_id, target)
            write_spec(rec.paths, rec.spec)
        return await self._host.info(name)

    async def cancel_mirror(self, name: str, job_id: str, target: DiskSpec) -> None:
        rec = self._host.record(name)
        monitor = None
        if rec is not None and rec.process.state is ProcessState.RUNNING:
            monitor = rec.monitor
            if any((d.datastore, d.path) == (target.datastore, target.path)
                   for d in rec.spec.disks):
                raise Conflict(f"VM {name} already runs on {target.datastore}:{target.path}; "
                               "the move completed and cannot be cancelled")
        # Cancelling deletes the partial copy: never an image another VM here runs on
        # (the VM named may not run here at all, and then nothing else checks).
        self._refuse_if_in_use(target)
        await self._host.disks.cancel_mirror(monitor, job_id, target)

    # --- a migration without shared storage ----------------------------------------
    async def finish_incoming_storage(self, name: str, disks: tuple[str, ...]) -> None:
        rec = self._host.vm_record(name)
        await unexport_disks(running_monitor(rec, self._host.config.name), disks)

    async def start_disk_mirrors(self, name: str, req: DiskMirrors) -> list[MirrorProgress]:
        nbd_endpoint(req.nbd)  # an address:port, nothing else
        rec = self._host.vm_record(name)
        self._host.faults.reach(FaultStage.DISK_MIRRORS, name, rec.process.pid)
        monitor = running_monitor(rec, self._host.config.name)
        tls = (await stream_tls.connect_to(monitor, self._host.qemu_tls_dir(), req.tls_peer)
               if req.tls_peer else {})
        await start_nbd_mirrors(monitor, req.migration_id, req.nbd, req.disks, tls)
        return await nbd_mirrors(monitor, req.migration_id, req.disks)

    async def disk_mirrors(self, name: str, req: DiskMirrors) -> list[MirrorProgress]:
        monitor = running_monitor(self._host.vm_record(name), self._host.config.name)
        return await nbd_mirrors(monitor, req.migration_id, req.disks)

    async def stop_disk_mirrors(self, name: str, req: DiskMirrors) -> None:
        monitor = running_monitor(self._host.vm_record(name), self._host.config.name)
        await stop_nbd_mirrors(monitor, req.migration_id, req.disks)
