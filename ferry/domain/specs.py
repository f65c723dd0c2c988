"""What a VM, a host and a datastore are: frozen, validated value objects.

Validation here is the single place where user input is judged; messages name the
field, the bad value and what would be accepted.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")

DEFAULT_CPU_MODEL = "Nehalem"  # survives TCG migration (FACTS.md: qemu64/max corrupt guests)
# QEMU's x86 machines with a PCI bus: the i440FX and Q35 families and their aliases.
PCI_MACHINE = re.compile(r"^(pc|q35|pc-i440fx-[0-9]+(\.[0-9]+)*|pc-q35-[0-9]+(\.[0-9]+)*)$")
DEFAULT_MACHINE = "pc"  # an alias; resolved to a versioned type when the VM is created


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class DiskCache(StrEnum):
    """How QEMU opens the image file.

    none: O_DIRECT, bypassing the host page cache (Proxmox's default; with it a VM on
    shared storage can move between hosts without stale cached pages, and a disk copy
    does not compete with the page cache). writeback: through the host page cache."""

    NONE = "none"
    WRITEBACK = "writeback"


class Provisioning(StrEnum):
    THIN = "thin"  # allocate on write
    THICK = "thick"  # allocate the whole virtual size up front


class DiskSpec(Frozen):
    name: Name
    datastore: Name
    path: str = Field(description="image path relative to the datastore root")
    format: DiskFormat = DiskFormat.QCOW2
    provisioning: Provisioning = Provisioning.THIN
    cache: DiskCache = DiskCache.NONE

    @field_validator("path")
    @classmethod
    def _inside_datastore(cls, value: str) -> str:
        return check_relative_path(value)


class NicSpec(Frozen):
    name: Name
    network: Name
    mac: str

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        mac = value.lower()
        if not MAC_RE.match(mac):
            raise ValueError(f"MAC address {value!r} is not of the form 52:54:00:12:34:56")
        if mac == "00:00:00:00:00:00":
            raise ValueError("MAC address 00:00:00:00:00:00 is not a NIC's address (QEMU "
                             "would put its default in place); use 52:54:00:xx:xx:xx")
        if int(mac[:2], 16) & 1:
            raise ValueError(f"MAC address {value!r} is a multicast address; use 52:54:00:xx:xx:xx")
        return mac


class KernelBoot(Frozen):
    """Direct kernel boot: files that every host the VM may run on can read."""

    kernel: str
    initrd: str | None = None
    append: str = ""

    @field_validator("kernel", "initrd")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{value!r} must be an absolute path readable on the hosts")
        return value


class VmSpec(Frozen):
    name: Name
    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=256, ge=32, le=1024 * 1024)
    cpu_model: str = DEFAULT_CPU_MODEL
    machine: str = DEFAULT_MACHINE
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    kernel: KernelBoot | None = None

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            return str(uuidlib.UUID(value))
        except ValueError:
            raise ValueError(f"uuid {value!r} is not a UUID") from None

    @field_validator("cpu_model", "machine")
    @classmethod
    def _token(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", value):
            raise ValueError(f"{value!r} is not a QEMU model name")
        return value

    @field_validator("machine")
    @classmethod
    def _pci_machine(cls, value: str) -> str:
        # Every VM gets virtio PCI devices (disks, NICs): QEMU's machines without a PCI
        # bus (none, isapc, microvm, x-remote) failed to start, as a 502 (found fuzzing).
        if not PCI_MACHINE.match(value):
            raise ValueError(f"machine type {value!r} has no PCI bus for the VM's virtio "
                             "devices; use pc or q35 (or a versioned pc-i440fx-… or "
                             "pc-q35-…)")
        return value

    @model_validator(mode="after")
    def _bootable_and_unique(self) -> VmSpec:
        if self.kernel is None and not self.disks:
            raise ValueError("the VM has nothing to boot: give a disk or a kernel")
        for kind, names in (("disk", [d.name for d in self.disks]),
                            ("NIC", [n.name for n in self.nics])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{kind} names must be unique, repeated: {sorted(dup)}")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("two NICs of the VM share a MAC address")
        return self


def check_relative_path(value: str) -> str:
    """Refuse a datastore path that could escape its datastore."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\x00" in value:
        raise ValueError(
            f"path {value!r} escapes its datastore; give a relative path without '..'"
        )
    return str(path)


class DatastoreInfo(Frozen):
    name: Name
    path: str
    shared: bool
    total_bytes: int
    free_bytes: int
    direct_io: bool = True  # its filesystem takes O_DIRECT (disk cache none)

    def cache_problem(self, disk: DiskSpec) -> str | None:
        """Why `disk` cannot live here with its cache mode, or None."""
        if disk.cache is DiskCache.NONE and not self.direct_io:
            return (f"datastore {self.name} does not support O_DIRECT, which disk "
                    f"{disk.name} needs (cache none); set its cache to writeback, or use "
                    "another datastore")
        return None


class HostFacts(Frozen):
    """What an agent reports about its host, probed at agent start and on request."""

    name: Name
    address: str
    accel: str
    cpus: int
    memory_mib: int
    memory_free_mib: int
    cpu_models: tuple[str, ...]
    qemu_version: str
    machine_types: tuple[str, ...]
    machine_aliases: dict[str, str] = Field(default_factory=dict)
    datastores: tuple[DatastoreInfo, ...] = ()
    # The VM networks the host provides, and the digest of each as it was applied
    # (ferry/domain/networks.py), by which the control plane sees what to push.
    networks: tuple[str, ...] = ()
    network_digests: dict[str, str] = Field(default_factory=dict)
    # Each of those networks' segment as applied: (VNI, MTU).
    network_segments: dict[str, tuple[int, int]] = Field(default_factory=dict)
    # The largest VM network MTU the link under its VXLAN carries (None: not known).
    network_mtu_max: int | None = None
    # The agent holds a cluster certificate QEMU can use for TLS migration streams.
    migration_tls: bool = False

    def resolve_machine(self, machine: str) -> str | None:
        if machine in self.machine_aliases:
            return self.machine_aliases[machine]
        return machine if machine in self.machine_types else None

    def datastore(self, name: str) -> DatastoreInfo | None:
        return next((d for d in self.datastores if d.name == name), None)
