"""Probe what this host can do: accelerator, CPU models, machine types, memory, disks."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferry.agent.config import AgentConfig
from ferry.agent.networks import HostNetworks
from ferry.domain.specs import DatastoreInfo, HostFacts
from ferry.hypervisor.argv import QEMU_BINARY, RunPaths
from ferry.hypervisor.errors import QemuStartError
from ferry.hypervisor.process import QemuProcess
from ferry.pki import HostTls

log = logging.getLogger("ferry.agent")
PROBE_ATTEMPTS = 3
PROBE_CONNECT_S = 5.0  # a machine-none QEMU greets within ~50 ms


@dataclass(frozen=True)
class QemuCapabilities:
    version: str
    cpu_models: tuple[str, ...]
    machine_types: tuple[str, ...]
    machine_aliases: dict[str, str]


def detect_accel(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    # Nested KVM here hangs guests (FACTS.md); only trust KVM when it is openable.
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


async def probe_qemu(accel: str, attempts: int = PROBE_ATTEMPTS) -> QemuCapabilities:
    """Ask a throwaway QEMU (machine none) what it supports; a QEMU that never answers
    on QMP (seen once in hundreds of agent starts: the socket accepted, no greeting for
    15 s) is killed and another one asked."""
    for attempt in range(1, attempts + 1):
        try:
            return await _probe_once(accel)
        except QemuStartError as exc:
            if attempt == attempts:
                raise
            log.warning("QEMU capability probe failed (%s); trying a new QEMU", exc.problem)
    raise AssertionError("unreachable")


async def _probe_once(accel: str) -> QemuCapabilities:
    with tempfile.TemporaryDirectory(prefix="ferry-probe-") as tmp:
        paths = RunPaths(Path(tmp))
        argv = [QEMU_BINARY, "-machine", f"none,accel={accel}", "-nodefaults",
                "-display", "none", "-chardev",
                f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control"]
        proc = QemuProcess("probe", argv, paths)
        monitor = await proc.start(connect_timeout_s=PROBE_CONNECT_S)
        try:
            version = await monitor.execute("query-version")
            qemu = version["qemu"]
            models = await monitor.usable_cpu_models()
            machines, aliases = await monitor.machines()
        finally:
            await monitor.quit()
            await monitor.close()
            await proc.kill()
    return QemuCapabilities(version=f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}",
                            cpu_models=tuple(models), machine_types=tuple(machines),
                            machine_aliases=aliases)


def meminfo_mib() -> tuple[int, int]:
    values: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) // 1024
    return values["MemTotal"], values.get("MemAvailable", values["MemFree"])


@functools.cache
def takes_direct_io(directory: str) -> bool:
    """Whether files there can be opened with O_DIRECT (disk cache none). Some
    filesystems refuse it (tmpfs before Linux 6.6); QEMU would then fail to open the disk."""
    try:
        fd, name = tempfile.mkstemp(prefix=".ferry-odirect-", dir=directory)
    except OSError:
        return True  # cannot tell (read-only?); QEMU will say more if it matters
    os.close(fd)
    try:
        os.close(os.open(name, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(name)


def host_facts(config: AgentConfig, accel: str, qemu: QemuCapabilities,
               used_memory_mib: int, networks: HostNetworks) -> HostFacts:
    total, free = meminfo_mib()
    capacity = config.memory_mib or total
    digests = networks.digests()
    datastores = []
    for ds in config.datastores:
        usage = shutil.disk_usage(ds.path)
        datastores.append(DatastoreInfo(name=ds.name, path=ds.path, shared=ds.shared,
                                        total_bytes=usage.total, free_bytes=usage.free,
                                        direct_io=takes_direct_io(ds.path)))
    return HostFacts(
        name=config.name, address=config.migration_address or config.listen_host,
        accel=accel, cpus=config.cpus or os.cpu_count() or 1, memory_mib=capacity,
        memory_free_mib=max(0, min(free, capacity - used_memory_mib)),
        cpu_models=qemu.cpu_models, qemu_version=qemu.version,
        machine_types=qemu.machine_types, machine_aliases=qemu.machine_aliases,
        datastores=tuple(datastores), networks=tuple(digests), network_digests=digests,
        network_segments=networks.segments(), network_mtu_max=networks.max_mtu,
        migration_tls=HostTls(config.tls_path).enrolled())
