"""DPM in the lab: an idle cluster puts a host in standby (its agent stopped, as a server
powered down by its BMC), and wakes it when load rises above the band."""

from __future__ import annotations

from typing import Any

from ferry.cli.client import Client
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from tests.integration.helpers import boot_probe, remove_vm, wait_until


def hosts(client: Client) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in client.call("GET", "/v1/hosts")}


def standby(client: Client) -> list[str]:
    return sorted(n for n, h in hosts(client).items() if h["state"] == "standby")


def test_dpm_puts_an_idle_host_in_standby_and_wakes_it_when_load_rises(
        client: Client, lab: LabConfig) -> None:
    assert standby(client) == []
    names: list[str] = []
    client.call("PATCH", "/v1/drs/settings", {"automation": "full", "dpm": True,
                                              "interval_s": 2})
    try:
        wait_until(lambda: len(standby(client)) == 1, 120, "a host in standby")
        [asleep] = standby(client)
        assert cluster.agent_pid(lab, asleep) is None  # powered off: its agent stopped
        awake = sorted(n for n in hosts(client) if n != asleep)
        # Two large VMs take the hosts left on above the band's 81 % of memory.
        memory = int(0.9 * sum(hosts(client)[n]["facts"]["memory_mib"] for n in awake) / 2)
        for i, host in enumerate(awake):
            names.append(f"dpm-{i}")
            boot_probe(client, lab, names[-1], host, memory=memory)
        wait_until(lambda: standby(client) == [], 120, f"{asleep} woken")
        wait_until(lambda: hosts(client)[asleep]["state"] == "connected", 60,
                   f"{asleep}'s agent reporting again")
        assert cluster.agent_pid(lab, asleep) is not None
    finally:
        client.call("PATCH", "/v1/drs/settings", {"automation": "manual", "dpm": False,
                                                  "interval_s": 60})
        for name in names:
            remove_vm(client, name)
        for name in standby(client):
            client.call("POST", f"/v1/hosts/{name}/standby", on=False)
        wait_until(lambda: all(h["state"] == "connected" for h in hosts(client).values()),
                   60, "every host connected again")
