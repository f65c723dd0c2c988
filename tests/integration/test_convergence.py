"""Convergence levers on a shaped link: post-copy, throttling, and giving up cleanly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.domain.errors import InvalidInput
from ferry.lab import net
from ferry.lab.config import LabConfig
from tests.integration.helpers import assert_intact, boot_probe, follow, remove_vm

LINK_BITS = 100_000_000  # 12.5 MB/s, below the probe's 30 MiB/s


@pytest.fixture
def shaped(client: Client, lab: LabConfig) -> Iterator[str]:
    """A probe VM on host1 dirtying 30 MiB/s behind a 100 Mbit/s link."""
    boot_probe(client, lab, "conv1", "host1", dirty=30)
    net.shape(lab, "host1", LINK_BITS)
    try:
        yield "conv1"
    finally:
        net.shape(lab, "host1", None)
        remove_vm(client, "conv1")


def migrate(client: Client, vm: str, target: str, **options: object) -> dict[str, object]:
    rec = client.call("POST", "/v1/migrations", {"vm": vm, "target": target,
                                                "options": options})
    return follow(client, rec["id"])


def test_postcopy_finishes_what_precopy_cannot(client: Client, lab: LabConfig,
                                               shaped: str) -> None:
    before = wait_heartbeat(client, shaped)
    rec = migrate(client, shaped, "host2", allow_throttle=False, allow_postcopy=True)
    assert rec["phase"] == "completed", rec
    assert rec["postcopy_started"] is True
    assert [a["kind"] for a in rec["actions"]][-1] == "postcopy"  # type: ignore[index]
    assert_intact(client, shaped, "host2", lab, before)


def test_qemu_defaults_give_up_and_leave_the_vm_running(client: Client, lab: LabConfig,
                                                        shaped: str) -> None:
    before = wait_heartbeat(client, shaped)
    rec = migrate(client, shaped, "host2", policy="qemu", progress_timeout_s=20)
    assert rec["phase"] == "failed", rec
    assert "no progress" in str(rec["reason"])
    assert rec["actions"] == []
    assert_intact(client, shaped, "host1", lab, before)


def test_ferry_policy_throttles_before_anything_else(client: Client, lab: LabConfig,
                                                     shaped: str) -> None:
    before = wait_heartbeat(client, shaped)
    rec = migrate(client, shaped, "host2", progress_timeout_s=45)
    kinds = [a["kind"] for a in rec["actions"]]  # type: ignore[attr-defined]
    assert kinds and kinds[0] == "throttle", rec
    assert "postcopy" not in kinds
    host = "host2" if rec["phase"] == "completed" else "host1"
    assert_intact(client, shaped, host, lab, before)


def test_invalid_policy_values_are_refused(client: Client, lab: LabConfig) -> None:
    for options, field in [({"max_throttle_pct": 150}, "max_throttle_pct"),
                           ({"compression": "zstd"}, "multifd"),
                           ({"policy": "fastest"}, "policy"),
                           ({"warp": 9}, "warp")]:
        with pytest.raises(InvalidInput, match=field):
            client.call("POST", "/v1/migrations", {"vm": "nobody", "target": "host2",
                                                   "options": options})
    with pytest.raises(InvalidInput, match="max_downtime_ms"):
        client.call("PATCH", "/v1/policy", {"max_downtime_ms": 0})
    assert client.call("GET", "/v1/policy")["max_downtime_ms"] == 500
