"""Break a migration at its worst moments: the VM must end up running exactly once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.lab import cluster, net
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    follow,
    qemu_hosts,
    remove_vm,
    slow_options,
    wait_phase,
    wait_until,
)


def pid_of(lab: LabConfig, who: str) -> int:
    return int((lab.directory / "run" / f"{who}.pid").read_text())


def hosts_connected(client: Client) -> bool:
    try:
        return all(h["state"] == "connected" for h in client.call("GET", "/v1/hosts"))
    except Exception:
        return False


@pytest.fixture
def victim(client: Client, lab: LabConfig, request: pytest.FixtureRequest
           ) -> Iterator[tuple[str, dict[str, Any]]]:
    """A probe VM on host1 mid-way through a slow migration to host2: (migration id,
    its heartbeat before the migration). Marked `finishing`, the migration is one that
    can end on its own (a test that needs it to end, not only to be broken)."""
    finishing = request.node.get_closest_marker("finishing") is not None
    boot_probe(client, lab, "vic1", "host1", dirty=1 if finishing else 5)
    before = wait_heartbeat(client, "vic1")
    options = slow_options(12 if finishing else 4)
    rec = client.call("POST", "/v1/migrations",
                      {"vm": "vic1", "target": "host2", "options": options})
    wait_phase(client, rec["id"], "precopy")
    time.sleep(1.5)  # well inside pre-copy: ~20 s at 4 MiB/s
    yield rec["id"], before
    net.set_link(lab, "host2", True)
    wait_until(lambda: hosts_connected(client), 60, "all hosts connected again")
    remove_vm(client, "vic1")


def assert_rolled_back(client: Client, lab: LabConfig, migration_id: str,
                       before: dict[str, Any], reason: str) -> None:
    rec = follow(client, migration_id)
    assert rec["phase"] == "failed", rec
    assert reason in rec["reason"], rec["reason"]
    assert list(rec["phase_times"])[-2:] == ["rolling_back", "failed"]
    wait_until(lambda: qemu_hosts(lab, "vic1") == ["host1"], 60, "no QEMU left on host2")
    assert_intact(client, "vic1", "host1", lab, before)


def test_destination_qemu_killed_during_precopy(client: Client, lab: LabConfig,
                                                victim: tuple[str, dict[str, Any]]) -> None:
    migration_id, before = victim
    dest = client.call("GET", "/v1/migrations/" + migration_id)
    assert dest["phase"] == "precopy"
    pidfile = lab.host_dir("host2") / "run" / "vms" / "vic1" / "qemu.pid"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert_rolled_back(client, lab, migration_id, before, "")


def test_destination_agent_killed_during_precopy(client: Client, lab: LabConfig,
                                                 victim: tuple[str, dict[str, Any]]) -> None:
    migration_id, before = victim
    os.kill(pid_of(lab, "agent-host2"), signal.SIGKILL)
    try:
        assert_rolled_back(client, lab, migration_id, before, "host2")
    finally:
        cluster.start_agent(lab, "host2")
        wait_until(lambda: hosts_connected(client), 60, "host2's agent back")


def test_link_cut_during_precopy(client: Client, lab: LabConfig,
                                 victim: tuple[str, dict[str, Any]]) -> None:
    migration_id, before = victim
    net.set_link(lab, "host2", False)
    rec = follow(client, migration_id)
    assert rec["phase"] == "failed" and "host2" in rec["reason"], rec
    # the source never stopped: its probe keeps counting while host2 is cut off
    hb = wait_heartbeat(client, "vic1", after_seq=before["seq"] + 2, timeout_s=30)
    assert hb["mem_errors"] == 0
    net.set_link(lab, "host2", True)
    # once the link is back, the orphaned incoming QEMU on host2 goes away
    wait_until(lambda: qemu_hosts(lab, "vic1") == ["host1"], 60, "no QEMU left on host2")
    assert_intact(client, "vic1", "host1", lab, before)


@pytest.mark.finishing
def test_control_plane_killed_and_restarted_mid_migration(
        client: Client, lab: LabConfig, victim: tuple[str, dict[str, Any]]) -> None:
    migration_id, before = victim
    os.kill(pid_of(lab, "control"), signal.SIGKILL)
    time.sleep(2)
    cluster.start_control(lab)
    wait_until(lambda: hosts_connected(client), 60, "control plane back")
    rec = follow(client, migration_id)
    assert rec["phase"] in ("completed", "failed"), rec
    host = "host2" if rec["phase"] == "completed" else "host1"
    wait_until(lambda: qemu_hosts(lab, "vic1") == [host], 60, f"VM only on {host}")
    assert_intact(client, "vic1", host, lab, before)
