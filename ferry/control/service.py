"""The control plane assembled: store, trust, agents, inventory, orchestrator."""

from __future__ import annotations

from ferry.control.agents import AgentPool
from ferry.control.demand import Demand
from ferry.control.dpm import Dpm, LabPower
from ferry.control.drs import Drs
from ferry.control.events import ChangeBus
from ferry.control.ha import Ha
from ferry.control.inventory import Inventory
from ferry.control.leader import Leadership, default_replica_id
from ferry.control.migration import Orchestrator
from ferry.control.networks import Networks
from ferry.control.reconcile import Reconciler
from ferry.control.schedules import Scheduler
from ferry.control.storage import Relocator
from ferry.control.trust import Trust
from ferry.domain.leader import LeaderTerms
from ferry.pki import ControlPki
from ferry.store import Store


class ControlPlane:
    def __init__(self, store: Store, pki: ControlPki, lab_power: LabPower | None = None,
                 replica_id: str | None = None, terms: LeaderTerms | None = None) -> None:
        self.store = store
        self.trust = Trust(store, pki)
        # Agents are called over mutual TLS: they see the control plane's certificate,
        # we check theirs against the cluster CA.
        # Calls to agents carry this replica's term: a deposed leader's are refused.
        self.agents = AgentPool(pki.client_context(), term=lambda: self.leadership.token)
        self.bus = ChangeBus()
        self.inventory = Inventory(store, self.agents)
        # A VM created on a network and that network deleted are not interleaved.
        self.networks = Networks(store, self.agents, self.inventory.network_users)
        self.migrations = Orchestrator(store, self.inventory, self.agents, self.bus)
        self.relocations = Relocator(store, self.agents, self.bus)
        self.reconciler = Reconciler(store, self.agents, self.inventory.busy)
        self.demand = Demand()
        self.drs = Drs(store, self.inventory, self.migrations, self.demand)
        self.dpm = Dpm(store, self.drs, lab_power)
        self.drs.dpm_round = self.dpm.round
        self.ha = Ha(store, self.inventory, self.drs, self.agents, power=self.dpm.driver)
        self.schedules = Scheduler(store, self.migrations, self.relocations, self.drs,
                                   self.bus)
        # Only the replica holding the leader lease drives jobs and the loops.
        self.leadership = Leadership(store, replica_id or default_replica_id(), self._lead,
                                     self._stand_by, terms)
        # Job writes carry this replica's fencing token: none lands after its term.
        store.fence = lambda: self.leadership.token

    @classmethod
    async def open(cls, db_url: str, pki: ControlPki, lab_power: LabPower | None = None,
                   replica_id: str | None = None) -> ControlPlane:
        return cls(await Store.open(db_url), pki, lab_power, replica_id)

    async def start(self) -> None:
        """Claim the lease once now (a replica alone leads before serving, as a single
        control plane always did), then keep claiming it in the background."""
        await self.leadership.round()
        self.leadership.start()

    async def _lead(self) -> None:
        """Won the lease: resume every unfinished job, as a restart would, and start
        the loops."""
        config = await self.store.drs.config()
        await self.migrations.set_limits(config.per_host_limit, config.cluster_limit)
        await self.migrations.resume_unfinished()
        await self.relocations.resume_unfinished()
        self.reconciler.start()
        self.drs.start()
        self.ha.start()
        # After the jobs resumed: a scheduled run's job is followed, never started again.
        await self.schedules.start()

    async def _stand_by(self) -> None:
        """Lost the lease: stop driving (jobs stay persisted for the new leader)."""
        await self.schedules.close()
        await self.ha.close()
        await self.reconciler.close()
        await self.drs.close()
        await self.migrations.shutdown()
        await self.relocations.shutdown()

    async def close(self) -> None:
        await self.leadership.close()  # stands by first if leading, and gives the lease up
        await self.schedules.close()
        await self.ha.close()
        await self.reconciler.close()
        await self.drs.close()
        await self.networks.close()
        await self.migrations.shutdown()
        await self.relocations.shutdown()
        await self.agents.aclose()
        await self.store.close()
