import pytest

from ferry.domain.compat import RefusalReason, check_host, check_migration
from ferry.domain.errors import Incompatible, NoCapacity, NotFound
from ferry.domain.inventory import HostSnapshot, HostState
from ferry.domain.placement import place
from ferry.domain.specs import DatastoreInfo, DiskSpec, HostFacts, KernelBoot, NicSpec, VmSpec


def facts(name: str, **kw: object) -> HostFacts:
    base: dict[str, object] = dict(
        name=name, address="10.0.0.1", accel="tcg", cpus=4, memory_mib=2048,
        memory_free_mib=2048, cpu_models=("Nehalem", "qemu64"), qemu_version="7.2.0",
        machine_types=("pc-i440fx-7.2",), machine_aliases={"pc": "pc-i440fx-7.2"},
        datastores=(DatastoreInfo(name="shared", path="/s", shared=True, total_bytes=1,
                                  free_bytes=1),), networks=("vmnet",))
    base.update(kw)
    return HostFacts.model_validate(base)


def host(name: str = "host2", state: HostState = HostState.CONNECTED, **kw: object
         ) -> HostSnapshot:
    f = facts(name, **{k: v for k, v in kw.items() if k not in ("alloc_mem", "macs")})
    return HostSnapshot(name=name, state=state, cpus=4, memory_mib=2048,
                        allocated_memory_mib=int(kw.get("alloc_mem", 0)),  # type: ignore[call-overload]
                        facts=f, macs=frozenset(kw.get("macs", ())))  # type: ignore[arg-type]


SPEC = VmSpec(name="web1", memory_mib=512, kernel=KernelBoot(kernel="/k"),
              disks=(DiskSpec(name="root", datastore="shared", path="w.qcow2"),),
              nics=(NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:01"),),
              machine="pc-i440fx-7.2")


def reasons(refusals: list) -> set[RefusalReason]:  # type: ignore[type-arg]
    return {r.reason for r in refusals}


def test_compatible_host_has_no_refusal() -> None:
    assert check_migration(SPEC, "host1", host()) == []


@pytest.mark.parametrize("target,reason", [
    (host("host1"), RefusalReason.SAME_HOST),
    (host(state=HostState.DISCONNECTED), RefusalReason.HOST_NOT_CONNECTED),
    (host(state=HostState.MAINTENANCE), RefusalReason.HOST_IN_MAINTENANCE),
    (host(alloc_mem=1800), RefusalReason.NO_MEMORY),
    (host(datastores=()), RefusalReason.DATASTORE_MISSING),
    (host(datastores=(DatastoreInfo(name="shared", path="/s", shared=True, total_bytes=1,
                                    free_bytes=1, direct_io=False),)),
     RefusalReason.NO_DIRECT_IO),
    (host(networks=("other",)), RefusalReason.NETWORK_MISSING),
    (host(macs={"52:54:00:00:00:01"}), RefusalReason.MAC_IN_USE),
    (host(cpu_models=("qemu64",)), RefusalReason.CPU_MODEL),
    (host(machine_types=("pc-i440fx-6.2",), machine_aliases={}), RefusalReason.MACHINE_TYPE),
])
def test_each_refusal_names_its_reason(target: HostSnapshot, reason: RefusalReason) -> None:
    refusals = check_migration(SPEC, "host1", target)
    assert reason in reasons(refusals)
    assert all(r.message for r in refusals)


def test_host_without_facts_is_refused() -> None:
    snap = HostSnapshot(name="h", state=HostState.CONNECTED, cpus=1, memory_mib=1)
    assert reasons(check_host(SPEC, snap)) == {RefusalReason.HOST_NOT_CONNECTED}


def test_place_picks_first_host_with_room() -> None:
    hosts = [host("host1", alloc_mem=2000), host("host2")]
    assert place(SPEC, hosts) == "host2"


def test_place_on_named_host_or_say_why_not() -> None:
    assert place(SPEC, [host("host1"), host("host2")], "host1") == "host1"
    with pytest.raises(NotFound, match="no host 'host9'"):
        place(SPEC, [host("host1")], "host9")
    with pytest.raises(Incompatible, match="MiB free"):
        place(SPEC, [host("host1", alloc_mem=2000)], "host1")


def test_memory_larger_than_any_host() -> None:
    big = SPEC.model_copy(update={"memory_mib": 4096})
    with pytest.raises(NoCapacity, match="largest host has 2048 MiB"):
        place(big, [host("host1"), host("host2")])


def test_no_room_anywhere_lists_reasons() -> None:
    with pytest.raises(NoCapacity, match="no host can run"):
        place(SPEC, [host("host1", alloc_mem=2000)])


def test_a_writeback_disk_does_not_need_direct_io() -> None:
    no_odirect = host(datastores=(DatastoreInfo(name="shared", path="/s", shared=True,
                                                total_bytes=1, free_bytes=1,
                                                direct_io=False),))
    [refusal] = check_migration(SPEC, "host1", no_odirect)
    assert "does not support O_DIRECT" in refusal.message
    assert "set its cache to writeback" in refusal.message
    writeback = SPEC.model_copy(update={"disks": (DiskSpec(
        name="root", datastore="shared", path="w.qcow2", cache="writeback"),)})
    assert check_migration(writeback, "host1", no_odirect) == []
