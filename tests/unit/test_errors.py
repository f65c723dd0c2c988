"""Errors that used to surface as HTTP 500 (issue 9, defect 10 of the issue / 6 of the
brief): every one now has a status, a class on the client side, and a clear message."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ferry.agent.config import AgentConfig
from ferry.agent.host import HostRuntime, write_spec
from ferry.domain.errors import Conflict, HostUnavailable, InvalidInput
from ferry.domain.migration import Phase, Progress, SourceStatus
from ferry.domain.specs import KernelBoot, VmSpec
from ferry.hypervisor.argv import RunPaths
from ferry.hypervisor.errors import HypervisorError, MonitorError, NotRunning, QemuStartError
from ferry.hypervisor.images import image_info
from ferry.hypervisor.monitor import progress_from_reply
from ferry.lab.config import LabConfig, config_for_up
from ferry.wire import error_body, error_from_body, status_for
from tests.unit.fake_cluster import FakeCluster
from tests.unit.fake_cluster import spec as fake_spec


@pytest.mark.parametrize("exc,status,cls", [
    (HypervisorError("qemu-img failed"), 502, HostUnavailable),
    (MonitorError("QMP cont failed"), 502, HostUnavailable),
    (QemuStartError("QEMU exited at start"), 502, HostUnavailable),
    (NotRunning("VM web1 has no running QEMU"), 409, Conflict),
])
def test_hypervisor_errors_have_a_status_and_come_back_as_their_domain_class(
        exc: HypervisorError, status: int, cls: type) -> None:
    assert status_for(exc) == status
    back = error_from_body(status, error_body(exc))
    assert type(back) is cls and back.problem == exc.problem


@pytest.fixture
def vmdk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "1M"], check=True)
    return path


async def test_unknown_image_format_is_invalid_input(vmdk: Path) -> None:
    path = vmdk
    with pytest.raises(InvalidInput, match="is vmdk, which Ferry does not run") as err:
        await image_info(path)
    assert "qemu-img convert" in err.value.fix
    assert status_for(err.value) == 422


@pytest.mark.parametrize("word,status", [
    ("postcopy-recover-setup", SourceStatus.POSTCOPY_RECOVER_SETUP),
    ("wait-unplug", SourceStatus.WAIT_UNPLUG),
    ("pre-switchover", SourceStatus.PRE_SWITCHOVER),
    ("some-state-of-qemu-12", SourceStatus.UNKNOWN),
])
def test_any_qemu_migration_status_is_read_never_crashed_on(word: str,
                                                            status: SourceStatus) -> None:
    progress = progress_from_reply({"status": word})
    assert progress.status is status and progress.qemu_status == word
    assert progress.status.in_progress and not progress.status.finished
    again = Progress.model_validate_json(progress.model_dump_json())
    assert again == progress


async def test_a_migration_keeps_polling_through_statuses_it_does_not_know(
        tmp_path: Path) -> None:
    cluster = await FakeCluster.open(tmp_path)
    try:
        await cluster.add_running_vm(fake_spec("web1"), "host1")
        cluster.agents["host1"].vms["web1"].script = [
            SourceStatus.ACTIVE, SourceStatus.UNKNOWN, SourceStatus.WAIT_UNPLUG,
            SourceStatus.PRE_SWITCHOVER, SourceStatus.COMPLETED]
        rec = await cluster.orchestrator.start("web1", "host2")
        done = await cluster.orchestrator.wait(rec.id, 30)
        assert done.phase is Phase.COMPLETED, done.reason
        assert cluster.agents["host1"].calls.count("progress") >= 5
    finally:
        await cluster.close()


def spec() -> VmSpec:
    return VmSpec(name="web1", kernel=KernelBoot(kernel="/k"))


def test_spec_json_is_replaced_whole(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    write_spec(paths, spec())
    write_spec(paths, spec().model_copy(update={"memory_mib": 512}))
    assert VmSpec.model_validate_json(paths.spec_file.read_text()).memory_mib == 512
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]  # no temp file left


async def test_agent_starts_despite_a_torn_spec_json(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    runtime = HostRuntime(AgentConfig(name="host1", run_dir=tmp_path, accel="tcg"))
    torn = runtime.vms_dir / "web1"
    torn.mkdir(parents=True)
    (torn / "spec.json").write_text('{"name": "web1", "memo')
    await runtime._adopt()
    assert await runtime.list_vms() == []
    assert "not adopting" in caplog.text and str(torn) in caplog.text
    assert (torn / "spec.json").exists()  # left for an operator, not deleted


def test_lab_up_with_another_shape_refuses_and_says_how(tmp_path: Path) -> None:
    existing = LabConfig.default(tmp_path, 3)
    with pytest.raises(Conflict, match=r"a lab with 3 hosts .* cannot become 2 hosts") as err:
        config_for_up(tmp_path, existing, 2, None, None)
    assert "ferry lab down" in err.value.fix and str(tmp_path) in err.value.fix
    with pytest.raises(Conflict, match="1024 MiB per host"):
        config_for_up(tmp_path, existing, None, None, 1024)
    assert config_for_up(tmp_path, existing, None, None, None) is existing
    assert config_for_up(tmp_path, existing, 3, 4, 2048) is existing
    fresh = config_for_up(tmp_path, None, 2, None, None)
    assert len(fresh.hosts) == 2 and fresh.hosts[0].memory_mib == 2048
