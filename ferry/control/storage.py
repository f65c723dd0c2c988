"""Storage vMotion: move a running VM's disk to another datastore on the same host.

Walks domain/storage.py's state machine, persisting each phase before acting, like the
migration orchestrator; resumed after a restart. The source image is deleted only after
the pivot succeeded and the store points at the copy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from ferry.agent.client import AgentClient
from ferry.control import eventlog
from ferry.control.agents import AgentPool
from ferry.control.events import ChangeBus
from ferry.control.jobs import JobRunner
from ferry.domain.errors import (
    Conflict,
    FerryError,
    HostUnavailable,
    Incompatible,
    InvalidInput,
    NotFound,
)
from ferry.domain.inventory import VmState
from ferry.domain.specs import DiskFormat, DiskSpec, Provisioning, VmSpec
from ferry.domain.storage import (
    DEFAULT_COPY_PROGRESS_TIMEOUT_S,
    CopyWatch,
    RelocationPhase,
    RelocationRecord,
    check_relocation,
    relocation_transition,
)
from ferry.store import Store

log = logging.getLogger("ferry.storage")
# The agent answers a progress query at once when the copy is in sync, else after this
# long: progress is shown every second and the pivot starts without a poll's delay.
PROGRESS_WAIT_S = 1.0
PIVOT_DOUBT_S = 600.0  # how long an unanswered pivot is asked about before giving up
PIVOT_RETRY_S = 2.0
COPY_TIMEOUT_S = 6 * 3600.0


class RollBack(Exception):
    pass


def job_id(rec: RelocationRecord) -> str:
    """QEMU wants job ids to start with a letter; ours are hex."""
    return f"mv-{rec.id}"


class Relocator:
    def __init__(self, store: Store, agents: AgentPool, bus: ChangeBus) -> None:
        self.store = store
        self.agents = agents
        self.bus = bus
        self._jobs = JobRunner("relocation")

    async def start(self, vm_name: str, datastore: str, *, disk: str | None = None,
                    fmt: DiskFormat | None = None, provisioning: Provisioning | None = None,
                    path: str | None = None, keep_source: bool = False,
                    speed_bytes_s: int = 0,
                    progress_timeout_s: int = DEFAULT_COPY_PROGRESS_TIMEOUT_S
                    ) -> RelocationRecord:
        vm = await self.store.vm(vm_name)
        if vm.state is not VmState.RUNNING:
            raise Conflict(f"VM {vm_name} is {vm.state}; a live disk move needs it running",
                           f"start it with `ferry vm start {vm_name}`")
        if any(m.vm == vm_name for m in await self.store.migrations(unfinished_only=True)):
            raise Conflict(f"VM {vm_name} is being migrated", "wait for the migration first")
        current = self._pick_disk(vm.spec.disks, disk, vm_name)
        fmt = fmt or current.format
        try:
            target = DiskSpec(name=current.name, datastore=datastore,
                              path=path or f"{vm_name}/{current.name}.{fmt.value}",
                              format=fmt, provisioning=provisioning or current.provisioning,
                              cache=current.cache)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        now = time.time()
        rec = await self.store.add_relocation(RelocationRecord(
            id=uuid.uuid4().hex[:12], vm=vm_name, host=vm.host, disk=current.name,
            source=current, target=target, phase=RelocationPhase.PENDING,
            keep_source=keep_source, speed_bytes_s=speed_bytes_s, created_at=now,
            phase_times={"pending": now}, progress_timeout_s=progress_timeout_s))
        await eventlog.relocation_started(self.store, rec)
        rec = await self._enter(rec, RelocationPhase.CHECKING)
        try:
            reasons = await self._check(rec)
        except FerryError as exc:
            reasons = [exc.problem]
        if reasons:
            rec = await self._enter(rec, RelocationPhase.ROLLING_BACK, reason="; ".join(reasons))
            await self._enter(rec, RelocationPhase.FAILED)
            raise Incompatible(f"cannot move disk {current.name} of {vm_name}: "
                               + "; ".join(reasons))
        self._spawn(rec.id)
        return rec

    @staticmethod
    def _pick_disk(disks: tuple[DiskSpec, ...], name: str | None, vm: str) -> DiskSpec:
        if name is None:
            if len(disks) != 1:
                raise InvalidInput(f"VM {vm} has {len(disks)} disks; say which with --disk",
                                   f"its disks: {', '.join(d.name for d in disks) or 'none'}")
            return disks[0]
        found = next((d for d in disks if d.name == name), None)
        if found is None:
            raise NotFound(f"VM {vm} has no disk {name!r}",
                           f"its disks: {', '.join(d.name for d in disks) or 'none'}")
        return found

    async def _agent(self, rec: RelocationRecord) -> AgentClient:
        return self.agents.client(await self.store.host(rec.host))

    async def _check(self, rec: RelocationRecord) -> list[str]:
        host = await self.store.host(rec.host)
        agent = self.agents.client(host)
        image = await agent.image(rec.source)
        if image is None:
            return [f"the image of disk {rec.disk} ({rec.source.datastore}:{rec.source.path}) "
                    f"is missing on {rec.host}"]
        facts = (await agent.facts())
        exists = await agent.image(rec.target) is not None \
            if facts.datastore(rec.target.datastore) else False
        return check_relocation(rec.source, rec.target, image,
                                facts.datastore(rec.target.datastore), exists)

    async def cancel(self, relocation_id: str) -> RelocationRecord:
        rec = await self.store.relocation(relocation_id)
        if rec.phase.terminal:
            raise Conflict(f"relocation {relocation_id} already ended ({rec.phase})")
        if rec.phase is RelocationPhase.PIVOTING:
            raise Conflict(f"relocation {relocation_id} is pivoting; too late to cancel")
        self._jobs.request_cancel(relocation_id)
        return rec

    async def resume_unfinished(self) -> None:
        for rec in await self.store.relocations(unfinished_only=True):
            self._spawn(rec.id)

    async def shutdown(self) -> None:
        await self._jobs.shutdown()

    def _spawn(self, relocation_id: str) -> None:
        self._jobs.start(relocation_id, lambda: self._run(relocation_id))

    async def _enter(self, rec: RelocationRecord, phase: RelocationPhase, **changes: object
                     ) -> RelocationRecord:
        relocation_transition(rec.phase, phase)
        times = dict(rec.phase_times)
        times[phase.value] = time.time()
        rec = await self.store.update_relocation(rec.id, phase=phase, phase_times=times,
                                                 **changes)
        log.info("relocation %s of %s/%s: %s", rec.id, rec.vm, rec.disk, phase)
        if phase.terminal:
            await eventlog.relocation_ended(self.store, rec)
        await self.bus.changed(rec.id)
        return rec

    async def _run(self, relocation_id: str) -> None:
        rec = await self.store.relocation(relocation_id)
        try:
            if rec.phase in (RelocationPhase.PENDING, RelocationPhase.ROLLING_BACK):
                raise RollBack(rec.reason or "control plane restarted before the copy began")
            agent = await self._agent(rec)
            if rec.phase is RelocationPhase.CHECKING:
                rec = await self._enter(rec, RelocationPhase.COPYING)
            if rec.phase is RelocationPhase.COPYING:
                rec = await self._copy(rec, agent)
            if rec.phase is RelocationPhase.PIVOTING:
                await self._pivot(rec, agent)
        except asyncio.CancelledError:
            raise
        except RollBack as exc:
            await self._roll_back(rec.id, str(exc))
        except HostUnavailable as exc:
            if (await self.store.relocation(relocation_id)).phase is RelocationPhase.PIVOTING:
                # The pivot may have happened: learn which image QEMU uses before acting.
                await self._settle_pivot(relocation_id, exc.problem)
            else:
                await self._roll_back(rec.id, exc.problem)
        except FerryError as exc:
            await self._roll_back(rec.id, exc.problem)
        except Exception as exc:
            log.exception("relocation %s crashed", relocation_id)
            await self._roll_back(rec.id, f"internal error: {exc!r}")

    async def _copy(self, rec: RelocationRecord, agent: AgentClient) -> RelocationRecord:
        began = time.monotonic()
        watch = CopyWatch()
        await agent.start_mirror(rec.vm, job_id(rec), rec.target, rec.speed_bytes_s)
        while True:
            if self._jobs.cancel_flag(rec.id).is_set():
                raise RollBack("cancelled by the user")
            state = await agent.mirror(rec.vm, job_id(rec), wait_s=PROGRESS_WAIT_S)
            if state.stopped:
                raise RollBack(f"the copy stopped: {state.error or state.status}")
            elapsed = max(time.monotonic() - began, 1e-3)
            rec = await self.store.update_relocation(
                rec.id, copied_bytes=state.offset, total_bytes=state.length,
                rate_bytes_s=state.offset / elapsed)
            await self.bus.changed(rec.id)
            if state.ready:
                return await self._enter(rec, RelocationPhase.PIVOTING)
            left = max(state.length - state.offset, 0)
            watch = watch.observe(elapsed, left)
            if watch.stalled(elapsed, rec.progress_timeout_s):
                raise RollBack(
                    f"the copy has not gained on the guest's writes for "
                    f"{rec.progress_timeout_s} s ({left >> 20} MiB behind); retry with a "
                    "higher bandwidth cap, or when the guest writes less")
            if elapsed > COPY_TIMEOUT_S:
                raise RollBack(f"the copy did not get in sync within {COPY_TIMEOUT_S:.0f} s")

    async def _pivot(self, rec: RelocationRecord, agent: AgentClient,
                     switched: bool = False) -> None:
        """Switch the guest to the copy (unless QEMU already uses it) and record that."""
        if not switched:
            live = await agent.vm(rec.vm)
            switched = any((d.datastore, d.path) == (rec.target.datastore, rec.target.path)
                           for d in live.spec.disks)
        if not switched:
            await agent.pivot(rec.vm, job_id(rec), rec.target)
        vm = await self.store.vm(rec.vm)
        disks = [rec.target if d.name == rec.disk else d for d in vm.spec.disks]
        await self.store.update_vm(rec.vm, spec=VmSpec.model_validate(
            vm.spec.model_dump() | {"disks": [d.model_dump() for d in disks]}))
        note = None
        if not rec.keep_source:
            try:
                await agent.delete_image(rec.source)
            except FerryError as exc:
                note = f"moved, but the old image could not be removed: {exc.problem}"
        await self._enter(rec, RelocationPhase.COMPLETED, reason=note)

    async def _settle_pivot(self, relocation_id: str, problem: str) -> None:
        """The agent stopped answering while pivoting. The store must follow the image
        QEMU really uses: ask until it can be told (bounded), then finish or roll back;
        if it never can, the VM is marked unknown so that it is not cold-booted from an
        image that may lack the guest's latest writes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PIVOT_DOUBT_S
        gone = False
        while loop.time() < deadline:
            rec = await self.store.relocation(relocation_id)
            uses = await self._uses_target(rec)
            if uses is True:
                await self._pivot(rec, await self._agent(rec), switched=True)
                return
            if uses is False:
                await self._roll_back(relocation_id, problem)
                return
            if await self._qemu_gone(rec):
                gone = True  # nobody can say any more: no point in asking on
                break
            await asyncio.sleep(PIVOT_RETRY_S)
        rec = await self.store.relocation(relocation_id)
        await self.store.update_vm(rec.vm, state=VmState.UNKNOWN)
        rec = await self._enter(rec, RelocationPhase.ROLLING_BACK, reason=problem)
        why = "its QEMU is gone" if gone else "QEMU could not be asked"
        await self._enter(rec, RelocationPhase.FAILED, reason=(
            f"{problem}; {why}: cannot tell whether disk {rec.disk} last used "
            f"{rec.target.datastore}:{rec.target.path} or the old image, so VM {rec.vm} is "
            "marked unknown (not started from a possibly stale image) and both images are "
            "kept"))

    async def _uses_target(self, rec: RelocationRecord) -> bool | None:
        """Whether QEMU itself (query-block) uses the copy; None when it cannot be told."""
        try:
            agent = await self._agent(rec)
            files = await agent.disk_files(rec.vm)
            host = await self.store.host((await self.store.vm(rec.vm)).host)
        except FerryError:
            return None
        store = host.facts.datastore(rec.target.datastore) if host.facts else None
        if store is None or rec.disk not in files:
            return None
        return _same_path(files[rec.disk], store.path, rec.target.path)

    async def _roll_back(self, relocation_id: str, reason: str) -> None:
        rec = await self.store.relocation(relocation_id)
        if rec.phase.terminal:
            return
        if rec.phase is RelocationPhase.PIVOTING and await self._runs_on_target(rec):
            # The guest already writes to the copy: finishing is the only safe outcome.
            await self._pivot(rec, await self._agent(rec), switched=True)
            return
        if rec.phase is not RelocationPhase.ROLLING_BACK:
            rec = await self._enter(rec, RelocationPhase.ROLLING_BACK, reason=reason)
        try:
            await (await self._agent(rec)).cancel_mirror(rec.vm, job_id(rec), rec.target)
        except FerryError as exc:
            reason = f"{reason}; cleanup incomplete: {exc.problem}"
        if await self._qemu_gone(rec):
            await self.store.update_vm(rec.vm, state=VmState.CRASHED)
            reason = f"{reason}; the VM's QEMU is gone, so VM {rec.vm} is not running"
        await self._enter(rec, RelocationPhase.FAILED, reason=reason)

    async def _qemu_gone(self, rec: RelocationRecord) -> bool:
        """The VM's agent says its QEMU exited (or knows none); False when it cannot
        be asked (then the reconciler settles it once the agent answers)."""
        try:
            live = await (await self._agent(rec)).vm(rec.vm)
        except NotFound:
            return True
        except FerryError:
            return False
        return not live.state.alive

    async def _runs_on_target(self, rec: RelocationRecord) -> bool:
        """QEMU writes to the copy (as query-block says; the agent's spec may lag)."""
        if await self._uses_target(rec):
            return True
        try:
            live = await (await self._agent(rec)).vm(rec.vm)
        except FerryError:
            return False
        return any((d.datastore, d.path) == (rec.target.datastore, rec.target.path)
                   for d in live.spec.disks)


def _same_path(reported: str, root: str, relative: str) -> bool:
    """Whether the file QEMU reports is `relative` inside datastore `root` (both as the
    host names them; string work only, the control plane cannot see that filesystem)."""
    return os.path.normpath(reported) == os.path.normpath(os.path.join(root, relative))
