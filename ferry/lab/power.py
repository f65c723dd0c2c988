"""The lab's power driver: a lab host is "off" when its agent is stopped (its namespace
stays, as a powered-down server keeps its cabling) and "on" once its agent runs again."""

from __future__ import annotations

import asyncio

from ferry.lab import cluster
from ferry.lab.config import LabConfig
from ferry.power import PowerState


class LabHostPower:
    def __init__(self, config: LabConfig, host: str) -> None:
        self.config, self.host = config, host

    async def power_on(self) -> None:
        if await self.status() is not PowerState.ON:
            await asyncio.to_thread(cluster.start_agent, self.config, self.host)

    async def power_off(self) -> None:
        await asyncio.to_thread(cluster.stop_agent, self.config, self.host)

    async def status(self) -> PowerState:
        alive = cluster.agent_pid(self.config, self.host)
        return PowerState.ON if alive is not None else PowerState.OFF
