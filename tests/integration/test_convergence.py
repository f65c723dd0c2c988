"""Convergence levers on a shaped link: post-copy, throttling, and giving up cleanly."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.domain.errors import Conflict, InvalidInput
from ferry.lab import net
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    follow,
    remove_vm,
    wait_phase,
    wait_until,
)

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
    # The send buffer is capped once the first pass measured the link; the first lever
    # against the dirty rate is the throttle.
    assert kinds[:1] == ["cap_backlog"], rec
    steering = [k for k in kinds if k != "cap_backlog"]
    assert steering and steering[0] == "throttle", rec
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


def runs_on(client: Client, vm: str, host: str) -> bool:
    view = client.call("GET", f"/v1/vms/{vm}")
    return bool(view["host"] == host and (view.get("live") or {}).get("state") == "running")


# Known, open: in 1 of 3 full runs on 2026-11-26 (and once before) the watcher saw the
# source QEMU's vCPU time advance after the destination ran, in this test only; the
# migration completed and the guest was intact. Whether that is a vCPU thread woken
# without executing the guest (the watcher counts any advance) or the source executing
# is not established yet.
@pytest.mark.watcher_known(reason="post-copy link cut: source vCPU time advanced after "
                                  "the switch, under investigation")
def test_destination_link_down_during_postcopy_is_waited_out(client: Client,
                                                             lab: LabConfig) -> None:
    """Issue 9 (post-copy is a flag): with the destination's link down for 4 s once
    post-copy had started, the migration ended FAILED and the VM crashed. Now the fault
    is waited out: the VM keeps running on the destination and the migration completes."""
    boot_probe(client, lab, "pcl1", "host1", dirty=20)
    net.shape(lab, "host1", 50_000_000)
    try:
        before = wait_heartbeat(client, "pcl1")
        rec = client.call("POST", "/v1/migrations", {
            "vm": "pcl1", "target": "host2", "options": {
                "allow_throttle": False, "allow_postcopy": True,
                "postcopy_recovery_window_s": 120}})
        wait_phase(client, rec["id"], "postcopy", timeout_s=300)
        net.set_link(lab, "host2", False)
        try:
            with pytest.raises(Conflict, match="post-copy"):
                client.call("POST", f"/v1/migrations/{rec['id']}/cancel")
            time.sleep(4)  # the fault's length, as in the reproduction
        finally:
            net.set_link(lab, "host2", True)
        done = follow(client, rec["id"])
        assert done["phase"] == "completed", done
        assert done["postcopy_started"] and "postcopy" in done["phase_times"]
        assert_intact(client, "pcl1", "host2", lab, before)
    finally:
        net.shape(lab, "host1", None)
        net.set_link(lab, "host2", True)
        remove_vm(client, "pcl1")


def test_postcopy_paused_on_a_broken_link_is_recovered(client: Client, lab: LabConfig
                                                       ) -> None:
    """A link down long enough for TCP to give up (tcp_retries2=3 in the hosts'
    namespaces: seconds, not the default 15 minutes) makes QEMU pause post-copy on both
    sides; once the link is back Ferry reconnects it (migrate-recover on the
    destination, migrate with resume on the source) and the guest lives on. The stream
    is encrypted (the default): the recovered stream is TLS with the same peer checks."""
    boot_probe(client, lab, "pcr1", "host1", dirty=20)
    net.shape(lab, "host1", 50_000_000)
    hosts = ("host1", "host2")
    try:
        for host in hosts:
            net.in_ns(lab.netns(host), "sysctl", "-qw", "net.ipv4.tcp_retries2=3")
        before = wait_heartbeat(client, "pcr1")
        rec = client.call("POST", "/v1/migrations", {
            "vm": "pcr1", "target": "host2", "options": {
                "allow_throttle": False, "allow_postcopy": True,
                "postcopy_recovery_window_s": 300}})
        wait_phase(client, rec["id"], "postcopy", timeout_s=300)
        # QEMU can recover a post-copy only once the destination runs (not while the
        # device state is still on its way): cut the link after that.
        wait_until(lambda: runs_on(client, "pcr1", "host2"), 60, "post-copy running")
        net.set_link(lab, "host2", False)
        try:
            time.sleep(20)  # the fault's length: well past TCP's retries at that setting
        finally:
            net.set_link(lab, "host2", True)
        done = follow(client, rec["id"])
        assert done["phase"] == "completed", done
        assert done["postcopy_recoveries"] >= 1, done
        assert done["encrypted"] is True, done
        assert_intact(client, "pcr1", "host2", lab, before)
    finally:
        for host in hosts:
            net.in_ns(lab.netns(host), "sysctl", "-qw", "net.ipv4.tcp_retries2=15")
        net.shape(lab, "host1", None)
        net.set_link(lab, "host2", True)
        remove_vm(client, "pcr1")
