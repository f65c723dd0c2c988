"""Wake-on-LAN: wake a host whose NIC listens for the magic packet (6 x 0xFF, then the
NIC's MAC 16 times) in a UDP datagram to the broadcast address. It can only wake:
there is no switching off and no reading the state over it."""

from __future__ import annotations

import asyncio

from ferry.power.config import WolPowerConfig, parse_mac, validated
from ferry.power.driver import PowerState
from ferry.power.errors import PowerError, PowerUnsupported


def magic_packet(mac: str) -> bytes:
    return b"\xff" * 6 + parse_mac(mac) * 16


class WakeOnLanDriver:
    def __init__(self, mac: str, broadcast: str = "255.255.255.255", port: int = 9, *,
                 repeat: int = 3) -> None:
        self.config = validated(WolPowerConfig, {
            "driver": "wol", "mac": mac, "broadcast": broadcast, "port": port})
        self.repeat = max(1, repeat)  # UDP may drop one; a NIC wakes on the first it sees

    @classmethod
    def from_config(cls, config: WolPowerConfig) -> WakeOnLanDriver:
        return cls(config.mac, config.broadcast, config.port)

    @property
    def packet(self) -> bytes:
        return magic_packet(self.config.mac)

    async def power_on(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=(c.broadcast, c.port),
                allow_broadcast=True)
        except OSError as exc:
            raise PowerError(f"cannot send the Wake-on-LAN packet for {c.mac} to "
                             f"{c.broadcast}:{c.port}: {exc.strerror or exc}",
                             "check that this machine has a route to that broadcast address",
                             cause=exc) from exc
        try:
            for _ in range(self.repeat):
                transport.sendto(self.packet)
        finally:
            transport.close()

    async def power_off(self) -> None:
        raise PowerUnsupported(
            f"Wake-on-LAN cannot power off the host with NIC {self.config.mac}",
            "shut the host down from its operating system (for example `systemctl "
            "poweroff` over SSH), or give the host an IPMI power driver, which can do both")

    async def status(self) -> PowerState:
        return PowerState.UNKNOWN
