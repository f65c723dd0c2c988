import pytest
from pydantic import ValidationError

from ferry.domain.specs import DiskSpec, KernelBoot, NicSpec, VmSpec

KERNEL = KernelBoot(kernel="/boot/vmlinuz")


def test_defaults_pin_a_migration_safe_cpu_model() -> None:
    spec = VmSpec(name="web1", kernel=KERNEL)
    assert spec.cpu_model == "Nehalem"
    assert spec.vcpus == 1 and spec.memory_mib == 256


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", ""])
def test_disk_path_that_escapes_its_datastore_is_refused(path: str) -> None:
    with pytest.raises(ValidationError, match="escapes its datastore"):
        DiskSpec(name="root", datastore="shared", path=path)


def test_disk_path_inside_datastore_is_normalised() -> None:
    assert DiskSpec(name="root", datastore="shared", path="vms/./a.qcow2").path == "vms/a.qcow2"


@pytest.mark.parametrize("mac,msg", [("52:54:00:12:34", "not of the form"),
                                     ("01:00:5e:00:00:01", "multicast"),
                                     ("00:00:00:00:00:00", "not a NIC's address"),
                                     ("zz:54:00:12:34:56", "not of the form")])
def test_bad_mac_is_refused_with_the_reason(mac: str, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        NicSpec(name="nic0", network="vmnet", mac=mac)


def test_mac_is_lowercased() -> None:
    assert NicSpec(name="n", network="vmnet", mac="52:54:00:AB:CD:EF").mac == "52:54:00:ab:cd:ef"


def test_vm_without_boot_source_is_refused() -> None:
    with pytest.raises(ValidationError, match="nothing to boot"):
        VmSpec(name="web1")


@pytest.mark.parametrize("name", ["Web1", "1web", "web_1", "a" * 40, ""])
def test_bad_vm_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        VmSpec(name=name, kernel=KERNEL)


def test_duplicate_macs_and_disk_names_are_refused() -> None:
    nic = NicSpec(name="a", network="vmnet", mac="52:54:00:00:00:01")
    with pytest.raises(ValidationError, match="share a MAC"):
        VmSpec(name="w", kernel=KERNEL, nics=(nic, nic.model_copy(update={"name": "b"})))
    disk = DiskSpec(name="d", datastore="shared", path="x.qcow2")
    with pytest.raises(ValidationError, match="disk names must be unique"):
        VmSpec(name="w", disks=(disk, disk))


@pytest.mark.parametrize("memory", [0, 16, -5])
def test_memory_out_of_range(memory: int) -> None:
    with pytest.raises(ValidationError, match="memory_mib"):
        VmSpec(name="w", kernel=KERNEL, memory_mib=memory)


def test_relative_kernel_path_is_refused() -> None:
    with pytest.raises(ValidationError, match="absolute path"):
        KernelBoot(kernel="vmlinuz")
