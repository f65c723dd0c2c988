"""The VMs one agent runs: start, stop, inspect, and both ends of a migration.

The agent keeps no inventory of its own: the control plane owns it and sends the
spec with every start. What the agent knows is which QEMU processes run here; a
restarted agent adopts them again from their run directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ferry.agent import stream_socket, stream_tls
from ferry.agent.config import AgentConfig
from ferry.agent.disks import DiskOps, export_disks
from ferry.agent.facts import QemuCapabilities, detect_accel, host_facts, probe_qemu
from ferry.agent.faults import Faults, FaultStage
from ferry.agent.fencing import Isolation, RuntimeGuests, watch_state
from ferry.agent.leases import keeper_for
from ferry.agent.models import (
    RUNSTATES,
    AgentVmState,
    IncomingReady,
    NewDisk,
    Tune,
    VmInfo,
)
from ferry.agent.networks import HostNetworks
from ferry.agent.stream_filter import Address, StreamGuard
from ferry.agent.stream_settings import (
    announce_of,
    check_postcopy_possible,
    incoming_parameters,
    send_announce,
    stream_capabilities,
    stream_parameters,
)
from ferry.agent.vmfiles import check_kernel_image, cpu_time_s, tail_lines, write_spec
from ferry.agent.watchdog import write_state
from ferry.domain.errors import Conflict, InvalidInput, NotFound
from ferry.domain.migration import Progress, SourceStatus, StreamOptions
from ferry.domain.networks import Announce
from ferry.domain.probe import last_heartbeat
from ferry.domain.specs import DiskSpec, HostFacts, VmSpec
from ferry.domain.streams import migration_endpoint
from ferry.hypervisor.argv import RunPaths, boot_file, build_argv, disk_path
from ferry.hypervisor.errors import CommandFailed, MonitorError, NotRunning
from ferry.hypervisor.images import create_image
from ferry.hypervisor.monitor import Monitor
from ferry.hypervisor.process import ProcessState, QemuProcess
from ferry.pki import HostTls

REVERT_TIMEOUT_S = 10.0  # a post-copy cancel ends within milliseconds
log = logging.getLogger("ferry.agent")


@dataclass
class VmRecord:
    spec: VmSpec
    paths: RunPaths
    process: QemuProcess
    monitor: Monitor | None
    migration_id: str | None = None
    recover_uri: str | None = None  # where a paused post-copy's destination listens
    outgoing_uri: str | None = None  # where this source's stream goes
    announce: Announce | None = None  # sent after the `cont` that makes this copy the VM
    never_ran: bool = False  # started paused (-S), never sent `cont` (see VmInfo)
    stream_source: Address | None = None  # a cleartext incoming stream's only peer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class HostRuntime:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.disks = DiskOps(config.datastore_paths)
        self.accel = detect_accel(config.accel)
        self._qemu: QemuCapabilities | None = None
        self._vms: dict[str, VmRecord] = {}
        self._create_lock = asyncio.Lock()
        self.faults = Faults(config.fault_hooks, config.run_dir / "faults.log")  # lab only
        self.networks = HostNetworks(config.migration_address or config.listen_host,
                                     config.run_dir / "networks.json")
        # HA (agent/leases.py, agent/fencing.py): None without an HA datastore.
        self.leases = keeper_for(config, RuntimeGuests(self))
        self.isolation = Isolation(self)
        self.streams = StreamGuard()  # cleartext incoming streams: the source host only
        if self.leases is not None:
            keeper, run_dir = self.leases, config.run_dir
            keeper.on_round = lambda: write_state(run_dir, watch_state(keeper, self.isolation))

    @property
    def vms_dir(self) -> Path:
        return self.config.run_dir / "vms"

    async def setup(self) -> None:
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.networks.load()
        await self.networks.restore_filter()
        await self.streams.reset()
        await self.networks.probe_underlay()
        self._qemu = await probe_qemu(self.accel)
        await self._adopt()
        if self.leases is not None:
            # Run directories left (unreadable specs) count as present: QEMU may live.
            await self.leases.start(self.names(), [d.name for d in self.vms_dir.iterdir()])

    async def _adopt(self) -> None:
        for spec_file in sorted(self.vms_dir.glob("*/spec.json")):
            paths = RunPaths(spec_file.parent)
            try:
                spec = VmSpec.model_validate_json(spec_file.read_text())
            except (OSError, ValidationError) as exc:
                # One unreadable VM must not keep the agent (and every other VM) down;
                # its QEMU, if any, is left alone for an operator to look at.
                log.warning("not adopting %s: unreadable spec.json (%s)", paths.directory,
                            exc)
                continue
            adopted = await QemuProcess.adopt(spec.name, paths)
            if adopted is None:
                await self.networks.unplug(spec)
                shutil.rmtree(paths.directory, ignore_errors=True)
                continue
            proc, monitor = adopted
            self._vms[spec.name] = VmRecord(spec=spec, paths=paths, process=proc,
                                            monitor=monitor)
        await self.networks.guard_adopted(rec.spec for rec in self._vms.values())

    async def shutdown(self) -> None:
        """Close monitors; the guests keep running (an agent restart is no outage)."""
        if self.leases is not None:
            await self.leases.close()
        for rec in self._vms.values():
            if rec.monitor is not None:
                await rec.monitor.close()

    def qemu_tls_dir(self) -> Path:
        tls = HostTls(self.config.tls_path)
        if not tls.enrolled():
            raise Conflict(f"host {self.config.name} has no cluster certificate for "
                           "encrypted streams", "enrol the host, or migrate with "
                           "encryption disabled")
        return tls.qemu_dir

    # --- facts -----------------------------------------------------------------
    def facts(self) -> HostFacts:
        assert self._qemu is not None, "setup() not run"
        used = sum(r.spec.memory_mib for r in self._vms.values()
                   if r.process.state is ProcessState.RUNNING)
        return host_facts(self.config, self.accel, self._qemu, used, self.networks)

    # --- inspection ------------------------------------------------------------
    def record(self, name: str) -> VmRecord | None:
        return self._vms.get(name)

    def vm_record(self, name: str) -> VmRecord:
        """The record of VM `name`; NotFound if none runs here."""
        return self._get(name)

    def names(self) -> list[str]:
        return sorted(self._vms)

    def records(self) -> list[VmRecord]:
        return list(self._vms.values())

    def _get(self, name: str) -> VmRecord:
        rec = self._vms.get(name)
        if rec is None:
            raise NotFound(f"no VM {name!r} runs on host {self.config.name}")
        return rec

    async def _state(self, rec: VmRecord, loaded_wait_s: float = 0.0) -> AgentVmState:
        if rec.process.state is not ProcessState.RUNNING:
            return AgentVmState.EXITED
        if rec.monitor is None:
            return AgentVmState.STARTING
        try:
            runstate = await (rec.monitor.runstate_loaded(loaded_wait_s) if loaded_wait_s
                              else rec.monitor.runstate())
        except MonitorError:
            return (AgentVmState.EXITED if rec.process.state is not ProcessState.RUNNING
                    else AgentVmState.STARTING)
        return RUNSTATES.get(runstate, AgentVmState.PAUSED)

    async def info(self, name: str, loaded_wait_s: float = 0.0) -> VmInfo:
        """`loaded_wait_s`: a destination still loading its stream is waited for, up to
        this long (Monitor.runstate_loaded)."""
        rec = self._get(name)
        state = await self._state(rec, loaded_wait_s)
        if state is AgentVmState.INCOMING:
            self.faults.reach(FaultStage.INCOMING_POLL, name, rec.process.pid)
        return VmInfo(name=name, uuid=rec.spec.uuid, state=state,
                      pid=rec.process.pid, exit_code=rec.process.returncode, spec=rec.spec,
                      heartbeat=last_heartbeat(tail_lines(rec.paths.serial_log, 50)),
                      migration_id=rec.migration_id, never_ran=rec.never_ran,
                      cpu_time_s=cpu_time_s(rec.process.pid))

    async def list_vms(self) -> list[VmInfo]:
        return [await self.info(name) for name in sorted(self._vms)]

    def serial(self, name: str, lines: int) -> list[str]:
        return tail_lines(self._get(name).paths.serial_log, lines)

    # --- lifecycle -------------------------------------------------------------
    def _check_runnable(self, spec: VmSpec) -> str:
        assert self._qemu is not None
        machine = self._qemu.machine_aliases.get(spec.machine, spec.machine)
        if machine not in self._qemu.machine_types:
            raise InvalidInput(f"host {self.config.name} has no machine type {spec.machine}")
        if spec.cpu_model not in self._qemu.cpu_models:
            raise InvalidInput(f"host {self.config.name} cannot provide CPU model "
                               f"{spec.cpu_model}")
        stores = self.config.datastore_paths
        for disk in spec.disks:
            if disk.datastore not in stores:
                raise InvalidInput(f"host {self.config.name} does not see datastore "
                                   f"{disk.datastore}")
            if not disk_path(disk, stores).exists():
                raise InvalidInput(f"disk image {disk.path} does not exist on datastore "
                                   f"{disk.datastore}", "create the image first")
        if spec.kernel is not None:
            for path in (spec.kernel.kernel, spec.kernel.initrd):
                if path is not None and not boot_file(path, stores).is_file():
                    raise InvalidInput(f"host {self.config.name} cannot read boot file {path}",
                                       "put it on storage every host can read")
            check_kernel_image(boot_file(spec.kernel.kernel, stores))
        self.networks.check(spec, self.config.name)
        return machine

    async def _check_images(self, spec: VmSpec) -> None:
        """Refuse an image whose header names a backing file: QEMU (as root) would open
        it wherever it points; Ferry declares no backing chains."""
        for disk in spec.disks:
            if disk.datastore not in self.config.datastore_paths:
                continue  # _check_runnable names the missing datastore
            info = await self.disks.info(disk)
            if info is not None and info.backing:
                raise InvalidInput(f"disk {disk.name} ({disk.datastore}:{disk.path}) names a "
                                   f"backing file {info.backing!r}, which Ferry does not open",
                                   "flatten it first: qemu-img convert -O qcow2 OLD NEW")

    async def _launch(self, spec: VmSpec, *, incoming: bool) -> VmRecord:
        await self._check_images(spec)
        async with self._create_lock:
            old = self._vms.get(spec.name)
            if old is not None and old.process.state is ProcessState.RUNNING:
                raise Conflict(f"VM {spec.name} already runs on host {self.config.name}")
            machine = self._check_runnable(spec)
            paths = RunPaths(self.vms_dir / spec.name)
            paths.directory.mkdir(parents=True, exist_ok=True)
            write_spec(paths, spec)
            argv = build_argv(spec, machine=machine, accel=self.accel, paths=paths,
                              datastores=self.config.datastore_paths, incoming=incoming,
                              network_mtus=self.networks.mtus())
            if old is None or old.process.state is not ProcessState.RUNNING:
                paths.qemu_log.unlink(missing_ok=True)
            # A migration's destination runs its guest only on `cont`: its NIC filter
            # may finish alongside its QEMU's launch.
            filtered = await self.networks.attach(spec, guest_waits=incoming)
            proc = QemuProcess(spec.name, argv, paths)
            rec = VmRecord(spec=spec, paths=paths, process=proc, monitor=None)
            self._vms[spec.name] = rec
        try:
            rec.monitor = await proc.start()
            await filtered
        except Exception:
            filtered.cancel()
            await proc.kill()
            await self._forget(spec.name)
            raise
        return rec

    async def create(self, spec: VmSpec, paused: bool = False, lease_wait_s: float = 0.0,
                     lease_take_over: bool = False) -> VmInfo:
        """Start a VM's QEMU here, holding its lease (taken over at once only on the
        control plane's word that its holder is powered off). Its guest runs unless
        `paused`."""
        held = self.leases is not None and spec.name in self.leases.held
        with (self.leases.starting(spec.name) if self.leases is not None
              else contextlib.nullcontext()):
            if self.leases is not None and lease_take_over:
                await self.leases.take_over(spec.name)
            elif self.leases is not None:
                await self.leases.acquire(spec.name, lease_wait_s)
            try:
                rec = await self._launch(spec, incoming=False)
            except Exception:
                if self.leases is not None and not held:
                    await self.leases.release(spec.name)
                raise
        # QEMU starts the guest at once unless -S; we never pass -S for plain starts.
        if paused and rec.monitor is not None:
            await rec.monitor.execute("stop")
        self.faults.reach(FaultStage.STARTED, spec.name, rec.process.pid)
        return await self.info(spec.name)

    async def stop(self, name: str, force: bool, grace_s: float = 30.0) -> VmInfo:
        """Power the VM off: ACPI shutdown first (unless force), then kill."""
        rec = self._get(name)
        unplugged: asyncio.Task[None] | None = None
        async with rec.lock:
            if rec.process.state is ProcessState.RUNNING and rec.monitor is not None:
                if not force:
                    with contextlib.suppress(MonitorError):
                        await rec.monitor.powerdown()
                    await rec.process.wait(grace_s)
                if rec.process.state is ProcessState.RUNNING:
                    await rec.monitor.quit()
                    # QEMU ends and sends nothing more: its taps go while it exits (a
                    # delete waits ~16 ms in the kernel, the exit 50-70); _forget awaits.
                    unplugged = asyncio.create_task(self.networks.unplug(rec.spec))
                    unplugged.add_done_callback(lambda t: t.cancelled() or t.exception())
                    await rec.process.wait(3.0)
            await rec.process.kill()
            if self.leases is not None:
                with contextlib.suppress(Exception):  # unreleased, it expires instead
                    await self.leases.release(name)
            if rec.monitor is not None:
                await rec.monitor.close()
            info = await self.info(name)
            await self._forget(name, unplugged)
            return info

    async def _forget(self, name: str, unplugged: asyncio.Task[None] | None = None) -> None:
        """Drop the VM's record, taps (unless `unplugged` is removing them) and files."""
        rec = self._vms.pop(name, None)
        await self.streams.release_quietly(name)
        if rec is not None:
            rec.process.close()
            await (unplugged or self.networks.unplug(rec.spec))
            shutil.rmtree(rec.paths.directory, ignore_errors=True)
        elif unplugged is not None:
            await unplugged

    async def resume(self, name: str) -> VmInfo:
        rec = self._get(name)
        self.faults.reach(FaultStage.RESUME, name, rec.process.pid)
        monitor = running_monitor(rec, self.config.name)
        # A QEMU that does not answer here never gets `cont`: never_ran stays proven.
        if await monitor.runstate() == "inmigrate":
            # `cont` now would make QEMU start the guest on its own when the stream ends.
            raise Conflict(f"VM {name} on {self.config.name} is still receiving its "
                           "migration", "resume it only once the stream has completed")
        if self.leases is not None:
            # Only the migration engine resumes, once it decided this copy is the VM
            # (switch recorded, or a destination that never ran): the lease follows.
            await self.leases.take_over(name)
        rec.never_ran = False  # from the moment `cont` may reach QEMU
        await monitor.cont()
        await self.streams.release_quietly(name)
        self.faults.reach(FaultStage.RESUMED, name, rec.process.pid)
        await send_announce(monitor, rec.announce, name)
        rec.announce = None
        return await self.info(name)

    # --- migration: destination side -----------------------------------------
    async def prepare_incoming(self, migration_id: str, spec: VmSpec, options: StreamOptions,
                               new_disks: tuple[NewDisk, ...] = (),
                               tls_peer: str | None = None,
                               source: Address | None = None) -> IncomingReady:
        """Start QEMU with -incoming defer and listen; return where to send memory (and,
        without shared storage, the NBD server exporting the freshly created disks).
        `source`: a cleartext stream's source host, the only address let connect."""
        created = await self._create_disks(new_disks)
        try:
            rec = await self._launch(spec, incoming=True)
        except Exception:
            for disk in created:
                self.disks.delete(disk)
            raise
        rec.migration_id, rec.never_ran = migration_id, True
        rec.announce = announce_of(options, spec)
        assert rec.monitor is not None
        address = self.config.migration_address or self.config.listen_host
        nbd = None
        try:
            # Both ends must agree on these before the stream starts.
            await rec.monitor.set_migration_capabilities(stream_capabilities(options, False))
            tls = (await stream_tls.accept_from(rec.monitor, self.qemu_tls_dir(), tls_peer)
                   if tls_peer else {})
            await rec.monitor.set_migration_parameters(
                stream_parameters(options) | incoming_parameters(options) | tls)
            # The listeners' ports are picked by the agent (StreamGuard.port_for).
            if new_disks:
                port = await self.streams.port_for(spec.name, address, source)
                await export_disks(rec.monitor, address, port,
                                   tuple(d.disk.name for d in new_disks), tls)
                nbd = f"{address}:{port}"
            rec.stream_source = source
            uri = await rec.monitor.listen_incoming(
                address, await self.streams.port_for(spec.name, address, source))
        except Exception:
            await self.stop(spec.name, force=True)
            for disk in created:
                self.disks.delete(disk)
            raise
        self.faults.reach(FaultStage.PREPARE_INCOMING, spec.name, rec.process.pid)
        return IncomingReady(uri=uri, nbd=nbd)

    async def _create_disks(self, new_disks: tuple[NewDisk, ...]) -> list[DiskSpec]:
        created: list[DiskSpec] = []
        try:
            for new in new_disks:
                path = self.disks.path(new.disk)
                if path.exists():
                    raise Conflict(f"{new.disk.datastore}:{new.disk.path} already exists "
                                   f"on {self.config.name}", "remove it or pick another path")
                await create_image(path, new.disk.format, new.size, new.disk.provisioning)
                created.append(new.disk)
        except Exception:
            for disk in created:
                self.disks.delete(disk)
            raise
        return created

    async def recover_incoming(self, name: str) -> IncomingReady:
        """Destination of a post-copy whose source QEMU paused it on a broken link: listen
        anew (migrate-recover) and say where; asked again while listening, the same place.
        A destination that has not noticed the break yet (it only reads, and nothing
        arrives) is paused first: its stream is dead anyway."""
        rec = self._get(name)
        monitor = running_monitor(rec, self.config.name)
        status = (await monitor.query_migrate()).status
        if status in (SourceStatus.POSTCOPY_RECOVER, SourceStatus.POSTCOPY_RECOVER_SETUP) \
                and rec.recover_uri is not None:
            return IncomingReady(uri=rec.recover_uri)
        if status is SourceStatus.POSTCOPY_ACTIVE:
            await monitor.execute("migrate-pause")
            for _ in range(50):  # QEMU pauses once its loading thread sees the shutdown
                status = (await monitor.query_migrate()).status
                if status is not SourceStatus.POSTCOPY_ACTIVE:
                    break
                await asyncio.sleep(0.1)
        if status is not SourceStatus.POSTCOPY_PAUSED:
            raise Conflict(f"the incoming migration of {name} on {self.config.name} is "
                           f"{status}, not paused", "recover only a paused post-copy")
        address = self.config.migration_address or self.config.listen_host
        port = await self.streams.port_for(name, address, rec.stream_source)
        await monitor.migrate_recover(f"tcp:{address}:{port}")
        uri = f"tcp:{address}:{port}"
        rec.recover_uri = uri
        return IncomingReady(uri=uri)

    # --- migration: source side ------------------------------------------------
    async def start_outgoing(self, name: str, migration_id: str, uri: str,
                             options: StreamOptions, downtime_ms: int,
                             tls_peer: str | None = None) -> None:
        migration_endpoint(uri)  # tcp:<IPv4>:<port> only: never exec:, file:, unix:, fd:
        rec = self._get(name)
        if rec.monitor is None or rec.process.state is not ProcessState.RUNNING:
            raise NotRunning(f"VM {name} has no running QEMU on {self.config.name}")
        current = await rec.monitor.query_migrate()
        if current.status.in_progress:
            if rec.migration_id == migration_id:
                return  # a resumed control plane asking again: already under way
            raise Conflict(f"VM {name} is already migrating ({rec.migration_id})")
        rec.migration_id = migration_id
        # Run again after a rollback, the source announces the guest (send_announce).
        rec.announce = announce_of(options, rec.spec)
        rec.monitor.migration_events.clear()
        await rec.monitor.set_migration_capabilities(stream_capabilities(options, True))
        params = stream_parameters(options)
        params.update(await stream_tls.connect_to(rec.monitor, self.qemu_tls_dir(), tls_peer)
                      if tls_peer else stream_tls.CLEARTEXT)
        params["downtime-limit"] = downtime_ms
        # "unlimited" unless capped: QEMU's own 128 MiB/s default is not ours.
        params["max-bandwidth"] = options.max_bandwidth_bytes_s or 1 << 40
        if options.throttles:
            # auto-converge must be on from the start (capabilities are fixed while a
            # migration runs) but stays inert (1 %) until the policy raises the ceiling.
            params.update({"cpu-throttle-initial": 1, "cpu-throttle-increment": 1,
                           "max-cpu-throttle": 1})
        await rec.monitor.set_migration_parameters(params)
        self.faults.reach(FaultStage.START_OUTGOING, name, rec.process.pid)
        rec.outgoing_uri = uri
        await rec.monitor.migrate(uri)

    async def resume_outgoing(self, name: str, migration_id: str, uri: str) -> Progress:
        """Source of a post-copy that QEMU paused on a broken link: reconnect to the
        destination's recovery listener (migrate with resume)."""
        migration_endpoint(uri)  # tcp:<IPv4>:<port> only, as for the first stream
        rec = self._get(name)
        monitor = running_monitor(rec, self.config.name)
        status = (await monitor.query_migrate()).status
        if rec.migration_id not in (None, migration_id):
            raise Conflict(f"VM {name} is in another migration ({rec.migration_id})")
        if status is not SourceStatus.POSTCOPY_PAUSED:
            raise Conflict(f"the migration of {name} on {self.config.name} is {status}, "
                           "not a paused post-copy", "resume only a paused post-copy")
        await monitor.migrate(uri, resume=True)
        return await monitor.query_migrate()

    async def tune(self, name: str, tune: Tune) -> Progress:
        """Pull a convergence lever on the running outgoing migration."""
        rec = self._get(name)
        if rec.monitor is None or rec.process.state is not ProcessState.RUNNING:
            raise NotRunning(f"VM {name} has no running QEMU on {self.config.name}")
        if tune.postcopy:
            # Checked before anything is set: a refused request changes nothing.
            await check_postcopy_possible(rec.monitor, name, self.config.name)
        params: dict[str, object] = {}
        if tune.downtime_ms is not None:
            params["downtime-limit"] = tune.downtime_ms
        if tune.throttle_pct is not None:
            # QEMU's next throttle step lands on the wanted level (it only ever raises).
            params.update({"cpu-throttle-initial": tune.throttle_pct,
                           "cpu-throttle-increment": 99, "max-cpu-throttle": tune.throttle_pct})
        if params:
            await rec.monitor.set_migration_parameters(params)
        if tune.postcopy:
            await rec.monitor.execute("migrate-start-postcopy")
            self.faults.reach(FaultStage.POSTCOPY, name, rec.process.pid)
        progress = await rec.monitor.query_migrate()
        if tune.backlog_margin_ms is not None and progress.status.in_progress:
            await stream_socket.cap_outgoing(rec.process.pid, rec.outgoing_uri, progress,
                                             tune.backlog_margin_ms)
        return progress

    async def progress(self, name: str, wait_s: float,
                       completed: Callable[[], None] | None = None) -> Progress:
        """query-migrate, after the next migration event or wait_s, whichever first;
        `completed` is called the moment QEMU says the stream completed."""
        rec = self._get(name)
        if rec.monitor is None or rec.process.state is not ProcessState.RUNNING:
            raise NotRunning(f"VM {name} has no running QEMU on {self.config.name}")
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rec.monitor.migration_events.get(), wait_s)
            rec.monitor.migration_events.clear()
        progress = await rec.monitor.query_migrate()
        if progress.status is SourceStatus.COMPLETED:
            if completed is not None:
                completed()
            progress = await rec.monitor.completed_stats(progress)
        if progress.status is SourceStatus.ACTIVE:
            self.faults.reach(FaultStage.PRECOPY_PASS, name, rec.process.pid,
                              progress.dirty_sync_count)
        elif progress.status is SourceStatus.COMPLETED:
            self.faults.reach(FaultStage.SOURCE_COMPLETED, name, rec.process.pid)
        return progress

    async def revert_outgoing(self, name: str) -> VmInfo:
        """Run the source of a post-copy again whose destination never ran (the control
        plane has its agent's word): the source still holds the whole guest. QEMU 7.2
        restarts the guest by itself when a post-copy fails or is cancelled, but leaves
        its disks handed over (inactive; a write then aborts QEMU), and refuses `cont`
        until that restart: so `cont` (which re-activates them) is retried right behind
        it on the monitor. A post-copy QEMU paused on the broken stream cannot be ended
        at all (7.2's cancel leaves it waiting for a recovery): refused."""
        rec = self._get(name)
        monitor = running_monitor(rec, self.config.name)
        status = (await monitor.query_migrate()).status
        if status in (SourceStatus.POSTCOPY_PAUSED, SourceStatus.POSTCOPY_RECOVER):
            # QEMU 7.2's migrate_cancel leaves a paused post-copy waiting for ever.
            raise Conflict(f"the post-copy of VM {name} on {self.config.name} is {status}: "
                           "QEMU cannot end it to run the source again")
        if self.leases is not None:
            await self.leases.take_over(name)
        if status.in_progress:
            await monitor.migrate_cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REVERT_TIMEOUT_S
        while True:
            try:
                await monitor.cont()
                break
            except CommandFailed as exc:  # "Migration is not finalized yet"
                if loop.time() > deadline:
                    raise Conflict(f"VM {name} on {self.config.name}: QEMU refused `cont` "
                                   f"for {REVERT_TIMEOUT_S:.0f} s after the post-copy "
                                   f"ended ({exc.desc})") from exc
                await asyncio.sleep(0.001)
        await send_announce(monitor, rec.announce, name)
        rec.announce = None
        return await self.info(name)

    async def cancel_outgoing(self, name: str) -> Progress:
        rec = self._get(name)
        if rec.monitor is None:
            raise NotRunning(f"VM {name} has no monitor on {self.config.name}")
        await rec.monitor.migrate_cancel()
        return await rec.monitor.query_migrate()


def running_monitor(rec: VmRecord, host: str) -> Monitor:
    if rec.monitor is None or rec.process.state is not ProcessState.RUNNING:
        raise NotRunning(f"VM {rec.spec.name} has no running QEMU on {host}")
    return rec.monitor

