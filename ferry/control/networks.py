"""Cluster VM networks: stored once, provided by every host.

Each heartbeat carries the digest of every network the host provides; when that differs
from what the host should provide (a network created or deleted, a host joined and
every peer list grew), the host is sent its whole desired set. One push per host at a
time, bounded; a failed push is retried by a later heartbeat.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from ferry.agent.models import NetworkResult
from ferry.control.agents import AgentPool
from ferry.domain.errors import Conflict, FerryError, InvalidInput
from ferry.domain.inventory import HostState
from ferry.domain.networks import HostNetwork, NetworkSpec, host_view, next_vni
from ferry.domain.records import HostRecord
from ferry.domain.specs import Frozen, HostFacts
from ferry.store import Store
from ferry.store.networks import VniTaken
from ferry.wire import describe_validation

log = logging.getLogger("ferry.control.networks")
# Creates racing for the lowest free VNI: each loser picks again, this many times at most.
AUTO_VNI_ATTEMPTS = 5
PUSH_TIMEOUT_S = 30.0


class NetworkView(Frozen):
    """A network and where it stands: per host `ready`, `pending` or the host's error."""

    spec: NetworkSpec
    hosts: dict[str, str]
    vms: tuple[str, ...]


class Networks:
    def __init__(self, store: Store, agents: AgentPool,
                 users: asyncio.Lock | None = None) -> None:
        self.store = store
        self.agents = agents
        # Held while a network's users are counted and it is deleted; VM creation holds
        # it from its network check to its record (Inventory.network_users).
        self._users_lock = users or asyncio.Lock()
        self._pushing: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[tuple[str, str], str] = {}  # (host, network) -> last error

    # --- requests ------------------------------------------------------------------
    async def create(self, name: str, vni: int | None, mtu: int | None,
                     vteps: tuple[str, ...]) -> NetworkView:
        for attempt in range(AUTO_VNI_ATTEMPTS):
            spec = await self._new_spec(name, vni, mtu, vteps)
            try:
                await self.store.networks.add(spec)
                break
            except VniTaken:
                # Another create took the same free VNI first: one left out is picked
                # again; one the user gave is theirs to change.
                if vni is not None or attempt == AUTO_VNI_ATTEMPTS - 1:
                    raise
        await self.push_all()
        return await self.view(spec.name)

    async def _new_spec(self, name: str, vni: int | None, mtu: int | None,
                        vteps: tuple[str, ...]) -> NetworkSpec:
        """The network to store, checked against the others and the hosts' links."""
        existing = await self.store.networks.all()
        fields: dict[str, object] = {"name": name, "vteps": vteps,
                                     "vni": vni if vni is not None
                                     else next_vni(n.vni for n in existing)}
        if mtu is not None:
            fields["mtu"] = mtu
        try:
            spec = NetworkSpec.model_validate(fields)
        except ValidationError as exc:
            raise InvalidInput(describe_validation(exc.errors()),
                               "see `ferry network create --help`") from None
        clash = next((n for n in existing if n.vni == spec.vni), None)
        if clash is not None:
            raise Conflict(f"VNI {spec.vni} is already used by network {clash.name}",
                           "give another --vni, or leave it out to get a free one")
        # Frames larger than a host's link carries are dropped without a word: refused
        # here, before any host is asked to provide the network.
        small = [h.facts for h in await self.store.hosts() if h.facts is not None
                 and h.facts.network_mtu_max is not None
                 and h.facts.network_mtu_max < spec.mtu]
        if small:
            least = min(small, key=lambda f: f.network_mtu_max or 0)
            raise InvalidInput(f"MTU {spec.mtu} is more than host {least.name}'s link "
                               f"carries under VXLAN ({least.network_mtu_max})",
                               f"give --mtu {least.network_mtu_max} or less, or raise "
                               "the MTU of that host's link")
        return spec

    async def delete(self, name: str) -> None:
        await self.store.networks.get(name)  # 404 before anything else
        async with self._users_lock:
            users = await self._users(name)
            if users:
                raise Conflict(f"network {name} is used by VM(s) {', '.join(users)}",
                               "delete those VMs or give them other NICs first")
            await self.store.networks.delete(name)
        await self.push_all()

    async def views(self) -> list[NetworkView]:
        return [await self.view(n.name) for n in await self.store.networks.all()]

    async def view(self, name: str) -> NetworkView:
        spec = await self.store.networks.get(name)
        hosts = await self.store.hosts()
        wanted = {h.name: self._wanted(h, hosts, [spec]) for h in hosts}
        status = {}
        for host in hosts:
            have = host.facts.network_digests.get(name) if host.facts else None
            want = wanted[host.name][0].digest() if wanted[host.name] else None
            error = self._errors.get((host.name, name))
            status[host.name] = ("ready" if want is not None and want == have
                                 else f"error: {error}" if error else "pending")
        return NetworkView(spec=spec, hosts=status, vms=tuple(await self._users(name)))

    async def _users(self, name: str) -> list[str]:
        return sorted(vm.spec.name for vm in await self.store.vms()
                      if any(nic.network == name for nic in vm.spec.nics))

    # --- keeping hosts in line ---------------------------------------------------------
    @staticmethod
    def _wanted(host: HostRecord, hosts: list[HostRecord],
                networks: list[NetworkSpec]) -> tuple[HostNetwork, ...]:
        if host.facts is None:
            return ()
        addresses = [h.facts.address for h in hosts if h.facts is not None]
        return host_view(networks, host.facts.address, addresses)

    async def on_heartbeat(self, facts: HostFacts) -> None:
        """Push to the host when what it reports is not what it should have."""
        if facts.name in self._pushing:
            return
        hosts = await self.store.hosts()
        host = next((h for h in hosts if h.name == facts.name), None)
        if host is None:
            return
        wanted = self._wanted(host, hosts, await self.store.networks.all())
        if {n.name: n.digest() for n in wanted} != facts.network_digests:
            self._start_push(host, wanted)

    async def push_all(self) -> None:
        """After a create or delete: every connected host now, waited for (bounded)."""
        hosts = await self.store.hosts()
        networks = await self.store.networks.all()
        for host in hosts:
            if host.state is HostState.CONNECTED:
                self._start_push(host, self._wanted(host, hosts, networks), replace=True)
        tasks = list(self._pushing.values())
        if tasks:
            await asyncio.wait(tasks, timeout=PUSH_TIMEOUT_S)

    def _start_push(self, host: HostRecord, wanted: tuple[HostNetwork, ...],
                    replace: bool = False) -> None:
        running = self._pushing.get(host.name)
        if running is not None and not replace:
            return
        task = asyncio.create_task(self._push(host, wanted, running))
        self._pushing[host.name] = task
        task.add_done_callback(lambda t: self._done(host.name, t))

    def _done(self, host: str, task: asyncio.Task[None]) -> None:
        if self._pushing.get(host) is task:
            del self._pushing[host]

    async def _push(self, host: HostRecord, wanted: tuple[HostNetwork, ...],
                    before: asyncio.Task[None] | None) -> None:
        if before is not None:  # one push per host at a time, the newest last
            await asyncio.wait([before], timeout=PUSH_TIMEOUT_S)
        try:
            results = await asyncio.wait_for(
                self.agents.client(host).apply_networks(wanted), PUSH_TIMEOUT_S)
        except (FerryError, TimeoutError) as exc:
            log.warning("networks of host %s not applied: %s", host.name, exc)
            for net in wanted:
                self._errors[(host.name, net.name)] = str(exc) or "timed out"
            return
        self._record(host.name, results)
        if all(r.ok for r in results):
            # Placement and migration checks read the host's facts: they see the change
            # now, not at the next heartbeat.
            await self.store.record_networks(host.name, {n.name: n.digest() for n in wanted})

    def _record(self, host: str, results: list[NetworkResult]) -> None:
        for result in results:
            key = (host, result.name)
            if result.ok:
                self._errors.pop(key, None)
            else:
                self._errors[key] = result.error or "failed"

    async def close(self) -> None:
        for task in list(self._pushing.values()):
            task.cancel()
        await asyncio.gather(*self._pushing.values(), return_exceptions=True)
