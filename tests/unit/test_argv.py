import json
from pathlib import Path

import pytest

from ferry.domain.errors import InvalidInput
from ferry.domain.networks import tap_name
from ferry.domain.specs import DiskSpec, KernelBoot, NicSpec, VmSpec
from ferry.hypervisor.argv import RunPaths, build_argv, disk_path

PATHS = RunPaths(Path("/run/ferry/vms/web1"))


def argv_of(spec: VmSpec, **kw: object) -> list[str]:
    return build_argv(spec, machine="pc-i440fx-7.2", accel="tcg", paths=PATHS,
                      datastores={"shared": "/srv/shared"}, **kw)  # type: ignore[arg-type]


def value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_kernel_boot_argv() -> None:
    spec = VmSpec(name="web1", vcpus=2, memory_mib=512, cpu_model="Nehalem",
                  kernel=KernelBoot(kernel="/srv/shared/k", initrd="/srv/shared/i",
                                    append="console=ttyS0 a=b"))
    argv = argv_of(spec)
    assert argv[0] == "qemu-system-x86_64"
    assert value_after(argv, "-machine") == ["pc-i440fx-7.2,accel=tcg,memory-backend=ram0"]
    # guest RAM in a shared memfd of the VM's size (the memory check reads it)
    assert value_after(argv, "-object") == [
        "memory-backend-memfd,id=ram0,size=512M,share=on"]
    assert value_after(argv, "-cpu") == ["Nehalem"]
    assert value_after(argv, "-smp") == ["2"]
    assert value_after(argv, "-m") == ["512M"]
    assert value_after(argv, "-uuid") == [spec.uuid]
    assert value_after(argv, "-kernel") == ["/srv/shared/k"]
    assert value_after(argv, "-initrd") == ["/srv/shared/i"]
    assert value_after(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    # the command line stays one argument: no shell splits it
    assert value_after(argv, "-append") == ["console=ttyS0 a=b"]
    assert "-nodefaults" in argv and "-incoming" not in argv
    assert any(str(PATHS.qmp_socket) in a for a in value_after(argv, "-chardev"))
    assert any(str(PATHS.serial_log) in a for a in value_after(argv, "-chardev"))


def test_incoming_adds_defer() -> None:
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/srv/shared/k"))
    argv = argv_of(spec, incoming=True)
    assert value_after(argv, "-incoming") == ["defer"]
    assert "-S" in argv  # paused until Ferry resumes it, never on its own
    assert "-S" not in argv_of(spec)


def test_disks_and_nics() -> None:
    spec = VmSpec(name="web1",
                  disks=(DiskSpec(name="root", datastore="shared", path="vms/web1.qcow2"),
                         DiskSpec(name="data", datastore="shared", path="d.raw", format="raw",
                                  cache="writeback")),
                  nics=(NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:07"),
                        NicSpec(name="nic1", network="user", mac="52:54:00:00:00:08")))
    argv = argv_of(spec, network_mtus={"vmnet": 1450})
    blockdevs = [json.loads(b) for b in value_after(argv, "-blockdev")]
    assert blockdevs[0] == {"driver": "file", "node-name": "file-root",
                            "filename": "/srv/shared/vms/web1.qcow2",
                            "cache": {"direct": True}}  # cache=none is the default
    assert blockdevs[2]["cache"] == {"direct": False}  # writeback: the page cache
    assert blockdevs[1]["driver"] == "qcow2" and blockdevs[3]["driver"] == "raw"
    devices = value_after(argv, "-device")
    assert "virtio-blk-pci,drive=disk-root,id=root,bootindex=1" in devices
    assert "virtio-blk-pci,drive=disk-data,id=data" in devices
    # A bridged NIC opens the tap the agent made (no scripts), with the segment's MTU;
    # `user` is QEMU's user-mode networking.
    assert ("virtio-net-pci,netdev=net-nic0,mac=52:54:00:00:00:07,id=nic0,host_mtu=1450"
            in devices)
    netdevs = value_after(argv, "-netdev")
    assert netdevs[0] == (f"tap,id=net-nic0,ifname={tap_name(spec.uuid, 'nic0')},"
                          "script=no,downscript=no")
    assert netdevs[1] == "user,id=net-nic1"
    assert "virtio-net-pci,netdev=net-nic1,mac=52:54:00:00:00:08,id=nic1" in devices


def test_a_nic_on_a_network_the_host_lacks_is_refused() -> None:
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/srv/shared/k"),
                  nics=(NicSpec(name="nic0", network="other", mac="52:54:00:00:00:07"),))
    with pytest.raises(InvalidInput, match="no network other"):
        argv_of(spec, network_mtus={"vmnet": 1450})


def test_disk_path_refuses_symlink_style_escape() -> None:
    disk = DiskSpec.model_construct(name="d", datastore="shared", path="../../etc/x")
    with pytest.raises(InvalidInput, match="resolves outside datastore shared"):
        disk_path(disk, {"shared": "/srv/shared"})


def test_qcow2_never_opens_a_backing_file() -> None:
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/srv/shared/k"),
                  disks=(DiskSpec(name="root", datastore="shared", path="web1.qcow2"),))
    nodes = [json.loads(a) for a in value_after(argv_of(spec), "-blockdev")]
    fmt = next(n for n in nodes if n["driver"] == "qcow2")
    assert "backing" in fmt and fmt["backing"] is None


def test_disk_path_on_a_datastore_the_host_lacks_is_invalid_input() -> None:
    disk = DiskSpec(name="d", datastore="fast", path="x.qcow2")
    with pytest.raises(InvalidInput, match="does not see datastore fast") as err:
        disk_path(disk, {"shared": "/srv/shared"})
    assert err.value.fix == "use one of: shared"
