"""CHECKING and encrypted streams: `required` refuses hosts without certificates and
touches nothing; `opportunistic` runs in the clear there; both ends learn their peer."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.domain.errors import Incompatible
from ferry.domain.migration import Phase, StreamOptions
from ferry.domain.streams import Encryption
from tests.unit.fake_cluster import FakeCluster, facts, spec


async def _cluster(tmp_path: Path, target_tls: bool) -> FakeCluster:
    hosts = {"host1": facts("host1"),
             "host2": facts("host2").model_copy(update={"migration_tls": target_tls})}
    cluster = await FakeCluster.open(tmp_path, hosts)
    await cluster.add_running_vm(spec("web1", mac="52:54:00:00:00:01"), "host1")
    return cluster


async def test_required_encryption_refuses_a_host_without_a_certificate(
        tmp_path: Path) -> None:
    cluster = await _cluster(tmp_path, target_tls=False)
    try:
        refusals = await cluster.orchestrator.check("web1", "host2")
        assert [r.reason.value for r in refusals] == ["no_tls"]
        with pytest.raises(Incompatible, match="encryption is required"):
            await cluster.orchestrator.start("web1", "host2")
        assert cluster.running_on("web1") == ["host1"]
        assert "web1" not in cluster.agents["host2"].vms  # nothing was prepared there
        (failed,) = await cluster.store.migrations()
        assert failed.phase is Phase.FAILED and not failed.encrypted
    finally:
        await cluster.close()


@pytest.mark.parametrize(("target_tls", "mode", "encrypted"), [
    (False, Encryption.OPPORTUNISTIC, False), (True, Encryption.OPPORTUNISTIC, True),
    (True, Encryption.REQUIRED, True), (True, Encryption.DISABLED, False)])
async def test_the_decision_is_recorded_and_the_migration_runs(
        tmp_path: Path, target_tls: bool, mode: Encryption, encrypted: bool) -> None:
    cluster = await _cluster(tmp_path, target_tls)
    try:
        rec = await cluster.orchestrator.start("web1", "host2",
                                               StreamOptions(encryption=mode))
        done = await cluster.orchestrator.wait(rec.id, 30)
        assert done.phase is Phase.COMPLETED and done.encrypted is encrypted
        assert cluster.running_on("web1") == ["host2"]
    finally:
        await cluster.close()
