"""Snapshots of the cluster that placement and compatibility decisions read."""

from __future__ import annotations

from enum import StrEnum

from ferry.domain.specs import Frozen, HostFacts, VmSpec


class HostState(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    MAINTENANCE = "maintenance"
    STANDBY = "standby"  # powered down by DPM (or an operator); its agent is silent

    @property
    def reports(self) -> bool:
        """Its agent is expected to answer and report what runs there."""
        return self in (HostState.CONNECTED, HostState.MAINTENANCE)


class VmState(StrEnum):
    """Where a VM's one copy is in its life, as the control plane records it."""

    DEFINED = "defined"  # in the inventory, no QEMU process
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    CRASHED = "crashed"  # QEMU exited without being asked to
    UNKNOWN = "unknown"  # its host is not reachable


class HostSnapshot(Frozen):
    """A host as placement sees it: declared capacity, what is allotted, what it has."""

    name: str
    state: HostState
    cpus: int
    memory_mib: int
    allocated_vcpus: int = 0
    allocated_memory_mib: int = 0
    facts: HostFacts | None = None
    macs: frozenset[str] = frozenset()

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.allocated_memory_mib

    @property
    def free_vcpus(self) -> int:
        # vCPUs may be overcommitted 4:1, as is usual for general-purpose clusters.
        return self.cpus * 4 - self.allocated_vcpus


def vm_macs(spec: VmSpec) -> frozenset[str]:
    return frozenset(n.mac for n in spec.nics)
