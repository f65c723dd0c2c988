"""What HA does to this host's guests: fencing (for the lease keeper) and the isolation
response (for the heartbeat loop).

Fencing stops a guest from executing, never silently leaves it running: QMP `stop`, or a
kill of its QEMU when QMP does not answer within a second. A guest whose lease another
host took is killed, unless it is the paused source of a migration (QEMU `postmigrate`):
that one is only kept paused, because a rollback ("revert") may still resume it, taking
the lease back from a destination that never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ferry.agent.watchdog import WatchState
from ferry.domain.ha import HaDirective, IsolationResponse
from ferry.domain.leases import HostBeat
from ferry.hypervisor.errors import MonitorError
from ferry.hypervisor.process import ProcessState

if TYPE_CHECKING:
    from ferry.agent.host import HostRuntime
    from ferry.agent.leases import LeaseKeeper

log = logging.getLogger("ferry.agent.fencing")
QMP_TIMEOUT_S = 1.0
# Runstates of a migration's source once the stream has ended: the guest is paused and
# runs again only on the control plane's `cont` (a rollback).
_SOURCE_DONE = frozenset({"postmigrate", "finish-migrate"})


class RuntimeGuests:
    """The lease keeper's Guests, over a HostRuntime."""

    def __init__(self, host: HostRuntime) -> None:
        self.host = host

    def alive(self, vm: str) -> bool:
        rec = self.host.record(vm)
        return rec is not None and rec.process.state is ProcessState.RUNNING

    async def executing(self, vm: str) -> bool:
        rec = self.host.record(vm)
        if rec is None or rec.monitor is None or rec.process.state is not ProcessState.RUNNING:
            return False
        try:
            return await rec.monitor.runstate() == "running"
        except MonitorError:
            return False

    async def pause(self, vm: str) -> bool:
        rec = self.host.record(vm)
        if rec is None or rec.process.state is not ProcessState.RUNNING:
            return False
        try:
            assert rec.monitor is not None
            state = (await rec.monitor.execute("query-status", timeout_s=QMP_TIMEOUT_S)
                     )["status"]
            if state != "running":
                return False
            await rec.monitor.execute("stop", timeout_s=QMP_TIMEOUT_S)
            log.error("fenced VM %s: paused", vm)
            return True
        except (MonitorError, AssertionError, TimeoutError, KeyError, TypeError) as exc:
            log.error("fencing VM %s: QMP does not answer (%s), killing its QEMU", vm, exc)
            await rec.process.kill(grace_s=0.5)
            return False

    async def unpause(self, vm: str) -> None:
        rec = self.host.record(vm)
        if rec is None or rec.monitor is None or rec.process.state is not ProcessState.RUNNING:
            return
        with contextlib.suppress(MonitorError, TimeoutError):
            # Only the plain pause we made: never `cont` a source whose stream ended.
            if await rec.monitor.runstate() == "paused":
                await rec.monitor.cont()

    async def lost(self, vm: str) -> None:
        """Another host holds the lease: this copy must not execute. A migration's source
        whose stream ended stays as it is (paused; a "revert" may resume it). Any other
        running guest is paused at once; then a plain VM's QEMU is stopped for good,
        while a copy that took part in a migration is left paused for the control
        plane's leftover reaper, which stops it once it sees the VM recorded elsewhere
        (killing a migration's copy here could lose the guest's only memory). A QEMU
        whose QMP does not answer is killed whatever it is: whether it executes cannot be
        told, and the lease's holder may run the guest."""
        rec = self.host.record(vm)
        if rec is None or rec.process.state is not ProcessState.RUNNING:
            return
        state = None
        if rec.monitor is not None:
            with contextlib.suppress(MonitorError, TimeoutError, KeyError, TypeError):
                state = (await rec.monitor.execute("query-status", timeout_s=QMP_TIMEOUT_S)
                         )["status"]
        if state in _SOURCE_DONE:
            log.info("VM %s: lease handed over, the migrated source stays paused", vm)
            return
        if state != "paused":
            await self.pause(vm)  # kills QEMU when QMP does not answer
        if rec.migration_id is None:
            await self.host.stop(vm, force=True)


class Isolation:
    """The isolation response: an agent that cannot deliver heartbeats to the control
    plane for isolation_s, reaches no peer agent over the network, and still writes the
    datastore while peers do too, is isolated: it applies the cluster's response once
    (power off: stop every VM hard, which releases its lease; leave running: nothing)."""

    def __init__(self, host: HostRuntime) -> None:
        self.host = host
        self.directive: HaDirective | None = None  # the control plane's latest word
        self.last_delivered = time.monotonic()
        self.applied = False

    def delivered(self, directive: HaDirective | None) -> None:
        self.last_delivered = time.monotonic()
        self.applied = False
        if directive is not None:
            self.directive = directive

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.check()
            except Exception:  # judged again next second
                log.exception("isolation check failed")

    async def check(self) -> None:
        d, keeper = self.directive, self.host.leases
        if d is None or not d.enabled or keeper is None or self.applied:
            return
        if time.monotonic() - self.last_delivered < d.isolation_s:
            return
        peers = keeper.peers_alive()
        if not keeper.ok or not peers:
            return  # the datastore is gone too, or nobody else lives: not isolation
        if await _any_reachable(peers):
            return  # the network works: it is the control plane that is away
        self.applied = True
        response = d.isolation_response
        log.error("host %s is isolated (no control plane, no peer for %.0f s): %s",
                  self.host.config.name, time.monotonic() - self.last_delivered, response)
        if response is IsolationResponse.POWER_OFF:
            for vm in self.host.names():
                with contextlib.suppress(Exception):
                    await self.host.stop(vm, force=True)


async def _any_reachable(peers: list[HostBeat]) -> bool:
    for beat in peers:
        host, _, port = beat.address.rpartition(":")
        if not host or not port.isdigit():
            continue
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def watch_state(keeper: LeaseKeeper, isolation: Isolation) -> WatchState:
    """What the host's watchdog acts on (ferry/agent/watchdog.py): armed while HA is on
    and a lease is held; it kills the guests halfway between this agent's own fencing
    and the leases' expiry unless a round proves the leases before then."""
    t = keeper.timing
    directive = isolation.directive
    return WatchState(renewed_at=keeper.last_ok, kill_after_s=(t.fence_s + t.expire_s) / 2,
                      armed=bool(keeper.held) and directive is not None and directive.enabled)
