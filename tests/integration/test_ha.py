"""VM HA in the lab (issue 13): a killed host's protected VMs run again elsewhere from a
new boot, by priority; an isolated host stops its VMs before they start elsewhere; a host
that comes back holds no stale VM and takes VMs again; admission control refuses the VM
that would break the reserve. The autouse watcher (conftest.py) fails any double run.

No timing thresholds: the waits are generous upper bounds, the failover time is
bench/ha_failover.py's to measure.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.domain.errors import FerryError, NoCapacity
from ferry.lab import cluster, net
from ferry.lab.config import LabConfig
from ferry.lab.watch import current_heartbeat
from tests.integration.helpers import (
    agent_answers,
    agent_pid,
    boot_probe,
    hosts_connected,
    qemu_hosts,
    remove_vm,
    wait_until,
)

FAILOVER_WAIT_S = 120.0  # an upper bound for waiting, not a measured claim


@pytest.fixture
def ha(client: Client) -> Iterator[None]:
    client.call("PATCH", "/v1/cluster/ha", {"enabled": True, "host_failures_to_tolerate": 1,
                                            "isolation_response": "power_off"})
    try:
        yield
    finally:
        client.call("PATCH", "/v1/cluster/ha", {"enabled": False, "power_fencing": True,
                                                "host_failures_to_tolerate": 1})


def kill_host(lab: LabConfig, host: str) -> None:
    """The host dies: its link, its agent and every QEMU of it, at once (SIGKILL)."""
    net.set_link(lab, host, False)
    for pid, _ in cluster.processes_of(lab.host_dir(host)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid = agent_pid(lab, host)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def restore_host(client: Client, lab: LabConfig, host: str) -> None:
    net.set_link(lab, host, True)
    if agent_pid(lab, host) is None:
        cluster.start_agent(lab, host)
    wait_until(lambda: agent_answers(lab, host), 90, f"{host}'s agent back")
    wait_until(lambda: hosts_connected(client), 90, "every host connected")


def boot_id(client: Client, vm: str) -> str:
    hb = current_heartbeat(client, vm)
    assert hb is not None and hb.boot_id, vm
    return hb.boot_id


def runs_elsewhere(client: Client, lab: LabConfig, vm: str, old_host: str,
                   old_boot: str) -> bool:
    """Recorded running on another host, QEMU there only, the probe beating from a new
    boot."""
    view = client.call("GET", f"/v1/vms/{vm}")
    if view["state"] != "running" or view["host"] == old_host:
        return False
    if qemu_hosts(lab, vm) != [view["host"]]:
        return False
    hb = current_heartbeat(client, vm)
    return hb is not None and hb.boot_id not in ("", old_boot)


def ha_events(client: Client) -> list[dict[str, Any]]:
    return [e for e in client.call("GET", "/v1/events", limit=500)
            if e["kind"] in ("ha", "ha_restart")]


def usable(client: Client, lab: LabConfig, host: str, name: str) -> None:
    """The host takes a new VM again (then it is removed)."""
    try:
        boot_probe(client, lab, name, host)
        assert qemu_hosts(lab, name) == [host]
    finally:
        remove_vm(client, name)


def test_a_dead_hosts_vms_restart_elsewhere_by_priority(lab: LabConfig, client: Client,
                                                        ha: None) -> None:
    victim = "host3"
    vms = {"ha-high": "high", "ha-med": "medium", "ha-low": "low", "ha-off": "disabled"}
    try:
        for name, priority in vms.items():
            boot_probe(client, lab, name, victim)
            client.call("PUT", f"/v1/vms/{name}/ha", {"priority": priority})
        boots = {name: boot_id(client, name) for name in vms}
        before = max((e["id"] for e in ha_events(client)), default=0)
        kill_host(lab, victim)
        protected = [n for n, p in vms.items() if p != "disabled"]
        wait_until(lambda: all(runs_elsewhere(client, lab, n, victim, boots[n])
                               for n in protected), FAILOVER_WAIT_S,
                   "every protected VM running again on another host")
        restarted = [e["object"] for e in sorted(ha_events(client), key=lambda e: e["id"])
                     if e["id"] > before and e["action"] == "vm restarted"]
        assert restarted == ["ha-high", "ha-med", "ha-low"], restarted
        # The lab's power driver fenced the dead host (confirmed off) before the restarts,
        # so they took the leases at once.
        fenced = [e for e in ha_events(client) if e["id"] > before
                  and e["action"] == "host fenced" and e["object"] == victim]
        assert fenced and fenced[0]["id"] < min(
            e["id"] for e in ha_events(client) if e["id"] > before
            and e["action"] == "vm restarted"), fenced
        off = client.call("GET", "/v1/vms/ha-off")
        assert off["host"] == victim and qemu_hosts(lab, "ha-off") == []
        # The host comes back: it rejoins, holds no stale VM, and takes VMs again.
        restore_host(client, lab, victim)
        for name in vms:
            assert victim not in qemu_hosts(lab, name), name
        usable(client, lab, victim, "ha-back")
    finally:
        with contextlib.suppress(Exception):
            restore_host(client, lab, victim)
        for name in vms:
            with contextlib.suppress(FerryError):
                remove_vm(client, name)


def test_an_isolated_host_stops_its_vms_before_they_restart(lab: LabConfig, client: Client,
                                                            ha: None) -> None:
    victim = "host2"
    name = "ha-iso"
    try:
        boot_probe(client, lab, name, victim)
        boot = boot_id(client, name)
        net.set_link(lab, victim, False)  # the host and its agent keep running
        wait_until(lambda: runs_elsewhere(client, lab, name, victim, boot), FAILOVER_WAIT_S,
                   f"{name} running again on another host")
        # Its agent applied the isolation response (power off) before the restart: the
        # watcher saw no two copies; the old QEMU is gone from the isolated host.
        assert qemu_hosts(lab, name) != [victim]
        net.set_link(lab, victim, True)
        wait_until(lambda: hosts_connected(client), 90, "every host connected")
        assert victim not in qemu_hosts(lab, name)
        usable(client, lab, victim, "ha-iso-back")
        wait_heartbeat(client, name)  # and the restarted copy still runs
    finally:
        with contextlib.suppress(Exception):
            restore_host(client, lab, victim)
        remove_vm(client, name)


def test_a_hung_agents_guests_are_killed_before_they_restart_elsewhere(
        lab: LabConfig, client: Client, ha: None) -> None:
    """The agent hangs (SIGSTOP) while its QEMU runs on: nobody renews the VM's lease.
    The host's watchdog (ferry/agent/watchdog.py, a process of its own) kills the QEMU
    before the lease expires; HA restarts the VM elsewhere; the watcher sees no two
    copies. Power fencing is off here: the watchdog and the leases alone must do it."""
    victim = "host1"
    name = "ha-hung"
    pid = None
    client.call("PATCH", "/v1/cluster/ha", {"power_fencing": False})
    try:
        boot_probe(client, lab, name, victim)
        boot = boot_id(client, name)
        pid = agent_pid(lab, victim)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: runs_elsewhere(client, lab, name, victim, boot), FAILOVER_WAIT_S,
                   f"{name} running again on another host")
        assert victim not in qemu_hosts(lab, name)
        log = (lab.host_dir(victim) / "run" / "watchdog.log").read_text()
        assert f"killed {name}" in log, log
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            restore_host(client, lab, victim)
        remove_vm(client, name)


def test_admission_control_refuses_what_breaks_the_reserve(lab: LabConfig, client: Client,
                                                           ha: None) -> None:
    # Two host failures to tolerate on three hosts: one survivor must hold them all.
    client.call("PATCH", "/v1/cluster/ha", {"host_failures_to_tolerate": 2})
    names = ("ha-a", "ha-b", "ha-c")
    try:
        boot_probe(client, lab, "ha-a", "host1", memory=800)
        boot_probe(client, lab, "ha-b", "host2", memory=800)
        with pytest.raises(NoCapacity, match="admission control") as refused:
            boot_probe(client, lab, "ha-c", "host3", memory=800)
        assert "would fit on no other host" in str(refused.value)
        assert qemu_hosts(lab, "ha-c") == []
        status = client.call("GET", "/v1/cluster/ha")
        assert status["reserve"]["ok"] and status["reserve"]["failures"] == 2
        # VMs HA does not restart need no room elsewhere: then the third one fits.
        for name in ("ha-a", "ha-b"):
            client.call("PUT", f"/v1/vms/{name}/ha", {"priority": "disabled"})
        boot_probe(client, lab, "ha-c", "host3", memory=800)
    finally:
        for name in names:
            remove_vm(client, name)
