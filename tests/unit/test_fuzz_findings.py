"""Requests that schemathesis found answered with a 5xx (tests/integration/test_fuzz.py),
each pinned here: the control plane's API runs in-process (its real app, store and trust,
no agents), the agent's runtime over a stand-in QMP monitor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from ferry.agent.config import AgentConfig, DatastoreConfig
from ferry.agent.disk_moves import DiskMoves
from ferry.agent.disks import DiskOps
from ferry.agent.host import HostRuntime, VmRecord, check_kernel_image
from ferry.agent.models import MirrorRequest, NewDisk, StartOutgoing, Tune
from ferry.api.app import create_app
from ferry.api.schemas import RelocateRequest
from ferry.control.service import ControlPlane
from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.domain.errors import Conflict, InvalidInput
from ferry.domain.migration import Progress, SourceStatus, StreamOptions
from ferry.domain.specs import DiskSpec, KernelBoot, VmSpec
from ferry.hypervisor.argv import RunPaths
from ferry.hypervisor.process import ProcessState
from ferry.pki import ControlPki
from ferry.store import Store
from ferry.store.store import sqlite_url
from ferry.wire import status_for


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The control plane's app with an admin token, called as from 127.0.0.1."""
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    secret = new_secret()
    info = await store.security.add_token("admin", TokenRole.ADMIN, secret, None)
    control = ControlPlane(store, pki)
    # The API as a lone control plane serves it, its loops not started: leading,
    # and its job writes unfenced (no other replica's term to guard against).
    control.leadership.leading, control.store.fence = True, None
    app = create_app(control)
    async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
            headers={"authorization": f"Bearer {format_token(info.id, secret)}"}) as client:
        yield client
    await control.close()


async def test_event_page_beyond_any_event_id_is_invalid_input_not_500(
        api: httpx.AsyncClient) -> None:
    # Found by fuzzing: `before` beyond SQLite's 64-bit INTEGER reached the database
    # (OverflowError, HTTP 500).
    resp = await api.get("/v1/events", params={"before": 10**23})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "invalid_input"
    assert "before" in resp.json()["error"]["problem"]
    # The largest id there can be still pages (through every event).
    assert (await api.post("/v1/vms/nothing/start")).status_code == 404  # audited
    resp = await api.get("/v1/events", params={"before": 2**63 - 1})
    assert resp.status_code == 200, resp.text
    assert resp.json(), "every event is older than the largest possible id"


@dataclass
class StandInMonitor:
    """What QMP would answer for a VM with no migration under way."""

    status: SourceStatus = SourceStatus.NONE
    postcopy_capability: bool = False
    sent: list[tuple[str, Any]] = field(default_factory=list)

    async def query_migrate(self) -> Progress:
        return Progress(status=self.status)

    async def execute(self, command: str, arguments: Any = None) -> Any:
        self.sent.append((command, arguments))
        if command == "query-migrate-capabilities":
            return [{"capability": "postcopy-ram", "state": self.postcopy_capability}]
        return {}

    async def set_migration_parameters(self, params: dict[str, object]) -> None:
        self.sent.append(("migrate-set-parameters", params))


@dataclass
class StandInProcess:
    state: ProcessState = ProcessState.RUNNING
    pid: int | None = None  # no real process: the lab's fault hooks (off here) get None


def runtime_with(tmp_path: Path, monitor: StandInMonitor) -> HostRuntime:
    runtime = HostRuntime(AgentConfig(name="host1", run_dir=tmp_path, accel="tcg"))
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/k"))
    runtime._vms["web1"] = VmRecord(spec=spec, paths=RunPaths(tmp_path / "web1"),
                                    process=StandInProcess(),  # type: ignore[arg-type]
                                    monitor=monitor)  # type: ignore[arg-type]
    return runtime


@pytest.mark.parametrize("status,capability,reason", [
    (SourceStatus.NONE, True, "no migration under way"),
    (SourceStatus.COMPLETED, True, "no migration under way"),
    (SourceStatus.ACTIVE, False, "started without post-copy"),
])
async def test_postcopy_switch_qemu_would_refuse_is_a_conflict_that_changes_nothing(
        tmp_path: Path, status: SourceStatus, capability: bool, reason: str) -> None:
    # Found by fuzzing: POST /v1/vms/{name}/migration/tune {"postcopy": true} on a VM
    # that is not migrating was QEMU's refusal surfacing as a 502 (MonitorError), after
    # the other levers of the same request had already been set.
    monitor = StandInMonitor(status=status, postcopy_capability=capability)
    runtime = runtime_with(tmp_path, monitor)
    with pytest.raises(Conflict, match=reason) as err:
        await runtime.tune("web1", Tune(postcopy=True, downtime_ms=1000, throttle_pct=50))
    assert status_for(err.value) == 409
    assert [c for c, _ in monitor.sent
            if c in ("migrate-set-parameters", "migrate-start-postcopy")] == []


async def test_postcopy_switch_of_a_running_postcopy_migration_is_sent(
        tmp_path: Path) -> None:
    monitor = StandInMonitor(status=SourceStatus.ACTIVE, postcopy_capability=True)
    runtime = runtime_with(tmp_path, monitor)
    await runtime.tune("web1", Tune(postcopy=True))
    assert ("migrate-start-postcopy", None) in monitor.sent


