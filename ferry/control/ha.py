"""HA on the control plane: host health from two heartbeats, restarts of the protected VMs
of failed hosts, and admission control (rules: ferry/domain/ha.py).

Every second (when HA is enabled) the loop judges each host on the control plane's own
monotonic clock: when its agent's heartbeat last arrived here, and when the counter of its
datastore heartbeat last changed in what the *other* agents report. VMs of a dead host,
and of an isolated host once their leases are released, are restarted one at a time by
priority on a host chosen by DRS's placement (must-rules honoured). The restart is an
ordinary start on the target agent that first acquires the VM's lease, waiting until that
agent has itself seen the lease expire: the control plane's verdict alone never makes a
second copy. With power fencing on (the default), a dead host that has a power driver is
powered off first; once the driver confirms it off, the targets take the leases at once
(nothing of the host can run, so there is nothing to wait for). A restart that fails (no
room, lease still held, agent error) is retried with backoff. A VM that a connected agent
already reports running (a restart a previous leader began before it died) is recorded
there, not started again. Each step is an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from ferry.agent.models import AgentVmState, DatastoreView
from ferry.control import eventlog
from ferry.control.agents import AgentPool
from ferry.control.drs import Drs
from ferry.control.inventory import Inventory
from ferry.domain.audit import Outcome
from ferry.domain.drs import DrsVm, place_initial
from ferry.domain.errors import FerryError, NoCapacity
from ferry.domain.events import EventKind
from ferry.domain.ha import (
    HaDirective,
    HaSettings,
    Health,
    Priority,
    Protected,
    Reserve,
    backoff,
    health,
    reserve,
    restart_order,
)
from ferry.domain.inventory import HostState, VmState
from ferry.domain.leases import LeaseTiming
from ferry.domain.specs import Frozen, VmSpec
from ferry.power import PowerDriver, PowerError, PowerState
from ferry.store import Store

log = logging.getLogger("ferry.ha")
ROUND_S = 1.0
# How long a target agent may wait to see a lease expire: the agents' expire_s, twice.
LEASE_WAIT_S = 2 * LeaseTiming().expire_s
_PLACED = (VmState.RUNNING, VmState.PAUSED, VmState.MIGRATING)
FENCE_TIMEOUT_S = 20.0  # power off and read back (ipmitool's own timeouts are shorter)
PowerFor = Callable[[str], Awaitable[PowerDriver]]  # host -> its driver (FerryError: none)


class HaStatus(Frozen):
    settings: HaSettings
    reserve: Reserve
    hosts: dict[str, Health]
    priorities: dict[str, Priority]


class Ha:
    def __init__(self, store: Store, inventory: Inventory, drs: Drs, agents: AgentPool,
                 clock: Callable[[], float] = time.monotonic,
                 power: PowerFor | None = None) -> None:
        self.clock = clock  # the control plane's own monotonic clock (tests script it)
        self.power = power
        self.store = store
        self.inventory = inventory
        self.drs = drs
        self.agents = agents
        self._started = clock()
        self._beat: dict[str, float] = {}  # host → when its heartbeat last arrived
        # (reporter, host) → the counter last reported; host → when it last changed
        self._counters: dict[tuple[str, str], int] = {}
        self._changed: dict[str, float] = {}
        self._views: dict[str, DatastoreView] = {}  # reporter → its latest view
        self._health: dict[str, Health] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # vm → (failures, next try)
        # Dead hosts whose power fencing was tried in this episode of death, and those
        # whose driver confirmed them off (both forgotten once the host is heard again).
        self._fence_tried: set[str] = set()
        self._fenced: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # --- heartbeats -------------------------------------------------------------------
    async def on_heartbeat(self, host: str, view: DatastoreView | None) -> HaDirective:
        now = self.clock()
        self._beat[host] = now
        if view is not None and view.ok:
            self._views[host] = view
            for other, counter in view.hosts.items():
                if other != host and self._counters.get((host, other)) != counter:
                    self._counters[(host, other)] = counter
                    self._changed[other] = now
        s = await self.store.ha.settings()
        return HaDirective(enabled=s.enabled, isolation_response=s.isolation_response,
                           isolation_s=s.isolation_s)

    def health(self, hosts: list[str], settings: HaSettings) -> dict[str, Health]:
        now = self.clock()
        # Silent "since the control plane started" when never heard: a restarted
        # control plane does not take every host for dead.
        return {h: health(now, self._beat.get(h, self._started),
                          self._changed.get(h), settings) for h in hosts}

    def _lease_free(self, vm: str, host: str) -> bool:
        """Some other, connected agent reports the VM's lease released or moved."""
        for reporter, view in self._views.items():
            if reporter == host or self._health.get(reporter) is not Health.CONNECTED:
                continue
            lease = view.leases.get(vm)
            if lease is not None and (lease.released or lease.owner != host):
                return True
        return False

    # --- settings ---------------------------------------------------------------------
    async def set_settings(self, settings: HaSettings, actor: str) -> HaSettings:
        await self.store.ha.set_settings(settings)
        await self._event("settings", "cluster", Outcome.OK, settings.model_dump_json(),
                          actor)
        return settings

    async def set_priority(self, vm: str, priority: Priority, actor: str) -> Priority:
        await self.store.vm(vm)  # NotFound names the VMs
        await self.store.ha.set_priority(vm, priority)
        await self._event("priority", vm, Outcome.OK, priority.value, actor)
        return priority

    async def status(self) -> HaStatus:
        settings = await self.store.ha.settings()
        hosts = await self.store.hosts()
        return HaStatus(settings=settings, reserve=await self._reserve(settings, None, None),
                        hosts=self.health([h.name for h in hosts if not h.standby],
                                          settings),
                        priorities=await self.store.ha.priorities())

    # --- admission control --------------------------------------------------------------
    async def _reserve(self, settings: HaSettings, spec: VmSpec | None, host: str | None
                       ) -> Reserve:
        hosts = {h.name: h.memory_mib for h in await self.store.hosts()
                 if h.facts is not None and not h.standby and not h.maintenance}
        priorities = await self.store.ha.priorities()
        vms = [Protected(name=v.name, host=v.host, memory_mib=v.spec.memory_mib,
                         priority=priorities.get(v.name, Priority.MEDIUM))
               for v in await self.store.vms() if v.state in _PLACED
               and (spec is None or v.name != spec.name)]
        if spec is not None:
            if host is None or host not in hosts:  # not placed yet: where most is free
                used = {h: sum(v.memory_mib for v in vms if v.host == h) for h in hosts}
                host = max(hosts, key=lambda h: (hosts[h] - used[h], h), default="")
            vms.append(Protected(name=spec.name, host=host, memory_mib=spec.memory_mib,
                                 priority=priorities.get(spec.name, Priority.MEDIUM)))
        return reserve(hosts, vms, settings.host_failures_to_tolerate)

    async def admit(self, spec: VmSpec, host: str | None) -> None:
        """Refuse a power-on that would leave too little room to restart every protected
        VM after host_failures_to_tolerate failures (only with HA enabled)."""
        settings = await self.store.ha.settings()
        if not settings.enabled:
            return
        found = await self._reserve(settings, spec, host)
        if found.ok:
            return
        n = settings.host_failures_to_tolerate
        await self._event("admission", spec.name, Outcome.REFUSED, found.reason)
        raise NoCapacity(
            f"HA admission control: powering on VM {spec.name} ({spec.memory_mib} MiB) would "
            f"leave the cluster unable to restart every protected VM after {n} host "
            f"failure(s): {found.reason}",
            "add a host or memory, stop or shrink a VM, set a VM's HA priority to disabled "
            "(`ferry vm ha VM --priority disabled`), or tolerate fewer failures "
            "(`ferry cluster ha --failures N`)")

    # --- the loop -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ha")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(ROUND_S)
            lag = time.monotonic() - before
            if lag > 3 * ROUND_S:
                # This process itself stalled: the heartbeats that arrived meanwhile are
                # not processed yet, so every host would look silent. Judge next round.
                log.warning("HA round %.1f s late: not judging hosts this round", lag)
                continue
            try:
                await self.round()
            except Exception:  # judged again next second; never stop
                log.exception("HA round failed")

    async def round(self) -> list[str]:
        """Judge the hosts once and restart what is due; returns the VMs restarted."""
        settings = await self.store.ha.settings()
        hosts = [h for h in await self.store.hosts() if h.state is not HostState.STANDBY]
        judged = self.health([h.name for h in hosts], settings)
        for host, now in judged.items():
            before = self._health.get(host, Health.CONNECTED)
            if now is not before and settings.enabled:
                await self._event("host " + now.value, host, Outcome.OK,
                                  f"was {before.value}; network heartbeat and datastore "
                                  "heartbeat as seen by the other hosts")
        self._health = judged
        for host, now in judged.items():
            if now is not Health.DEAD:
                self._fence_tried.discard(host)
                self._fenced.discard(host)
        if not settings.enabled:
            return []
        priorities = await self.store.ha.priorities()
        # A migration owns its VM until it ends (after the switch the VM is recorded
        # running on the target while the job still decides; its end settles the VM).
        failed = any(h in (Health.DEAD, Health.ISOLATED) for h in judged.values())
        migrating = ({m.vm for m in await self.store.migrations(unfinished_only=True)}
                     if failed else set())
        due = []
        for vm in await self.store.vms():
            if vm.state not in (VmState.RUNNING, VmState.PAUSED) or vm.name in migrating:
                continue  # a migration or a VM in doubt is not HA's to move
            state = judged.get(vm.host)
            if state is Health.DEAD or (state is Health.ISOLATED
                                        and self._lease_free(vm.name, vm.host)):
                due.append(Protected(name=vm.name, host=vm.host,
                                     memory_mib=vm.spec.memory_mib,
                                     priority=priorities.get(vm.name, Priority.MEDIUM)))
        restarted: list[str] = []
        ready = [p for p in restart_order(due)  # disabled ones are left out: stay down
                 if self.clock() >= self._failures.get(p.name, (0, 0.0))[1]]
        for p in list(ready):
            if await self._adopt(p):
                ready.remove(p)
                restarted.append(p.name)
        if settings.power_fencing and _may_fence(judged):
            for host in sorted({p.host for p in ready if judged[p.host] is Health.DEAD}
                               - self._fence_tried):
                self._fence_tried.add(host)
                await self._power_fence(host)
        # One priority at a time, in order; within one, placed one after the other (each
        # placement sees the previous ones) and started together, so that the agents'
        # lease waits and confirmations overlap.
        for rank in sorted({p.priority.rank for p in ready}):
            tier = [p for p in ready if p.priority.rank == rank]
            placed = await self._place(tier, judged)
            results = await asyncio.gather(*(self._start(p, target, judged)
                                             for p, target in placed))
            for (p, _), ok in zip(placed, results, strict=True):
                if ok:
                    restarted.append(p.name)
                    self._failures.pop(p.name, None)
                else:
                    self._failed(p, settings)
            for p in tier:
                if p not in (q for q, _ in placed):
                    self._failed(p, settings)
        return restarted

    async def _power_fence(self, host: str) -> None:
        """Power the dead host off through its driver and read its state back: only an
        OFF the driver reports lets its VMs' leases be taken before they expire."""
        if self.power is None:
            return
        try:
            driver = await self.power(host)
        except FerryError:
            await self._event("host fencing", host, Outcome.OK, "not fenced: no power "
                              "driver; its VMs restart once their leases expire")
            return
        try:
            async with asyncio.timeout(FENCE_TIMEOUT_S):
                await driver.power_off()
                state = await driver.status()
        except (PowerError, TimeoutError) as exc:
            why = exc.problem if isinstance(exc, PowerError) else \
                f"no answer within {FENCE_TIMEOUT_S:.0f} s"
            await self._event("host fencing", host, Outcome.FAILED,
                              f"power off failed ({why}): its VMs restart once their "
                              "leases expire")
            return
        if state is not PowerState.OFF:
            await self._event("host fencing", host, Outcome.FAILED,
                              f"powered off, but the driver reads the host {state.value}: "
                              "its VMs restart once their leases expire")
            return
        self._fenced.add(host)
        await self._event("host fenced", host, Outcome.OK,
                          "powered off by its power driver and confirmed off: its VMs' "
                          "leases are taken at once")
        log.warning("HA: host %s fenced (powered off, confirmed)", host)

    async def _adopt(self, p: Protected) -> bool:
        """A restart begun by a leader that died before recording it: a connected agent
        reports the copy running (so it holds the lease there). Recorded where it runs,
        never started twice."""
        found = self._running_on(p.name, p.host)
        if found is None:
            return False
        with self.inventory.busy.hold(p.name):
            vm = await self.store.vm(p.name)
            if vm.host != p.host or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                return False
            await self.store.update_vm(p.name, host=found, state=VmState.RUNNING)
        self._failures.pop(p.name, None)
        await self._event("vm restarted", p.name, Outcome.OK,
                          f"found running on {found} (was on {p.host}, which is "
                          f"{self._health[p.host].value}): a restart begun before the "
                          "control plane changed leader", kind=EventKind.HA_RESTART)
        return True

    def _running_on(self, vm: str, home: str) -> str | None:
        """A connected host, other than `home`, whose agent reports the VM running."""
        for host, vms in self.agents.reported.items():
            info = vms.get(vm)
            if host != home and info is not None and info.state is AgentVmState.RUNNING \
                    and self._health.get(host) is Health.CONNECTED:
                return host
        return None

    def _failed(self, p: Protected, settings: HaSettings) -> None:
        failures = self._failures.get(p.name, (0, 0.0))[0] + 1
        self._failures[p.name] = (failures, self.clock() + backoff(failures, settings))

    async def _place(self, tier: list[Protected], judged: dict[str, Health]
                     ) -> list[tuple[Protected, str]]:
        """A target for each VM by DRS's placement among the connected hosts (must-rules
        honoured); those placed before count on their targets. Unplaced ones are
        events (retried with backoff)."""
        snapshot = await self.drs.snapshot()
        snapshot = snapshot.model_copy(update={"hosts": tuple(
            h.model_copy(update={"available": h.available
                                 and judged.get(h.name) is Health.CONNECTED})
            for h in snapshot.hosts)})
        settings = await self.drs.settings()
        placed = []
        for p in tier:
            vm = await self.store.vm(p.name)
            if vm.host != p.host or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                continue  # someone else moved it meanwhile
            fresh = DrsVm(name=p.name, host="", memory_mib=vm.spec.memory_mib,
                          vcpus=vm.spec.vcpus, cpu_demand=vm.spec.vcpus * 0.5,
                          mem_demand_mib=vm.spec.memory_mib)
            target, why = place_initial(snapshot, fresh, settings)
            if target is None:
                await self._event("vm restart", p.name, Outcome.FAILED,
                                  f"host {p.host} is {judged[p.host].value}; no host can "
                                  f"take it: {why}; retried with backoff")
                continue
            await self._event("vm restart", p.name, Outcome.OK,
                              f"host {p.host} is {judged[p.host].value}: restarting it on "
                              f"{target} (priority {p.priority.value}; {why})")
            snapshot = snapshot.model_copy(update={"vms": (
                *(v for v in snapshot.vms if v.name != p.name),
                fresh.model_copy(update={"host": target}))})
            placed.append((p, target))
        return placed

    async def _start(self, p: Protected, target: str, judged: dict[str, Health]) -> bool:
        """Start the VM on `target`; its agent first takes the lease (waiting until it
        has seen it expire itself). Then the store records it there."""
        with self.inventory.busy.hold(p.name):
            vm = await self.store.vm(p.name)
            if vm.host != p.host or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                return True
            try:
                client = self.agents.client(await self.store.host(target))
                await client.create_vm(vm.spec, lease_wait_s=LEASE_WAIT_S,
                                       lease_take_over=p.host in self._fenced)
            except FerryError as exc:
                await self._event("vm restart", p.name, Outcome.FAILED,
                                  f"on {target}: {exc.problem}; retried with backoff")
                return False
            await self.store.update_vm(p.name, host=target, state=VmState.RUNNING)
            await self._event("vm restarted", p.name, Outcome.OK,
                              f"runs on {target} (was on {p.host})",
                                  kind=EventKind.HA_RESTART)
            log.warning("HA: restarted %s on %s (host %s %s)", p.name, target, p.host,
                        judged[p.host].value)
            return True

    async def _event(self, action: str, obj: str, outcome: Outcome, detail: str,
                     actor: str = "control plane (HA)", kind: EventKind = EventKind.HA
                     ) -> None:
        vm = obj if kind is EventKind.HA_RESTART else None
        await eventlog.record(self.store, kind, action, obj, detail, vm=vm, outcome=outcome,
                              actor=actor)


def _may_fence(judged: dict[str, Health]) -> bool:
    """Power fencing only while this control plane hears at least as many hosts as it
    finds dead: one cut off from the hosts itself (all silent, or most) would otherwise
    power off healthy hosts. Then the leases decide alone, as without fencing."""
    counts = Counter(judged.values())
    return counts[Health.CONNECTED] > 0 and \
        counts[Health.CONNECTED] >= counts[Health.DEAD]

