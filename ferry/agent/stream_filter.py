"""A cleartext migration's listeners take connections from its source host only (one
nftables table per host).

An encrypted stream's QEMU checks the peer's certificate itself (stream_tls.py). A
cleartext one (`--encryption disabled`) listens for whoever connects first: a stranger on
the migration network who found the port could feed the paused destination a VM state
of their own making, or write into the disks its NBD server exports. So the agent picks
each such listener's port itself, admits the source host's address on it before QEMU
listens (no moment when anyone else can connect), and lets the rule go when the VM
runs or goes. Encrypted streams' listeners get ports picked the same way (but no rule),
so that none lands on a port a rule still holds.

Anyone else is answered with a TCP reset, as a closed port answers: a source that
reaches the destination from an address it did not report fails at once with
"Connection refused" instead of waiting out TCP's connect retries (about two minutes).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address

from ferry.agent import nft
from ferry.domain.errors import Conflict, FerryError

TABLE = "ferry_streams"
PURPOSE = "admit only the source host to a cleartext migration"
Address = IPv4Address | IPv6Address
PICK_ATTEMPTS = 20
REFUSE = "reject with tcp reset"
log = logging.getLogger("ferry.agent")


def ruleset(ports: Mapping[int, Address]) -> str:
    """The nft script that (re)creates the table: each port only from its address (pure)."""
    if not ports:
        return nft.removal("inet", TABLE)
    rules = []
    for port, source in sorted(ports.items()):
        family, other = ("ip", "ipv6") if source.version == 4 else ("ip6", "ipv4")
        rules += [f"    meta nfproto {other} tcp dport {port} counter {REFUSE}",
                  f"    tcp dport {port} {family} saddr != {source} counter {REFUSE}"]
    return "\n".join([
        *nft.replacing("inet", TABLE),
        f"table inet {TABLE} {{",
        "  chain input {",
        "    type filter hook input priority -10; policy accept;",
        *rules,
        "  }",
        "}",
        ""])


def free_port(address: str) -> int:
    """A port nothing listens on at `address` now (the kernel's pick, let go at once:
    the caller filters it, then has QEMU listen on it; taken meanwhile, the listen
    fails and so does the prepare, which changes nothing)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class StreamGuard:
    """The host's table: which listener port admits which source, per VM."""

    def __init__(self) -> None:
        self._ports: dict[str, dict[int, Address]] = {}
        self._lock = asyncio.Lock()

    async def reset(self) -> None:
        """At agent start: rules from before go (whose they were is not known; kept,
        they would turn away another stream given one of their ports). An incoming VM
        adopted between its prepare and its source's connection is unfiltered for that
        moment. A failure is logged: the agent starts all the same."""
        async with self._lock:
            try:
                await nft.apply(ruleset({}), PURPOSE)
            except FerryError as exc:
                log.warning("stream filter not reset: %s", exc.problem)
            self._ports.clear()

    async def port_for(self, vm: str, address: str, source: Address | None) -> int:
        """A port for one of the VM's listeners; for a cleartext stream (`source`) one
        admitting only `source`, filtered before QEMU listens on it (an encrypted
        stream's QEMU checks its peer's certificate itself)."""
        port = self.pick(address)
        if source is not None:
            await self.admit(vm, port, source)
        return port

    def pick(self, address: str) -> int:
        """A free port at `address` that none of the rules holds: a listener that
        accepted its stream has closed, but its port keeps its rule until the VM runs,
        and another stream landing on it would be turned away."""
        held = {port for ports in self._ports.values() for port in ports}
        for _ in range(PICK_ATTEMPTS):
            port = free_port(address)
            if port not in held:
                return port
        raise Conflict(f"no free port at {address} outside the {len(held)} held by "
                       "migration streams", "try again when a migration has ended")

    async def admit(self, vm: str, port: int, source: Address) -> None:
        async with self._lock:
            ports = {**self._ports.get(vm, {}), port: source}
            await nft.apply(ruleset(self._flat(vm, ports)), PURPOSE)
            self._ports[vm] = ports

    async def release(self, vm: str) -> None:
        """The VM's listeners are done (it runs, or is gone): their rules go."""
        async with self._lock:
            if vm in self._ports:
                await nft.apply(ruleset(self._flat(vm, {})), PURPOSE)
                del self._ports[vm]

    async def release_quietly(self, vm: str) -> None:
        """release, a failure logged (the rule left admits the source host only)."""
        try:
            await self.release(vm)
        except FerryError as exc:
            log.warning("VM %s: stream filter not updated: %s", vm, exc.problem)

    def _flat(self, vm: str, ports: Mapping[int, Address]) -> dict[int, Address]:
        out = {p: a for name, held in self._ports.items() if name != vm
               for p, a in held.items()}
        out.update(ports)
        return out

