"""Power drivers: switch a host on or off for DPM and maintenance.

One module per driver (`ipmi`, `wol`; the lab's driver lives with the lab and meets
`LabPowerDriver`), the settings a host carries (`config`), and one error root.
"""

from __future__ import annotations

from collections.abc import Callable

from ferry.domain.errors import InvalidInput
from ferry.power.config import (
    IpmiPowerConfig,
    LabPowerConfig,
    PowerConfig,
    WolPowerConfig,
    parse_power_config,
)
from ferry.power.driver import LabPowerDriver, PowerDriver, PowerState
from ferry.power.errors import PowerError, PowerTimeout, PowerUnsupported
from ferry.power.ipmi import IpmiDriver
from ferry.power.wol import WakeOnLanDriver, magic_packet


def make_driver(config: PowerConfig,
                lab: Callable[[LabPowerConfig], PowerDriver] | None = None) -> PowerDriver:
    """The driver a host's settings name; the lab's comes from the `lab` factory."""
    if isinstance(config, IpmiPowerConfig):
        return IpmiDriver.from_config(config)
    if isinstance(config, WolPowerConfig):
        return WakeOnLanDriver.from_config(config)
    if lab is None:
        raise InvalidInput("this host's power driver is the lab's, and no lab runs here",
                           "use the ipmi or wol driver outside the lab")
    return lab(config)


__all__ = [
    "IpmiDriver",
    "IpmiPowerConfig",
    "LabPowerConfig",
    "LabPowerDriver",
    "PowerConfig",
    "PowerDriver",
    "PowerError",
    "PowerState",
    "PowerTimeout",
    "PowerUnsupported",
    "WakeOnLanDriver",
    "WolPowerConfig",
    "magic_packet",
    "make_driver",
    "parse_power_config",
]
