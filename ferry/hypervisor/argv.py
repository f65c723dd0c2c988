"""A VmSpec becomes a QEMU command line (a list: no shell ever sees it)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ferry.domain.errors import InvalidInput
from ferry.domain.networks import USER_NETWORK, tap_name
from ferry.domain.specs import DiskCache, DiskFormat, DiskSpec, VmSpec

QEMU_BINARY = "qemu-system-x86_64"
RAM_BACKEND = "ram0"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class RunPaths:
    """Where one QEMU process keeps its sockets and logs on its host."""

    directory: Path

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def spec_file(self) -> Path:
        return self.directory / "spec.json"


def disk_path(disk: DiskSpec, datastores: Mapping[str, str]) -> Path:
    if disk.datastore not in datastores:
        raise InvalidInput(f"this host does not see datastore {disk.datastore} "
                           f"(disk {disk.name})", f"use one of: {', '.join(datastores)}")
    root = Path(datastores[disk.datastore]).resolve()
    path = (root / disk.path).resolve()
    if root != path and root not in path.parents:  # e.g. through a symlink
        raise InvalidInput(f"disk {disk.name} ({disk.path}) resolves outside datastore "
                           f"{disk.datastore}", "give a path inside the datastore")
    return path


def boot_file(path: str, datastores: Mapping[str, str]) -> Path:
    """A kernel or initrd, only from inside a datastore: QEMU runs as root and shows what
    it boots, so `--initrd /etc/shadow` must never be opened."""
    resolved = Path(path).resolve()
    for root in datastores.values():
        base = Path(root).resolve()
        if base in resolved.parents:
            return resolved
    raise InvalidInput(f"boot file {path} is not inside a datastore of this host",
                       "put kernel and initrd on a datastore (e.g. the lab's "
                       "shared:images/) and name them by their path there")


def file_cache(cache: DiskCache) -> dict[str, bool]:
    """The `cache` option of a file node."""
    return {"direct": cache is DiskCache.NONE}


def _no_backing(disk: DiskSpec) -> dict[str, None]:
    return {"backing": None} if disk.format is DiskFormat.QCOW2 else {}


def build_argv(spec: VmSpec, *, machine: str, accel: str, paths: RunPaths,
               datastores: Mapping[str, str], incoming: bool = False,
               network_mtus: Mapping[str, int] | None = None,
               binary: str = QEMU_BINARY) -> list[str]:
    """The full argv; `machine` is the resolved, versioned machine type; `network_mtus`
    the MTU of each VM network this host provides."""
    network_mtus = network_mtus or {}
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-uuid", spec.uuid,
        # Guest RAM in a shared memfd: the agent can compare a migration's paused copy
        # with the source's and repair it (guest_ram.py, domain/memory_check.py).
        "-machine", f"{machine},accel={accel},memory-backend={RAM_BACKEND}",
        "-object", f"memory-backend-memfd,id={RAM_BACKEND},size={spec.memory_mib}M,share=on",
        "-cpu", spec.cpu_model,
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-pidfile", str(paths.pidfile),
        "-chardev", f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={paths.serial_log}",
        "-serial", "chardev:serial0",
        # seccomp: no exec (an `exec:` migration URI would spawn a shell), no setuid,
        # no obsolete syscalls, no scheduler or resource games.
        "-sandbox", SANDBOX,
    ]
    if spec.kernel is not None:
        argv += ["-kernel", str(boot_file(spec.kernel.kernel, datastores))]
        if spec.kernel.initrd:
            argv += ["-initrd", str(boot_file(spec.kernel.initrd, datastores))]
        if spec.kernel.append:
            argv += ["-append", spec.kernel.append]
    for index, disk in enumerate(spec.disks):
        file_node, fmt_node = f"file-{disk.name}", f"disk-{disk.name}"
        argv += [
            "-blockdev", json.dumps({"driver": "file", "node-name": file_node,
                                     "filename": str(disk_path(disk, datastores)),
                                     "cache": file_cache(disk.cache)}),
            # No backing file is ever opened from an image header (as root, anywhere).
            "-blockdev", json.dumps({"driver": disk.format.value, "node-name": fmt_node,
                                     "file": file_node} | _no_backing(disk)),
            "-device", f"virtio-blk-pci,drive={fmt_node},id={disk.name}"
                       + (",bootindex=1" if index == 0 and spec.kernel is None else ""),
        ]
    for nic in spec.nics:
        device = f"virtio-net-pci,netdev=net-{nic.name},mac={nic.mac},id={nic.name}"
        if nic.network == USER_NETWORK:
            argv += ["-netdev", f"user,id=net-{nic.name}", "-device", device]
            continue
        if nic.network not in network_mtus:
            raise InvalidInput(f"this host has no network {nic.network} (NIC {nic.name})",
                               "create the network, or use --nic user")
        # The agent made the tap and put it on the network's bridge; QEMU only opens it
        # (no scripts: the sandbox forbids spawning anything). host_mtu tells the guest
        # the segment's MTU (VXLAN takes 50 bytes of the underlay's 1500).
        argv += ["-netdev", f"tap,id=net-{nic.name},ifname={tap_name(spec.uuid, nic.name)},"
                            "script=no,downscript=no",
                 "-device", f"{device},host_mtu={network_mtus[nic.network]}"]
    if incoming:
        # -S: the destination stays paused when the stream ends; it runs guest code only
        # once the control plane has recorded the switch and sends `cont` (as libvirt).
        argv += ["-S", "-incoming", "defer"]
    return argv
