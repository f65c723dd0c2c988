"""A migration stream's QEMU settings on either end, the port it listens on, whether it
can switch to post-copy, and the announce owed once a copy runs."""

from __future__ import annotations

import logging

from ferry.domain.errors import Conflict
from ferry.domain.migration import StreamOptions
from ferry.domain.networks import USER_NETWORK, Announce
from ferry.domain.specs import VmSpec
from ferry.hypervisor.errors import MonitorError
from ferry.hypervisor.monitor import Monitor

log = logging.getLogger("ferry.agent")


def stream_capabilities(options: StreamOptions, source: bool) -> dict[str, bool]:
    caps = {"events": True, "postcopy-ram": options.allow_postcopy,
            "multifd": options.multifd_channels > 0}
    if source:
        caps["auto-converge"] = options.throttles
    else:
        # The paused destination leaves shared images inactive (unlocked) until `cont`,
        # so a rollback can resume the source even while the destination still exists.
        caps["late-block-activate"] = True
    return caps


def stream_parameters(options: StreamOptions) -> dict[str, object]:
    params: dict[str, object] = {}
    if options.multifd_channels:
        params["multifd-channels"] = options.multifd_channels
        params["multifd-compression"] = options.compression.value
    return params


def announce_of(options: StreamOptions, spec: VmSpec) -> Announce | None:
    """What the destination announces once it runs; None when the VM has no bridged NIC
    or the migration turned announcing off (to measure the difference)."""
    bridged = any(nic.network != USER_NETWORK for nic in spec.nics)
    return Announce() if options.announce and bridged else None


async def send_announce(monitor: Monitor, announce: Announce | None, name: str) -> None:
    """The announce owed after the `cont` that made this copy the VM: a destination
    (QEMU's own end-of-stream announce waits for the paused VM to run; this one also
    asks a virtio-net guest for its gratuitous ARP), or a source run again after a
    rollback (a silent guest's MAC may have aged out of the network's tables during a
    long migration). Best effort: the VM runs either way."""
    if announce is None:
        return
    try:
        await monitor.execute("announce-self", announce.qmp())
    except MonitorError as exc:
        log.warning("announce-self for %s failed: %s", name, exc)


def incoming_parameters(options: StreamOptions) -> dict[str, object]:
    """The destination's own announce at the end of the stream: QEMU's, with Ferry's
    timing, or none at all when announcing is off."""
    announce = Announce() if options.announce else Announce(rounds=0)
    return dict(announce.migration_parameters())


async def check_postcopy_possible(monitor: Monitor, name: str, host: str) -> None:
    """QEMU refuses migrate-start-postcopy without a migration under way or without the
    postcopy-ram capability; that is the caller's mistake (409), not the host failing."""
    status = (await monitor.query_migrate()).status
    if not status.in_progress:
        raise Conflict(f"VM {name} on {host} has no migration under way ({status}) to "
                       "switch to post-copy", "switch only a running migration")
    caps = await monitor.execute("query-migrate-capabilities")
    if not any(c.get("capability") == "postcopy-ram" and c.get("state") for c in caps):
        raise Conflict(f"the migration of {name} on {host} was started without post-copy",
                       "migrate with allow_postcopy to be able to switch to post-copy")
