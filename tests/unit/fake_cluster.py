"""In-memory agents for driving the real orchestrator and store without QEMU.

Each FakeAgent keeps the QEMU processes of one host as FakeVm objects and moves them the
way QEMU does: an incoming copy waits (INCOMING), pauses when the stream completes (it
starts with -S), and runs only on `resume_vm`. A test scripts the source's migration
statuses and can make any agent call fail once, to inject faults.
"""

from __future__ import annotations

import array
import asyncio
import inspect
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.agent.models import AgentVmState, IncomingReady, NewDisk, Tune, VmInfo
from ferry.control.agents import AgentPool
from ferry.control.events import ChangeBus
from ferry.control.inventory import Inventory
from ferry.control.migration import Orchestrator
from ferry.domain.errors import FerryError, HostUnavailable, NotFound
from ferry.domain.inventory import VmState
from ferry.domain.memory_check import CHUNK_BYTES, PAGES_PER_CHUNK
from ferry.domain.migration import Phase, Progress, SourceStatus, StreamOptions
from ferry.domain.records import HostRecord, VmRecord
from ferry.domain.specs import (
    DatastoreInfo,
    DiskFormat,
    DiskSpec,
    HostFacts,
    KernelBoot,
    NicSpec,
    VmSpec,
)
from ferry.domain.storage import ImageInfo, MirrorProgress
from ferry.store import Store
from ferry.store.store import sqlite_url


def facts(name: str, memory_mib: int = 2048, datastores: tuple[str, ...] = ("shared",)
          ) -> HostFacts:
    return HostFacts(
        name=name, address="10.0.0.1", accel="tcg", cpus=4, memory_mib=memory_mib,
        memory_free_mib=memory_mib, cpu_models=("Nehalem",), qemu_version="7.2.0",
        machine_types=("pc-i440fx-7.2",), machine_aliases={"pc": "pc-i440fx-7.2"},
        migration_tls=True,
        datastores=tuple(DatastoreInfo(name=d, path=f"/ds/{d}", shared=d == "shared",
                                       total_bytes=1 << 40, free_bytes=1 << 40)
                         for d in datastores),
        networks=("vmnet",))


def spec(name: str, memory_mib: int = 256, disks: tuple[DiskSpec, ...] = (),
         mac: str = "52:54:00:00:00:01") -> VmSpec:
    return VmSpec(name=name, memory_mib=memory_mib, kernel=KernelBoot(kernel="/k"),
                  machine="pc-i440fx-7.2", disks=disks,
                  nics=(NicSpec(name="nic0", network="vmnet", mac=mac),))


@dataclass
class FakeVm:
    spec: VmSpec
    state: AgentVmState
    migration_id: str | None = None
    # The source side's scripted query-migrate statuses, consumed one per progress call;
    # the last one repeats.
    script: list[SourceStatus] = field(default_factory=list)
    status: SourceStatus = SourceStatus.NONE
    peer: tuple[FakeAgent, str] | None = None  # where the outgoing stream goes
    sync: int = 0
    never_ran: bool = False  # started paused (-S) and never resumed, as the agent says
    # Pages of this copy's RAM that differ from the source's (a lost write under TCG);
    # digests are 0 for every other page and chunk, 1 where a stale page lies.
    stale: set[int] = field(default_factory=set)


