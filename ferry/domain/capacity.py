"""What each host has allotted, as placement and a migration's CHECKING read it.

A host holds the VMs the inventory places on it and, from CHECKING on, every VM on its
way in: an unfinished migration reserves the target's memory, vCPUs and MACs until it
ends, so two migrations can never both count on the same free memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ferry.domain.inventory import HostSnapshot, VmState, vm_macs
from ferry.domain.records import HostRecord, MigrationRecord, VmRecord
from ferry.domain.specs import VmSpec


def host_snapshots(hosts: Iterable[HostRecord], vms: Iterable[VmRecord],
                   migrations: Iterable[MigrationRecord], exclude_vm: str | None = None
                   ) -> list[HostSnapshot]:
    """Every host with the VMs placed there and those migrating in. `exclude_vm` (the
    VM being checked) is left out everywhere, with its own migration."""
    all_vms = {v.name: v for v in vms}
    placed: dict[str, list[VmSpec]] = defaultdict(list)
    macs: dict[str, list[VmSpec]] = defaultdict(list)
    for vm in all_vms.values():
        if vm.name == exclude_vm:
            continue
        macs[vm.host].append(vm.spec)
        if vm.state is not VmState.DEFINED:
            placed[vm.host].append(vm.spec)
    for m in migrations:
        moving = all_vms.get(m.vm)
        if m.phase.terminal or m.vm == exclude_vm or moving is None \
                or moving.host == m.target:
            continue  # ended, the one checked, gone, or already recorded on its target
        placed[m.target].append(moving.spec)
        macs[m.target].append(moving.spec)
    return [HostSnapshot(
        name=h.name, state=h.state, cpus=h.cpus, memory_mib=h.memory_mib,
        allocated_vcpus=sum(s.vcpus for s in placed[h.name]),
        allocated_memory_mib=sum(s.memory_mib for s in placed[h.name]),
        facts=h.facts, macs=frozenset().union(*(vm_macs(s) for s in macs[h.name])))
        for h in hosts]
