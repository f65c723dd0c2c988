"""The control plane assembled: store, trust, agents, inventory, orchestrator."""

from __future__ import annotations

from ferry.control.agents import AgentPool
from ferry.control.demand import Demand
from ferry.control.dpm import Dpm, LabPower
from ferry.control.drs import Drs
from ferry.control.events import ChangeBus
from ferry.control.ha import Ha
from ferry.control.inventory import Inventory
from ferry.control.migration import Orchestrator
from ferry.control.networks import Networks
from ferry.control.reconcile import Reconciler
from ferry.control.schedules import Scheduler
from ferry.control.storage import Relocator
from ferry.control.trust import Trust
from ferry.pki import ControlPki
from ferry.store import Store


class ControlPlane:
    def __init__(self, store: Store, pki: ControlPki, lab_power: LabPower | None = None
                 ) -> None:
        self.store = store
        self.trust = Trust(store, pki)
        # Agents are called over mutual TLS: they see the control plane's certificate,
        # we check theirs against the cluster CA.
        self.agents = AgentPool(pki.client_context())
        self.bus = ChangeBus()
        self.inventory = Inventory(store, self.agents)
        self.networks = Networks(store, self.agents)
        self.migrations = Orchestrator(store, self.inventory, self.agents, self.bus)
        self.relocations = Relocator(store, self.agents, self.bus)
        self.reconciler = Reconciler(store, self.agents, self.inventory.busy)
        self.demand = Demand()
        self.drs = Drs(store, self.inventory, self.migrations, self.demand)
        self.dpm = Dpm(store, self.drs, lab_power)
        self.drs.dpm_round = self.dpm.round
        self.ha = Ha(store, self.inventory, self.drs, self.agents)
        self.schedules = Scheduler(store, self.migrations, self.relocations, self.drs,
                                   self.bus)

    @classmethod
    async def open(cls, db_url: str, pki: ControlPki, lab_power: LabPower | None = None
                   ) -> ControlPlane:
        return cls(await Store.open(db_url), pki, lab_power)

    async def start(self) -> None:
        config = await self.store.drs.config()
        await self.migrations.set_limits(config.per_host_limit, config.cluster_limit)
        await self.migrations.resume_unfinished()
        await self.relocations.resume_unfinished()
        self.reconciler.start()
        self.drs.start()
        self.ha.start()
        # After the jobs resumed: a scheduled run's job is followed, never started again.
        await self.schedules.start()

    async def close(self) -> None:
        await self.schedules.close()
        await self.ha.close()
        await self.reconciler.close()
        await self.drs.close()
        await self.networks.close()
        await self.migrations.shutdown()
        await self.relocations.shutdown()
        await self.agents.aclose()
        await self.store.close()
