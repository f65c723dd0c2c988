"""The inventory follows what the hosts really run: a VM whose QEMU dies outside any
job is recorded crashed (with an event), not left `running` with no process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ferry.cli.client import Client
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from tests.integration.helpers import boot_probe, qemu_hosts, remove_vm, wait_until


def qemu_pid(lab: LabConfig, vm: str) -> int:
    for pid, argv0 in cluster.processes_of(lab.directory):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if "qemu" in argv0 and f"guest={vm},".encode() in cmd:
            return pid
    raise AssertionError(f"no QEMU for {vm}")


def test_a_vm_whose_qemu_died_is_recorded_crashed(client: Client, lab: LabConfig) -> None:
    boot_probe(client, lab, "rc1", "host3", memory=128, probe_mib=16)
    try:
        os.kill(qemu_pid(lab, "rc1"), signal.SIGKILL)
        wait_until(lambda: client.call("GET", "/v1/vms/rc1")["state"] == "crashed", 60,
                   "the inventory to record rc1 crashed")
        events = client.call("GET", "/v1/events", limit=100)
        assert any(e["kind"] == "reconcile" and e["object"] == "rc1" for e in events), events
        assert qemu_hosts(lab, "rc1") == []
        # a crashed VM starts again where it was, once
        client.call("POST", "/v1/vms/rc1/start")
        assert qemu_hosts(lab, "rc1") == ["host3"]
    finally:
        remove_vm(client, "rc1")
