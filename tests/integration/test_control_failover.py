"""Issue 13, the control plane itself: a lab of two control-plane replicas on PostgreSQL
(`ferry lab up --control-planes 2 --db postgresql`). The leader is killed (SIGKILL) in
the middle of a live migration; the standby takes the lease once the term has run out,
resumes the migration as a restart would, and the guest ends up intact on the target.
Before that, the standby refuses a change, naming the leader.

Its own lab (two hosts; prefix, subnet and port apart from the session's lab), watched
for double runs like every lab test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.cli.client import Client, lab_client
from ferry.cli.demo import wait_heartbeat
from ferry.domain.errors import HostUnavailable, NotLeader
from ferry.lab import cluster, net
from ferry.lab.config import LabConfig
from tests.integration.conftest import LAB_DIR, LAB_OCTET, LAB_PORT, LAB_PREFIX, running_lab
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    follow,
    remove_vm,
    wait_phase,
    wait_until,
)
from tests.integration.watcher import Watcher


@pytest.fixture(scope="module")
def replicated() -> Iterator[LabConfig]:
    if os.geteuid() != 0:
        pytest.fail("the lab needs root (network namespaces, bridge): run `make test` as root")
    directory = Path(f"{LAB_DIR}-cp")
    config = LabConfig.default(directory, 2, cpus=4, memory_mib=2048,
                               prefix=f"{LAB_PREFIX}c"[:6], subnet_octet=LAB_OCTET + 40,
                               control_port=LAB_PORT + 40, control_planes=2,
                               db="postgresql")
    with running_lab(config):
        yield config


def leader_view(client: Client) -> dict[str, Any] | None:
    try:
        view: dict[str, Any] = client.call("GET", "/v1/cluster/leader")
    except HostUnavailable:
        return None
    return view


def test_the_standby_takes_over_a_killed_leaders_migration(replicated: LabConfig) -> None:
    lab = replicated
    watcher = Watcher(lab.directory, {h.name: lab.host_dir(h.name) for h in lab.hosts})
    watcher.start()
    client = lab_client(lab, timeout_s=60)
    try:
        view = leader_view(client)
        assert view is not None and view["holder"] in ("cp1", "cp2"), view
        leader = 0 if view["holder"] == "cp1" else 1
        standby = 1 - leader
        shown = subprocess.run(
            [sys.executable, "-m", "ferry.cli.main", "cluster", "leader",
             "--url", lab.control_urls[standby]], capture_output=True, text=True,
            timeout=60, env={**os.environ, "FERRY_LAB_DIR": str(lab.directory)})
        assert f"{view['holder']} leads" in shown.stdout and "(standby)" in shown.stdout, \
            shown.stdout + shown.stderr
        status = subprocess.run(
            [sys.executable, "-m", "ferry.cli.main", "lab", "status", "--lab-dir",
             str(lab.directory)], capture_output=True, text=True, timeout=60)
        for part in ("control plane cp1", "control plane cp2", "postgresql"):
            assert part in status.stdout, status.stdout + status.stderr
        # The standby serves reads and refuses changes, naming the leader.
        only_standby = Client(lab.control_urls[standby], 30,
                              token=lab.admin_token_file.read_text().strip(), ca=lab.ca_file)
        assert only_standby.call("GET", "/v1/hosts")
        with pytest.raises(NotLeader, match=f"replica '{lab.replica_id(leader)}' leads"):
            only_standby.call("POST", "/v1/networks", {"name": "refused"})

        boot_probe(client, lab, "fo1", "host1", dirty=5)
        before = wait_heartbeat(client, "fo1")
        net.shape(lab, "host1", 50_000_000)  # ~30 s of pre-copy: time to kill the leader
        rec = client.call("POST", "/v1/migrations", {"vm": "fo1", "target": "host2"})
        wait_phase(client, rec["id"], "precopy", timeout_s=120)
        pid = cluster.control_pid(lab, leader)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        def taken_over() -> bool:
            now = leader_view(client)
            return now is not None and now["leading"] and \
                now["replica"] == lab.replica_id(standby)
        wait_until(taken_over, 60, "the standby leading")
        took_s = time.monotonic() - killed
        print(f"\nstandby leads {took_s:.1f} s after the leader was killed")
        net.shape(lab, "host1", None)
        done = follow(client, rec["id"])
        assert done["phase"] == "completed", done
        assert_intact(client, "fo1", "host2", lab, before)
    finally:
        net.shape(lab, "host1", None)
        remove_vm(client, "fo1")
        watcher.stop()
    assert not watcher.verdict(), watcher.verdict()
