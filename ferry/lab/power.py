"""The lab's power driver: a lab host is "off" when no process of it runs (its agent,
the agent's watchdog, its QEMUs); its namespace stays, as a powered-down server keeps its
cabling. Power off is a power cut: every such process is SIGKILLed at once, as a BMC's
"power off" stops a server mid-instruction (DPM powers off only emptied hosts; HA fencing
relies on nothing of the host running on)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from ferry.lab import cluster
from ferry.lab.config import LabConfig
from ferry.power import PowerError, PowerState

GONE_WAIT_S = 5.0


class LabHostPower:
    def __init__(self, config: LabConfig, host: str) -> None:
        self.config, self.host = config, host

    def _processes(self) -> list[int]:
        return [pid for pid, _ in cluster.processes_of(self.config.host_dir(self.host))]

    async def power_on(self) -> None:
        if await self.status() is not PowerState.ON:
            await asyncio.to_thread(cluster.start_agent, self.config, self.host)

    async def power_off(self) -> None:
        await asyncio.to_thread(self._cut)

    def _cut(self) -> None:
        deadline = time.monotonic() + GONE_WAIT_S
        while (left := self._processes()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if left:
            raise PowerError(f"lab host {self.host}: processes {left} survived SIGKILL for "
                             f"{GONE_WAIT_S:.0f} s")

    async def status(self) -> PowerState:
        alive = await asyncio.to_thread(self._processes)
        return PowerState.ON if alive else PowerState.OFF
