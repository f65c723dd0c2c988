"""Can this VM run on that host? Every refusal carries one clear reason.

Used for placement on create and for a migration's CHECKING stage.
"""

from __future__ import annotations

from enum import StrEnum

from ferry.domain.inventory import HostSnapshot, HostState
from ferry.domain.networks import USER_NETWORK
from ferry.domain.specs import Frozen, VmSpec


class RefusalReason(StrEnum):
    SAME_HOST = "same_host"
    HOST_NOT_CONNECTED = "host_not_connected"
    HOST_IN_MAINTENANCE = "host_in_maintenance"
    NO_MEMORY = "no_memory"
    NO_CPU = "no_cpu"
    DATASTORE_MISSING = "datastore_missing"
    NO_DIRECT_IO = "no_direct_io"
    NETWORK_MISSING = "network_missing"
    MAC_IN_USE = "mac_in_use"
    CPU_MODEL = "cpu_model"
    MACHINE_TYPE = "machine_type"
    NO_TLS = "no_tls"
    TARGET_PATH_EXISTS = "target_path_exists"


class Refusal(Frozen):
    reason: RefusalReason
    message: str


def check_host(spec: VmSpec, host: HostSnapshot, *, counted: bool = False) -> list[Refusal]:
    """All reasons `spec` cannot run on `host`; empty when it can.

    `counted` says the VM's resources are already in the host's allocation (it is
    the VM's own host), so headroom is not required twice.
    """
    refusals: list[Refusal] = []

    def refuse(reason: RefusalReason, message: str) -> None:
        refusals.append(Refusal(reason=reason, message=message))

    if host.state is HostState.MAINTENANCE:
        refuse(RefusalReason.HOST_IN_MAINTENANCE,
               f"host {host.name} is in maintenance mode; take it out of maintenance first")
    elif host.state is not HostState.CONNECTED:
        refuse(RefusalReason.HOST_NOT_CONNECTED,
               f"host {host.name} is not connected; check that its agent is running")
    facts = host.facts
    if facts is None or refusals:
        if facts is None and not refusals:
            refuse(RefusalReason.HOST_NOT_CONNECTED,
                   f"host {host.name} has not reported its facts yet; wait for its agent")
        return refusals
    need_mem = 0 if counted else spec.memory_mib
    need_cpu = 0 if counted else spec.vcpus
    if host.free_memory_mib < need_mem:
        refuse(RefusalReason.NO_MEMORY,
               f"host {host.name} has {host.free_memory_mib} MiB free, the VM needs "
               f"{spec.memory_mib} MiB; free memory there or pick another host")
    if host.free_vcpus < need_cpu:
        refuse(RefusalReason.NO_CPU,
               f"host {host.name} has {host.free_vcpus} vCPU slots free, the VM needs "
               f"{spec.vcpus}; pick another host")
    for disk in spec.disks:
        datastore = facts.datastore(disk.datastore)
        if datastore is None:
            refuse(RefusalReason.DATASTORE_MISSING,
                   f"host {host.name} does not see datastore {disk.datastore} "
                   f"(disk {disk.name}); pick a host that mounts it")
        elif (problem := datastore.cache_problem(disk)) is not None:
            refuse(RefusalReason.NO_DIRECT_IO, f"host {host.name}: {problem}")
    for nic in spec.nics:
        if nic.network != USER_NETWORK and nic.network not in facts.networks:
            refuse(RefusalReason.NETWORK_MISSING,
                   f"host {host.name} has no network {nic.network} (NIC {nic.name}); "
                   f"it has {', '.join(facts.networks) or 'none'}")
    if not counted:
        for nic in spec.nics:
            if nic.mac in host.macs:
                refuse(RefusalReason.MAC_IN_USE,
                       f"MAC {nic.mac} of NIC {nic.name} is already used by a VM on "
                       f"host {host.name}; give the NIC another MAC")
    if spec.cpu_model not in facts.cpu_models:
        refuse(RefusalReason.CPU_MODEL,
               f"host {host.name} cannot provide CPU model {spec.cpu_model}; choose one "
               f"of the cluster baseline models")
    if facts.resolve_machine(spec.machine) is None:
        refuse(RefusalReason.MACHINE_TYPE,
               f"host {host.name} has no machine type {spec.machine} "
               f"(its QEMU is {facts.qemu_version}); upgrade QEMU there or pick another host")
    return refusals


def check_migration(spec: VmSpec, source: str, target: HostSnapshot) -> list[Refusal]:
    if target.name == source:
        return [Refusal(reason=RefusalReason.SAME_HOST,
                        message=f"the VM already runs on {source}; name another host")]
    return check_host(spec, target)