async def test_cancelling_a_mirror_never_deletes_an_image_a_running_vm_uses(
        tmp_path: Path) -> None:
    # Seen while choosing what the agent fuzzing may send: a mirror cancel names a VM
    # and a target image and deletes the target; when that VM does not run on the host,
    # nothing checked that no other VM runs on the image (delete_image does check).
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "web1.qcow2").write_bytes(b"live disk")
    (shared / "partial.qcow2").write_bytes(b"partial copy")
    runtime = HostRuntime(AgentConfig(
        name="host1", run_dir=tmp_path / "run", accel="tcg",
        datastores=(DatastoreConfig(name="shared", path=str(shared), shared=True),)))
    live = DiskSpec(name="root", datastore="shared", path="web1.qcow2")
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/k"), disks=(live,))
    runtime._vms["web1"] = VmRecord(spec=spec, paths=RunPaths(tmp_path / "web1"),
                                    process=StandInProcess(),  # type: ignore[arg-type]
                                    monitor=StandInMonitor())  # type: ignore[arg-type]
    moves = DiskMoves(runtime)
    with pytest.raises(Conflict, match="in use by VM web1"):
        await moves.cancel_mirror("ghost", "job1", live)
    assert (shared / "web1.qcow2").read_bytes() == b"live disk"
    # A partial copy no VM uses still goes.
    await moves.cancel_mirror("ghost", "job1", DiskSpec(name="root", datastore="shared",
                                                        path="partial.qcow2"))
    assert not (shared / "partial.qcow2").exists()


def test_a_new_disk_of_negative_size_is_refused_before_qemu_img() -> None:
    # Seen in the same review: POST /v1/incoming with new_disks[].size -1 put "-1" into
    # qemu-img's argv (read as an option), and its failure came back as a 502.
    disk = DiskSpec(name="root", datastore="shared", path="web1.qcow2")
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        NewDisk(disk=disk, size=-512)
    # Nor a size that is no whole number of sectors (QEMU's virtual sizes always are).
    with pytest.raises(ValidationError, match="multiple of 512"):
        NewDisk(disk=disk, size=1966203)
    assert NewDisk(disk=disk, size=0).size == 0  # an empty image migrates too
    assert NewDisk(disk=disk, size=64 << 20).size == 64 << 20


@pytest.mark.parametrize("model,field,too_big", [
    (StreamOptions, "max_bandwidth_bytes_s", 2**63),
    (RelocateRequest, "bandwidth_bytes_s", 2**63),
    (MirrorRequest, "speed_bytes_s", 2**63),
    (StartOutgoing, "downtime_ms", 60_001),
])
def test_rates_and_limits_qemu_cannot_take_are_refused_at_the_door(
        model: type[BaseModel], field: str, too_big: int) -> None:
    # Values QMP refuses (checked on QEMU 7.2: max-bandwidth of 2**64, a block job speed
    # past int64, downtime-limit past 2,000,000 ms) were accepted at the door and
    # failed later inside the job as QMP errors (a 502 from the agent, a failed job).
    base: dict[str, Any] = {
        StreamOptions: {},
        RelocateRequest: {"vm": "web1", "datastore": "fast"},
        MirrorRequest: {"job_id": "j1", "target": {"name": "root", "datastore": "fast",
                                                   "path": "web1.qcow2"}},
        StartOutgoing: {"migration_id": "m1", "uri": "tcp:10.0.0.2:4444"},
    }[model]
    with pytest.raises(ValidationError, match="less than or equal to"):
        model.model_validate({**base, field: too_big})
    assert getattr(model.model_validate({**base, field: too_big - 1}), field) == too_big - 1


@pytest.mark.parametrize("machine", ["none", "isapc", "microvm", "x-remote", "pc-", "pc-q35"])
def test_a_machine_without_pci_is_refused_at_the_door(machine: str) -> None:
    # Found probing POST /v1/vms past the fuzz's guards: QEMU's machines without a PCI
    # bus cannot take the VM's virtio-*-pci devices; QEMU exited at start, a 502.
    with pytest.raises(ValidationError, match="has no PCI bus"):
        VmSpec(name="web1", kernel=KernelBoot(kernel="/k"), machine=machine)


@pytest.mark.parametrize("machine", ["pc", "q35", "pc-i440fx-7.2", "pc-q35-4.0.1"])
def test_pci_machines_are_taken(machine: str) -> None:
    assert VmSpec(name="web1", kernel=KernelBoot(kernel="/k"), machine=machine).machine \
        == machine


def test_only_a_kernel_image_is_booted_as_kernel(tmp_path: Path) -> None:
    # Found probing POST /v1/vms: the initramfs named as kernel made QEMU exit at start
    # ("linux kernel too old to load a ram disk"), a 502.
    bzimage = bytearray(0x400)
    bzimage[0x202:0x206] = b"HdrS"
    (tmp_path / "vmlinuz").write_bytes(bytes(bzimage))
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(0x300))
    (tmp_path / "initrd.img").write_bytes(b"\x1f\x8b\x08\x00" + bytes(0x300))
    (tmp_path / "tiny").write_bytes(b"x")
    check_kernel_image(tmp_path / "vmlinuz")
    check_kernel_image(tmp_path / "vmlinux")
    for name in ("initrd.img", "tiny"):
        with pytest.raises(InvalidInput, match="is not a Linux kernel"):
            check_kernel_image(tmp_path / name)


async def test_a_directory_is_no_image_to_read_or_delete(tmp_path: Path) -> None:
    # Found probing the agent: POST /v1/images/info naming a directory was qemu-img's
    # failure as a 502, POST /v1/images/delete an IsADirectoryError, a 500.
    shared = tmp_path / "shared"
    (shared / "images").mkdir(parents=True)
    ops = DiskOps({"shared": str(shared)})
    folder = DiskSpec(name="root", datastore="shared", path="images")
    with pytest.raises(InvalidInput, match="is not an image file"):
        await ops.info(folder)
    with pytest.raises(InvalidInput, match="is not an image file"):
        ops.delete(folder)
    assert (shared / "images").is_dir()
    missing = DiskSpec(name="root", datastore="shared", path="none.qcow2")
    assert await ops.info(missing) is None and ops.delete(missing) is False
