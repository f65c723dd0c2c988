"""DPM and standby: a host emptied by live migration and powered down through its power
driver (IPMI, Wake-on-LAN, the lab's), and woken again. The decision is the pure
`ferry.domain.dpm.decide`; this module gathers the loads and acts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ferry.control.drs import Drs
from ferry.domain.dpm import (
    ActionKind,
    DpmAction,
    DpmHistory,
    DpmHost,
    DpmSettings,
    PowerMode,
    decide,
)
from ferry.domain.drs_config import DrsConfig
from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.inventory import HostState, VmState
from ferry.domain.migration import Phase
from ferry.domain.records import HostRecord
from ferry.power import LabPowerConfig, PowerConfig, PowerDriver, make_driver
from ferry.store import Store

log = logging.getLogger("ferry.dpm")
EVACUATION_TIMEOUT_S = 1800.0

LabPower = Callable[[str], PowerDriver]  # host name -> the lab's driver for it


class Dpm:
    def __init__(self, store: Store, drs: Drs, lab_power: LabPower | None = None) -> None:
        self.store = store
        self.drs = drs
        self.lab_power = lab_power
        self.history = DpmHistory()
        self._lock = asyncio.Lock()  # one standby or wake at a time

    async def driver(self, host: str) -> PowerDriver:
        config = await self.store.drs.power(host)
        if config is None:
            raise InvalidInput(f"host {host} has no power driver",
                               f"set one with `ferry host power {host} --driver ...`")

        def lab(_: LabPowerConfig) -> PowerDriver:
            if self.lab_power is None:
                raise InvalidInput(f"host {host}'s power driver is the lab's, and this "
                                   "control plane runs no lab", "use ipmi or wol")
            return self.lab_power(host)

        return make_driver(config, lab=lab)

    async def set_power(self, host: str, config: PowerConfig) -> PowerConfig:
        await self.store.host(host)
        return await self.store.drs.set_power(host, config)

    # --- standby and wake ----------------------------------------------------------
    async def enter_standby(self, host: str) -> HostRecord:
        """Evacuate the host (refused when the others lack room), wait for every move,
        then power it down. A move that fails leaves the host in maintenance, on."""
        driver = await self.driver(host)
        async with self._lock:
            result = await self.drs.enter_maintenance(host)
            assert result.evacuation is not None
            ids = [r.migration_id for r in result.evacuation.results if r.migration_id]
            await self._wait(ids)
            left = [vm.spec.name for vm in await self.store.vms()
                    if vm.host == host and vm.state is not VmState.DEFINED]
            if left:
                raise Conflict(f"host {host} still runs {', '.join(left)}; it stays on, "
                               "in maintenance", "move or stop those VMs, then try again")
            await driver.power_off()
            return await self.store.set_standby(host, True)

    async def exit_standby(self, host: str) -> HostRecord:
        driver = await self.driver(host)
        async with self._lock:
            await driver.power_on()
            await self.store.set_standby(host, False)
            return await self.store.set_maintenance(host, False)

    async def _wait(self, ids: list[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EVACUATION_TIMEOUT_S
        pending = set(ids)
        while pending:
            for mid in list(pending):
                if (await self.store.migration(mid)).phase in (Phase.COMPLETED,
                                                              Phase.FAILED):
                    pending.discard(mid)
            if pending and loop.time() > deadline:
                raise Conflict(f"evacuation not finished after {EVACUATION_TIMEOUT_S:.0f} s "
                               f"({len(pending)} migrations running)")
            await asyncio.sleep(0.5)

    # --- one round of the loop -------------------------------------------------------------
    async def round(self, config: DrsConfig) -> DpmAction:
        hosts = [h for h in await self.store.hosts() if h.facts is not None]
        with_driver = {h.name for h in hosts if await self.store.drs.power(h.name)}
        missing = sorted({h.name for h in hosts} - with_driver)
        if missing:
            # A host DPM could power off but never back on (or not at all) is no choice.
            return DpmAction(kind=ActionKind.NOTHING, host=None,
                             reason=f"DPM needs a power driver on every host; "
                                    f"{', '.join(missing)} have none")
        snapshot = await self.drs.snapshot()
        used_cpu: dict[str, float] = {}
        used_mem: dict[str, int] = {}
        count: dict[str, int] = {}
        for vm in snapshot.vms:
            used_cpu[vm.host] = used_cpu.get(vm.host, 0.0) + vm.cpu_demand
            used_mem[vm.host] = used_mem.get(vm.host, 0) + vm.mem_demand_mib
            count[vm.host] = count.get(vm.host, 0) + 1
        dpm_hosts = [DpmHost(name=h.name, cpus=h.cpus or 1, memory_mib=h.memory_mib or 1,
                             state=_mode(h),
                             used_cpus=used_cpu.get(h.name, 0.0),
                             used_memory_mib=used_mem.get(h.name, 0),
                             vms=count.get(h.name, 0))
                     for h in hosts]
        settings = DpmSettings(low=config.dpm_low, high=config.dpm_high,
                               ha_reserve_hosts=config.ha_reserve_hosts)
        decision = decide(dpm_hosts, settings, self.history)
        self.history = decision.history
        action = decision.action
        if action.kind is ActionKind.STANDBY and action.host:
            log.info("DPM: standby %s: %s", action.host, action.reason)
            await self.enter_standby(action.host)
        elif action.kind is ActionKind.WAKE and action.host:
            log.info("DPM: wake %s: %s", action.host, action.reason)
            await self.exit_standby(action.host)
        return action


def _mode(host: HostRecord) -> PowerMode:
    return {HostState.STANDBY: PowerMode.STANDBY, HostState.MAINTENANCE: PowerMode.MAINTENANCE,
            HostState.CONNECTED: PowerMode.ON}.get(host.state, PowerMode.UNAVAILABLE)
