"""The control plane assembled: store, agents, inventory, orchestrator."""

from __future__ import annotations

from ferry.control.agents import AgentPool
from ferry.control.events import ChangeBus
from ferry.control.inventory import Inventory
from ferry.control.migration import Orchestrator
from ferry.control.storage import Relocator
from ferry.store import Store


class ControlPlane:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.agents = AgentPool()
        self.bus = ChangeBus()
        self.inventory = Inventory(store, self.agents)
        self.migrations = Orchestrator(store, self.inventory, self.agents, self.bus)
        self.relocations = Relocator(store, self.agents, self.bus)

    @classmethod
    async def open(cls, db_url: str) -> ControlPlane:
        return cls(await Store.open(db_url))

    async def start(self) -> None:
        await self.migrations.resume_unfinished()
        await self.relocations.resume_unfinished()

    async def close(self) -> None:
        await self.migrations.shutdown()
        await self.relocations.shutdown()
        await self.agents.aclose()
        await self.store.close()
