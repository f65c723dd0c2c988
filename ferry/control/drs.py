"""DRS: the cluster snapshot the pure planner (ferry/domain/drs.py) needs, applying its
plans as ordinary live migrations (each recorded with its reason), maintenance mode by
evacuation, and the loop of a fully automated cluster.

The planner decides; this module only gathers facts and acts. Moves run through the
orchestrator's queue, so the per-host and per-cluster limits hold for them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ferry.control import eventlog
from ferry.control.demand import Demand
from ferry.control.inventory import Inventory
from ferry.control.migration import Orchestrator
from ferry.domain.drs import (
    ClusterSnapshot,
    DrsHost,
    DrsSettings,
    DrsVm,
    Move,
    Plan,
    Rule,
    evacuate,
    place_initial,
    plan,
)
from ferry.domain.drs_config import Automation, DrsConfig
from ferry.domain.errors import Conflict, FerryError, InvalidInput, NoCapacity
from ferry.domain.inventory import HostState, VmState
from ferry.domain.migration import Phase
from ferry.domain.records import HostRecord, MigrationRecord
from ferry.domain.specs import Frozen, VmSpec
from ferry.store import Store

log = logging.getLogger("ferry.drs")
MIB = 1 << 20
DEPENDENCY_TIMEOUT_S = 3600.0


class MoveResult(Frozen):
    move: Move
    migration_id: str | None = None
    error: str | None = None
    # Started later, once the moves it depends on (that free its room) have completed.
    deferred: bool = False


class Applied(Frozen):
    plan: Plan
    results: tuple[MoveResult, ...]


class MaintenanceResult(Frozen):
    host: HostRecord
    evacuation: Applied | None = None  # None when leaving maintenance


class Drs:
    def __init__(self, store: Store, inventory: Inventory, migrations: Orchestrator,
                 demand: Demand) -> None:
        self.store = store
        self.inventory = inventory
        self.migrations = migrations
        self.demand = demand
        self._loop: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()  # one plan applied at a time
        self._deferred: set[asyncio.Task[None]] = set()
        # DPM's round, run after each DRS round of a fully automated cluster (set by the
        # control plane; DPM needs DRS, not the other way round).
        self.dpm_round: Callable[[DrsConfig], Awaitable[object]] | None = None

    # --- settings ------------------------------------------------------------------
    async def config(self) -> DrsConfig:
        return await self.store.drs.config()

    async def set_config(self, config: DrsConfig) -> DrsConfig:
        config = await self.store.drs.set_config(config)
        await self.migrations.set_limits(config.per_host_limit, config.cluster_limit)
        return config

    # --- the snapshot ----------------------------------------------------------------
    async def snapshot(self) -> ClusterSnapshot:
        hosts = await self.store.hosts()
        vms = await self.store.vms()
        history = await self.store.migrations()
        unfinished = [m for m in history if not m.phase.terminal]
        busy = self.inventory.busy.names() | {m.vm for m in unfinished}
        memory = {vm.spec.name: vm.spec.memory_mib for vm in vms}
        incoming: dict[str, int] = {}
        for m in unfinished:
            incoming[m.target] = incoming.get(m.target, 0) + memory.get(m.vm, 0)
        return ClusterSnapshot(
            hosts=tuple(_host(h) for h in hosts if h.facts is not None),
            vms=tuple(
                DrsVm(name=vm.spec.name, host=vm.host, memory_mib=vm.spec.memory_mib,
                      vcpus=vm.spec.vcpus, cpu_demand=self._cpu(vm.spec),
                      mem_demand_mib=vm.spec.memory_mib,
                      dirty_rate_mib_s=_dirty_rate(vm.spec.name, history),
                      last_moved_at=_last_moved(vm.spec.name, history),
                      movable=vm.state is VmState.RUNNING and vm.spec.name not in busy)
                for vm in vms if vm.state in (VmState.RUNNING, VmState.MIGRATING)),
            rules=tuple(await self.store.drs.rules()),
            incoming_mib=incoming)

    def _cpu(self, spec: VmSpec) -> float:
        measured = self.demand.cores(spec.name)
        # Before a minute of samples: assume half its vCPUs busy rather than none, so a
        # just-started VM is not taken for idle room.
        return measured if measured is not None else spec.vcpus * 0.5

    async def settings(self) -> DrsSettings:
        config = await self.config()
        return DrsSettings(threshold=config.threshold, cooldown_s=config.cooldown_s,
                           now=time.time())

    # --- plans -------------------------------------------------------------------------
    async def plan(self) -> Plan:
        return plan(await self.snapshot(), await self.settings())

    async def apply(self) -> Applied:
        """Plan now and start every move (each a live migration with its reason)."""
        async with self._apply_lock:
            current = await self.plan()
            return Applied(plan=current, results=await self._start(current, "DRS"))

    async def _start(self, current: Plan, why: str) -> tuple[MoveResult, ...]:
        """Start every move that can start now (in parallel, within the queue's limits);
        one that needs room another move frees starts once that one has completed."""
        results: list[MoveResult] = []
        started: dict[int, str] = {}
        later: list[int] = []
        for index, move in enumerate(current.moves):
            if move.depends_on:
                later.append(index)
                results.append(MoveResult(move=move, deferred=True))
                continue
            result = await self._start_one(move, why)
            if result.migration_id:
                started[index] = result.migration_id
            results.append(result)
        if later:
            task = asyncio.create_task(self._start_later(current, later, started, why))
            self._deferred.add(task)
            task.add_done_callback(self._deferred.discard)
        return tuple(results)

    async def _start_one(self, move: Move, why: str) -> MoveResult:
        try:
            rec = await self.migrations.start(move.vm, move.target,
                                              cause=f"{why}: {move.reason}")
            await eventlog.drs_move(self.store, move.vm, move.source, move.target,
                                    f"{why}: {move.reason}", rec.id)
            return MoveResult(move=move, migration_id=rec.id)
        except FerryError as exc:
            # One refused move (the VM stopped, the target changed) does not stop the
            # others: the next plan sees the new state.
            return MoveResult(move=move, error=exc.problem)

    async def _start_later(self, current: Plan, later: list[int], started: dict[int, str],
                           why: str) -> None:
        deadline = time.monotonic() + DEPENDENCY_TIMEOUT_S
        for index in later:
            move = current.moves[index]
            while True:
                phases = [await self._phase(started.get(d)) for d in move.depends_on]
                if all(p is Phase.COMPLETED for p in phases):
                    result = await self._start_one(move, why)
                    if result.migration_id:
                        started[index] = result.migration_id
                    else:
                        log.info("DRS deferred move of %s refused: %s", move.vm,
                                 result.error)
                    break
                if any(p in (Phase.FAILED, None) for p in phases) or (
                        time.monotonic() > deadline):
                    log.info("DRS deferred move of %s dropped: a move it needed did not "
                             "complete", move.vm)
                    break
                await asyncio.sleep(1.0)

    async def _phase(self, migration_id: str | None) -> Phase | None:
        return (await self.store.migration(migration_id)).phase if migration_id else None

    async def initial_host(self, spec: VmSpec) -> str | None:
        """Where DRS places a new VM (partially or fully automated); None when manual."""
        config = await self.config()
        if config.automation is Automation.MANUAL:
            return None
        vm = DrsVm(name=spec.name, host="", memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                   cpu_demand=spec.vcpus * 0.5, mem_demand_mib=spec.memory_mib)
        host, why = place_initial(await self.snapshot(), vm, await self.settings())
        if host is None:
            raise NoCapacity(f"DRS finds no host for VM {spec.name}: {why}",
                             "free memory, add a host, or relax the VM's rules")
        return host

    # --- maintenance ---------------------------------------------------------------------
    async def enter_maintenance(self, host: str) -> MaintenanceResult:
        """Evacuate `host` by live migration, spread by the planner, in parallel within
        the limits; refused (nothing changed) when the others have no room."""
        await self.store.host(host)  # NotFound names the known hosts
        async with self._apply_lock:
            evacuation = evacuate(await self.snapshot(), host, await self.settings())
            if evacuation.unplaced:
                raise NoCapacity(f"host {host} cannot be evacuated: "
                                 + "; ".join(evacuation.unplaced),
                                 "free memory on the other hosts, add a host, or stop "
                                 "those VMs first")
            record = await self.store.set_maintenance(host, True)
            results = await self._start(evacuation, f"maintenance of {host}")
        return MaintenanceResult(host=record,
                                 evacuation=Applied(plan=evacuation, results=results))

    async def exit_maintenance(self, host: str) -> MaintenanceResult:
        return MaintenanceResult(host=await self.store.set_maintenance(host, False))

    # --- rules ---------------------------------------------------------------------
    async def add_rule(self, rule: Rule) -> Rule:
        """A rule over VMs and hosts that exist; a must-rule that no placement can
        satisfy with the others is refused, naming the conflict."""
        vms = {vm.spec.name for vm in await self.store.vms()}
        hosts = {h.name for h in await self.store.hosts()}
        missing = [v for v in rule.vms if v not in vms]
        if missing:
            raise InvalidInput(f"rule {rule.name}: no VM {', '.join(missing)}",
                               "name VMs of `ferry vm list`")
        unknown = [h for h in rule.hosts if h not in hosts]
        if unknown:
            raise InvalidInput(f"rule {rule.name}: no host {', '.join(unknown)}",
                               "name hosts of `ferry host list`")
        snapshot = await self.snapshot()
        trial = plan(snapshot.model_copy(update={"rules": (*snapshot.rules, rule)}),
                     await self.settings())
        if trial.conflicts:
            raise Conflict(f"rule {rule.name} conflicts: {'; '.join(trial.conflicts)}",
                           "remove or change the conflicting rule first")
        return await self.store.drs.add_rule(rule)

    # --- the loop of a fully automated cluster -------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def close(self) -> None:
        for task in list(self._deferred):
            task.cancel()
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def _run(self) -> None:
        while True:
            await asyncio.sleep((await self.config()).interval_s)
            config = await self.config()  # as set now, not before the sleep
            if config.automation is not Automation.FULL:
                continue
            try:
                applied = await self.apply()
                for result in applied.results:
                    log.info("DRS move %s %s -> %s: %s (%s)", result.move.vm,
                             result.move.source, result.move.target, result.move.reason,
                             result.migration_id or result.error)
                if config.dpm and self.dpm_round is not None:
                    await self.dpm_round(config)
            except Exception:  # a failed round is retried next interval; never stop
                log.exception("DRS round failed")


def _host(h: HostRecord) -> DrsHost:
    assert h.facts is not None
    return DrsHost(name=h.name, cpus=h.facts.cpus, memory_mib=h.facts.memory_mib,
                   available=h.state in (HostState.CONNECTED, HostState.MAINTENANCE),
                   maintenance=h.maintenance)


def _completed(vm: str, history: list[MigrationRecord]) -> list[MigrationRecord]:
    return [m for m in history if m.vm == vm and m.phase is Phase.COMPLETED]


def _dirty_rate(vm: str, history: list[MigrationRecord]) -> float:
    """MiB/s the VM dirtied in its latest migration (learnt from Ferry's own records)."""
    done = _completed(vm, history)
    if not done or not done[-1].iterations:
        return 0.0
    return max(i.dirty_rate_bytes_s for i in done[-1].iterations) / MIB


def _last_moved(vm: str, history: list[MigrationRecord]) -> float | None:
    done = _completed(vm, history)
    return done[-1].phase_times.get(Phase.COMPLETED.value) if done else None
