"""What every power driver offers: switch a host on or off, and say which it is."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol, runtime_checkable


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"  # the driver cannot tell (Wake-on-LAN), not a failure


@runtime_checkable
class PowerDriver(Protocol):
    """Each call either did what it says or raises `PowerError`; none waits for the
    host's OS to come up or go down (the caller watches heartbeats for that).
    `power_on` on a host that is on, or `power_off` on one that is off, is no error."""

    async def power_on(self) -> None: ...

    async def power_off(self) -> None: ...

    async def status(self) -> PowerState: ...


@runtime_checkable
class LabPowerDriver(PowerDriver, Protocol):
    """The lab's driver (built with the lab, not here) meets the same protocol:
    `power_off` SIGKILLs every process of the host (agent, watchdog, QEMUs) as a power cut
    does, `power_on` starts the agent again, and `status` is ON while any of them runs,
    OFF when none does."""