class FakeAgent:
    def __init__(self, host: str, cluster: FakeCluster) -> None:
        self.host = host
        self.cluster = cluster
        self.vms: dict[str, FakeVm] = {}
        self.images: set[tuple[str, str]] = set()
        self.created: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.calls: list[str] = []
        # method name -> errors to raise on its next calls (one each)
        self.faults: dict[str, list[Exception]] = defaultdict(list)
        self.mirrors_ready = True  # False: the disk copy never gets in sync
        self.ignore_cancel = False  # True: QEMU never ends the stream when cancelled
        # method name -> called (and awaited, if it returns an awaitable) on each call
        self.on_call: dict[str, Callable[[], Any]] = {}

    async def _enter(self, method: str) -> None:
        self.calls.append(method)
        hook = self.on_call.get(method)
        if hook is not None:
            result = hook()
            if inspect.isawaitable(result):
                await result
        if self.faults[method]:
            raise self.faults[method].pop(0)

    def _get(self, name: str) -> FakeVm:
        vm = self.vms.get(name)
        if vm is None:
            raise NotFound(f"no VM {name!r} runs on host {self.host}")
        return vm

    # --- the AgentClient methods the orchestrator uses --------------------------------
    async def vm(self, name: str, timeout_s: float | None = None,
                 loaded_wait_s: float = 0.0) -> VmInfo:
        await self._enter("vm")
        vm = self._get(name)
        return VmInfo(name=name, uuid=vm.spec.uuid, state=vm.state, pid=1, spec=vm.spec,
                      migration_id=vm.migration_id, never_ran=vm.never_ran)

    async def prepare_incoming(self, migration_id: str, spec: VmSpec, options: StreamOptions,
                               new_disks: tuple[NewDisk, ...] = (),
                               tls_peer: str | None = None,
                               source_address: str | None = None) -> IncomingReady:
        await self._enter("prepare_incoming")
        for new in new_disks:
            key = (new.disk.datastore, new.disk.path)
            if key in self.images:
                raise FerryError(f"{key} already exists")  # as the agent: nothing created
        for new in new_disks:
            key = (new.disk.datastore, new.disk.path)
            self.images.add(key)
            self.created.append(key)
        self.vms[spec.name] = FakeVm(spec=spec, state=AgentVmState.INCOMING,
                                     migration_id=migration_id, never_ran=True)
        return IncomingReady(uri=f"tcp:{self.host}:4444",
                             nbd=f"{self.host}:10809" if new_disks else None)

    async def start_outgoing(self, name: str, migration_id: str, uri: str,
                             options: StreamOptions, downtime_ms: int,
                             tls_peer: str | None = None) -> None:
        await self._enter("start_outgoing")
        vm = self._get(name)
        vm.migration_id = migration_id
        target = uri.split(":")[1]
        vm.peer = (self.cluster.agents[target], name)
        vm.status = SourceStatus.SETUP
        if not vm.script:
            vm.script = [SourceStatus.ACTIVE, SourceStatus.COMPLETED]

    def _advance(self, vm: FakeVm) -> None:
        if not vm.script or vm.status is SourceStatus.NONE or vm.status.finished:
            return
        before = vm.status
        vm.status = vm.script.pop(0) if len(vm.script) > 1 else vm.script[0]
        vm.sync += 1
        switched = vm.status is SourceStatus.COMPLETED or vm.status is \
            SourceStatus.POSTCOPY_ACTIVE or vm.status.postcopy_fault
        if switched and vm.status is not before:
            vm.state = AgentVmState.MIGRATED
            dest = self._peer_vm(vm)
            if dest is not None and dest.state is AgentVmState.INCOMING:
                dest.state = AgentVmState.PAUSED  # -S: it waits for `cont`

    def _peer_vm(self, vm: FakeVm) -> FakeVm | None:
        if vm.peer is None:
            return None
        agent, name = vm.peer
        return agent.vms.get(name)

    async def progress(self, name: str, wait_s: float = 0.0) -> Progress:
        await self._enter("progress")
        await asyncio.sleep(min(wait_s, 0.005))  # the long poll, briefly: a loop yields
        vm = self._get(name)
        self._advance(vm)
        return Progress(status=vm.status, dirty_sync_count=vm.sync, remaining_bytes=1 << 20,
                        transferred_bytes=vm.sync << 20, elapsed_ms=100 * vm.sync,
                        downtime_ms=10 if vm.status is SourceStatus.COMPLETED else None)

    async def tune(self, name: str, tune: Tune) -> Progress:
        await self._enter("tune")
        vm = self._get(name)
        if tune.postcopy:
            vm.status = SourceStatus.POSTCOPY_ACTIVE
            vm.state = AgentVmState.MIGRATED
            dest = self._peer_vm(vm)
            if dest is not None and dest.state is AgentVmState.INCOMING:
                dest.state = AgentVmState.PAUSED
        return Progress(status=vm.status)

    async def recover_incoming(self, name: str) -> IncomingReady:
        await self._enter("recover_incoming")
        self._get(name)
        return IncomingReady(uri=f"tcp:{self.host}:5555")

    async def resume_outgoing(self, name: str, migration_id: str, uri: str) -> Progress:
        """As QEMU: the paused post-copy reconnects and goes on to the end."""
        await self._enter("resume_outgoing")
        vm = self._get(name)
        if vm.status is not SourceStatus.POSTCOPY_PAUSED:
            raise FerryError(f"the migration of {name} is {vm.status}, not paused")
        vm.status = SourceStatus.POSTCOPY_RECOVER
        vm.script = [SourceStatus.POSTCOPY_ACTIVE, SourceStatus.COMPLETED]
        return Progress(status=vm.status)

    async def cancel_migration(self, name: str) -> Progress:
        await self._enter("cancel_migration")
        vm = self._get(name)
        if vm.status in (SourceStatus.ACTIVE, SourceStatus.SETUP) and not self.ignore_cancel:
            vm.status = SourceStatus.CANCELLED
            vm.script = [SourceStatus.CANCELLED]
        return Progress(status=vm.status)

    async def revert_outgoing(self, name: str) -> VmInfo:
        """As the agent: the post-copy ends and the source runs again."""
        await self._enter("revert_outgoing")
        vm = self._get(name)
        vm.status = SourceStatus.CANCELLED
        vm.script = [SourceStatus.CANCELLED]
        if vm.state is not AgentVmState.RUNNING:
            self.cluster.ran.append((self.host, name))
        vm.state = AgentVmState.RUNNING
        return await self.vm(name)

    async def ram_digests(self, name: str, chunks: tuple[int, ...] | None = None) -> bytes:
        await self._enter("ram_digests")
        vm = self._get(name)
        stale_chunks = {p // PAGES_PER_CHUNK for p in vm.stale}
        if chunks is None:
            count = vm.spec.memory_mib * 2**20 // CHUNK_BYTES
            return array.array("Q", (int(c in stale_chunks) for c in range(count))).tobytes()
        return array.array("Q", (int(c * PAGES_PER_CHUNK + i in vm.stale) for c in chunks
                                 for i in range(PAGES_PER_CHUNK))).tobytes()

    async def read_ram_pages(self, name: str, pages: tuple[int, ...]) -> bytes:
        await self._enter("read_ram_pages")
        self._get(name)
        return bytes(4096 * len(pages))

    async def write_ram_pages(self, name: str, pages: tuple[int, ...], data: bytes) -> None:
        await self._enter("write_ram_pages")
        vm = self._get(name)
        assert vm.never_ran and len(data) == 4096 * len(pages)
        vm.stale -= set(pages)

    async def resume_vm(self, name: str) -> VmInfo:
        await self._enter("resume_vm")
        vm = self._get(name)
        if vm.state is AgentVmState.INCOMING:
            raise FerryError(f"VM {name} is still receiving its migration")
        if vm.state is AgentVmState.EXITED:
            raise FerryError(f"VM {name} has no running QEMU on {self.host}")
        vm.never_ran = False
        if vm.state is not AgentVmState.RUNNING:
            self.cluster.ran.append((self.host, name))
        vm.state = AgentVmState.RUNNING
        return await self.vm(name)

    async def stop_vm(self, name: str, force: bool = False, grace_s: float = 30.0) -> VmInfo:
        await self._enter("stop_vm")
        info = await self.vm(name)
        del self.vms[name]
        return info

    async def image(self, disk: DiskSpec) -> ImageInfo | None:
        await self._enter("image")
        if (disk.datastore, disk.path) not in self.images:
            return None
        return ImageInfo(path=disk.path, format=DiskFormat.QCOW2, virtual_size=1 << 30,
                         allocated=1 << 20)

    async def delete_image(self, disk: DiskSpec) -> bool:
        await self._enter("delete_image")
        key = (disk.datastore, disk.path)
        self.deleted.append(key)
        existed = key in self.images
        self.images.discard(key)
        return existed

    async def start_disk_mirrors(self, name: str, migration_id: str, nbd: str,
                                 disks: tuple[str, ...], tls_peer: str | None = None
                                 ) -> list[MirrorProgress]:
        await self._enter("start_disk_mirrors")
        return await self.disk_mirrors(name, migration_id, disks)

    async def disk_mirrors(self, name: str, migration_id: str, disks: tuple[str, ...]
                           ) -> list[MirrorProgress]:
        await self._enter("disk_mirrors")
        if self.mirrors_ready:
            return [MirrorProgress(job_id=d, status="ready", offset=10, length=10,
                                   ready=True) for d in disks]
        return [MirrorProgress(job_id=d, status="running", offset=5, length=10)
                for d in disks]

    async def stop_disk_mirrors(self, name: str, migration_id: str, disks: tuple[str, ...]
                                ) -> None:
        await self._enter("stop_disk_mirrors")

    async def finish_incoming_storage(self, name: str, disks: tuple[str, ...]) -> None:
        await self._enter("finish_incoming_storage")


class FakePool(AgentPool):
    def __init__(self, cluster: FakeCluster) -> None:
        super().__init__()
        self.cluster = cluster

    def client(self, host: HostRecord) -> Any:
        return self.cluster.agents[host.name]


class FakeCluster:
    """A store on disk, fake agents, and the real Orchestrator over them."""

    def __init__(self, store: Store, hosts: dict[str, HostFacts]) -> None:
        self.store = store
        self.agents = {h: FakeAgent(h, self) for h in hosts}
        self.facts = hosts
        self.pool = FakePool(self)
        self.bus = ChangeBus()
        self.inventory = Inventory(store, self.pool)
        self.orchestrator = Orchestrator(store, self.inventory, self.pool, self.bus)
        # (host, vm) each time a paused copy was set running: the guest's history
        self.ran: list[tuple[str, str]] = []

    @classmethod
    async def open(cls, directory: Path, hosts: dict[str, HostFacts] | None = None,
                   db_url: str | None = None) -> FakeCluster:
        """On a SQLite file in `directory`, or the store at `db_url`."""
        store = await Store.open(db_url or sqlite_url(str(directory / "ferry.db")))
        cluster = cls(store, hosts or {h: facts(h) for h in ("host1", "host2")})
        await cluster.heartbeat()
        return cluster

    async def heartbeat(self) -> None:
        for name, f in self.facts.items():
            await self.store.record_heartbeat(f, f"http://{name}")

    async def close(self) -> None:
        await self.orchestrator.shutdown()
        await self.store.close()

    async def add_running_vm(self, vm: VmSpec, host: str) -> None:
        await self.store.add_vm(VmRecord(spec=vm, host=host, state=VmState.RUNNING))
        self.agents[host].vms[vm.name] = FakeVm(spec=vm, state=AgentVmState.RUNNING)
        for d in vm.disks:
            self.agents[host].images.add((d.datastore, d.path))

    def running_on(self, name: str) -> list[str]:
        """Hosts where a copy of `name` executes guest code right now."""
        return [h for h, a in self.agents.items()
                if name in a.vms and a.vms[name].state is AgentVmState.RUNNING]


async def web1_on_host1(tmp_path: Path) -> FakeCluster:
    """The usual start: hosts host1 and host2, VM web1 running on host1."""
    c = await FakeCluster.open(tmp_path, {"host1": facts("host1"), "host2": facts("host2")})
    await c.add_running_vm(spec("web1"), "host1")
    return c


async def until_phase(cluster: FakeCluster, migration_id: str, phase: Phase) -> None:
    """Let the migration run until the store shows it in `phase`."""
    for _ in range(10_000):
        if (await cluster.store.migration(migration_id)).phase is phase:
            return
        await cluster.orchestrator.wait(migration_id, 0.005)
    raise AssertionError(f"migration {migration_id} never reached {phase}")


def unreachable(host: str) -> HostUnavailable:
    return HostUnavailable(f"agent of host {host} is unreachable: ReadTimeout")


def now() -> float:
    return time.time()
