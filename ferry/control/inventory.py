"""Hosts and VMs: registration by heartbeat, placement on create, power operations."""

from __future__ import annotations

import asyncio
import contextlib

from ferry.agent.models import AgentVmState, VmInfo
from ferry.control.agents import AgentPool
from ferry.control.reconcile import BusyVms
from ferry.domain.capacity import host_snapshots
from ferry.domain.errors import Conflict, HostUnavailable, InvalidInput, NotFound
from ferry.domain.inventory import HostSnapshot, VmState
from ferry.domain.networks import USER_NETWORK
from ferry.domain.placement import place
from ferry.domain.records import HostRecord, VmRecord
from ferry.domain.specs import HostFacts, VmSpec
from ferry.store import Store

AGENT_TO_VM_STATE = {
    AgentVmState.STARTING: VmState.RUNNING,
    AgentVmState.RUNNING: VmState.RUNNING,
    AgentVmState.PAUSED: VmState.PAUSED,
    AgentVmState.INCOMING: VmState.MIGRATING,
    AgentVmState.MIGRATED: VmState.MIGRATING,
    AgentVmState.CRASHED: VmState.CRASHED,
    AgentVmState.EXITED: VmState.CRASHED,
}


class Inventory:
    def __init__(self, store: Store, agents: AgentPool) -> None:
        self.store = store
        self.agents = agents
        self.busy = BusyVms()  # what requests change now: the reconciler waits
        # Held from a new VM's network check to its record (see Networks.delete).
        self.network_users = asyncio.Lock()

    async def heartbeat(self, facts: HostFacts, url: str, vms: tuple[VmInfo, ...]) -> None:
        await self.store.record_heartbeat(facts, url)
        self.agents.report(facts.name, vms)

    async def snapshots(self, exclude_vm: str | None = None) -> list[HostSnapshot]:
        """Every host with what is allotted on it, counting migrations on their way in."""
        return host_snapshots(await self.store.hosts(), await self.store.vms(),
                              await self.store.migrations(unfinished_only=True), exclude_vm)

    async def connected_host(self, name: str) -> HostRecord:
        host = await self.store.host(name)
        if not host.state.reports:
            raise HostUnavailable(f"host {name} is {host.state}",
                                  "check that its agent runs; see `ferry host list`")
        return host

    # --- VMs -------------------------------------------------------------------
    async def create_vm(self, spec: VmSpec, host: str | None, start: bool) -> VmRecord:
        """Place, record and (unless start is False) boot a VM; all or nothing."""
        with self.busy.hold(spec.name):
            return await self._create_vm(spec, host, start)

    async def _create_vm(self, spec: VmSpec, host: str | None, start: bool) -> VmRecord:
        try:
            await self.store.vm(spec.name)
            raise Conflict(f"a VM named {spec.name!r} already exists",
                           "choose another name or delete the existing VM")
        except NotFound:
            pass
        async with self.network_users:
            # Also one MAC per network and one UUID per VM: two creates do not both
            # find one free.
            vms = await self.store.vms()
            _check_uuid(spec, vms)
            await self._check_networks(spec, vms)
            chosen = place(spec, await self.snapshots(), host)
            record = await self.store.host(chosen)
            assert record.facts is not None  # place() only picks hosts with facts
            machine = record.facts.resolve_machine(spec.machine) or spec.machine
            # Pin the versioned machine type now so the VM stays migratable later.
            spec = VmSpec.model_validate(spec.model_dump() | {"machine": machine})
            vm = await self.store.add_vm(VmRecord(spec=spec, host=chosen,
                                                  state=VmState.DEFINED))
        if start:
            try:
                return await self.start_vm(spec.name)
            except Exception:
                await self.store.delete_vm(spec.name)
                raise
        return vm

    async def _check_networks(self, spec: VmSpec, vms: list[VmRecord]) -> None:
        known = {n.name for n in await self.store.networks.all()}
        taken = {(nic.network, nic.mac): vm.spec.name for vm in vms
                 for nic in vm.spec.nics if nic.network != USER_NETWORK}
        for nic in spec.nics:
            if nic.network == USER_NETWORK:
                continue
            if nic.network not in known:
                raise InvalidInput(f"NIC {nic.name}: there is no network {nic.network!r}",
                                   f"create it (`ferry network create {nic.network}`), pick "
                                   "one of `ferry network list`, or use --nic user")
            # One segment spans every host: a MAC twice on it breaks both VMs.
            if (nic.network, nic.mac) in taken:
                raise Conflict(f"MAC {nic.mac} of NIC {nic.name} is already used on network "
                               f"{nic.network} by VM {taken[(nic.network, nic.mac)]}",
                               "give the NIC another MAC (or leave it out for a random one)")

    async def start_vm(self, name: str) -> VmRecord:
        with self.busy.hold(name):
            vm = await self.store.vm(name)
            if vm.state in (VmState.RUNNING, VmState.MIGRATING, VmState.PAUSED):
                raise Conflict(f"VM {name} is already {vm.state} on {vm.host}")
            if vm.state is VmState.UNKNOWN:
                raise Conflict(f"where VM {name} runs is in doubt (recorded on {vm.host}); "
                               "starting it could make a second copy",
                               f"see `ferry events`; `ferry vm stop {name} --force` stops "
                               "every copy once all hosts are connected")
            host = await self.connected_host(vm.host)
            await self.agents.client(host).create_vm(vm.spec)
            return await self.store.update_vm(name, state=VmState.RUNNING)

    async def stop_vm(self, name: str, force: bool) -> VmRecord:
        with self.busy.hold(name):
            vm = await self.store.vm(name)
            if vm.state is VmState.MIGRATING:
                raise Conflict(f"VM {name} is migrating",
                               "wait for the migration or cancel it")
            hosts = [vm.host]
            if vm.state is VmState.UNKNOWN:
                hosts = await self._every_copy(name)
            for where in hosts:
                host = await self.connected_host(where)
                with contextlib.suppress(NotFound):  # already off: stopping is idempotent
                    await self.agents.client(host).stop_vm(name, force=force)
            return await self.store.update_vm(name, state=VmState.DEFINED)

    async def _every_copy(self, name: str) -> list[str]:
        """The hosts reporting a copy of `name`; only when every host reports (a VM in
        doubt may run on a silent one)."""
        hosts = await self.store.hosts()
        silent = [h.name for h in hosts if not h.state.reports]
        if silent:
            raise Conflict(f"where VM {name} runs is in doubt and host(s) "
                           f"{', '.join(silent)} do not report",
                           "bring them back (or remove them) before stopping it")
        return [h.name for h in hosts if name in self.agents.reported.get(h.name, {})]

    async def delete_vm(self, name: str) -> None:
        vm = await self.store.vm(name)
        if vm.state is not VmState.DEFINED:
            raise Conflict(f"VM {name} is {vm.state}", f"stop it first: `ferry vm stop {name}`")
        await self.store.delete_vm(name)

    async def live(self, name: str) -> tuple[VmRecord, VmInfo | None]:
        """The stored VM and what its agent says right now (None when not running)."""
        vm = await self.store.vm(name)
        if vm.state is VmState.DEFINED:
            return vm, None
        host = await self.store.host(vm.host)
        try:
            return vm, await self.agents.client(host).vm(name)
        except (NotFound, HostUnavailable):
            return vm, None

    async def disk_files(self, name: str) -> dict[str, str]:
        vm = await self.store.vm(name)
        host = await self.connected_host(vm.host)
        return await self.agents.client(host).disk_files(name)

    async def serial(self, name: str, lines: int) -> list[str]:
        vm = await self.store.vm(name)
        host = await self.connected_host(vm.host)
        return await self.agents.client(host).serial(name, lines)


def _check_uuid(spec: VmSpec, vms: list[VmRecord]) -> None:
    """A host names a VM's taps (and QEMU its SMBIOS identity) after the UUID: a second
    VM with it would take over the first one's NICs."""
    twin = next((vm.spec.name for vm in vms if vm.spec.uuid == spec.uuid), None)
    if twin is not None:
        raise Conflict(f"VM {twin} already has the UUID {spec.uuid}",
                       "give the new VM another uuid (or leave it out for a random one)")
