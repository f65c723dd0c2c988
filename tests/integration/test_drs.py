"""DRS in the lab with real VMs: an imbalanced cluster balanced by live migrations with
every probe intact, anti-affinity spreading two VMs, maintenance emptying a host in
parallel (and refused when there is no room)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.domain.errors import InvalidInput, NoCapacity
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    follow,
    remove_vm,
)


@contextlib.contextmanager
def vms(client: Client, lab: LabConfig, placed: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Boot probe VMs where asked; yield their first heartbeats; always remove them."""
    try:
        beats = {name: boot_probe(client, lab, name, host, dirty=1)
                 for name, host in placed.items()}
        yield beats
    finally:
        for name in placed:
            remove_vm(client, name)
        for rule in client.call("GET", "/v1/rules"):
            client.call("DELETE", f"/v1/rules/{rule['name']}")


def where(client: Client, names: list[str]) -> dict[str, str]:
    return {v["spec"]["name"]: v["host"] for v in client.call("GET", "/v1/vms")
            if v["spec"]["name"] in names}


def run_moves(client: Client, applied: dict[str, Any]) -> list[dict[str, Any]]:
    ids = [r["migration_id"] for r in applied["results"] if r.get("migration_id")]
    deferred = [r for r in applied["results"] if r.get("deferred")]
    assert len(ids) + len(deferred) == len(applied["plan"]["moves"]), applied
    assert not deferred, applied  # these small plans free no room another move needs
    done = [follow(client, mid) for mid in ids]
    assert all(r["phase"] == "completed" for r in done), done
    return done


def test_an_imbalanced_cluster_is_balanced_by_live_migrations(client: Client,
                                                              lab: LabConfig) -> None:
    names = ["drs-a", "drs-b", "drs-c"]
    # Threshold 5 acts on slight gains: three small VMs on one of three big hosts are
    # then worth spreading (at the default 3 a 20 % spread is tolerated, as in vSphere).
    client.call("PATCH", "/v1/drs/settings", {"threshold": 5})
    with vms(client, lab, dict.fromkeys(names, "host1")) as beats:
        plan = client.call("GET", "/v1/drs/plan")
        assert plan["moves"], plan
        assert plan["imbalance_after"] < plan["imbalance_before"], plan
        for move in plan["moves"]:
            assert move["source"] == "host1" and move["reason"], move
        applied = client.call("POST", "/v1/drs/apply")
        done = run_moves(client, applied)
        assert all(r["cause"] and r["cause"].startswith("DRS") for r in done), done
        placed = where(client, names)
        assert len(set(placed.values())) > 1, placed
        for name in names:
            assert_intact(client, name, placed[name], lab, beats[name])
        # The result is balanced at the same settings: nothing more to do.
        again = client.call("GET", "/v1/drs/plan")
        assert again["moves"] == [], again
    client.call("PATCH", "/v1/drs/settings", {"threshold": 3})


def test_anti_affinity_spreads_two_vms(client: Client, lab: LabConfig) -> None:
    with vms(client, lab, {"drs-x": "host2", "drs-y": "host2"}) as beats:
        client.call("PATCH", "/v1/drs/settings", {"threshold": 1})  # mandatory moves only
        try:
            client.call("POST", "/v1/rules", {"name": "apart", "kind": "anti_affinity",
                                              "vms": ["drs-x", "drs-y"]})
            applied = client.call("POST", "/v1/drs/apply")
            moves = applied["plan"]["moves"]
            assert len(moves) == 1 and moves[0]["rule"] == "apart", applied
            run_moves(client, applied)
            placed = where(client, ["drs-x", "drs-y"])
            assert placed["drs-x"] != placed["drs-y"], placed
            for name, beat in beats.items():
                assert_intact(client, name, placed[name], lab, beat)
        finally:
            client.call("PATCH", "/v1/drs/settings", {"threshold": 3})


def test_maintenance_empties_a_host_in_parallel(client: Client, lab: LabConfig) -> None:
    with vms(client, lab, {"drs-m1": "host3", "drs-m2": "host3"}) as beats:
        try:
            result = client.call("POST", "/v1/hosts/host3/maintenance", on=True)
            assert result["host"]["maintenance"] is True
            moves = result["evacuation"]["plan"]["moves"]
            assert sorted(m["vm"] for m in moves) == ["drs-m1", "drs-m2"], result
            done = run_moves(client, result["evacuation"])
            # Both moves were under way at once (the limits allow 8 per host): each held
            # its slot (left CHECKING, where a queued move waits) before either ended.
            # Not pre-copy: an idle VM's stream can end before the other's QEMU started.
            starts = [r["phase_times"]["preparing_target"] for r in done]
            ends = [r["phase_times"]["completed"] for r in done]
            assert max(starts) < min(ends), done
            placed = where(client, ["drs-m1", "drs-m2"])
            assert "host3" not in placed.values(), placed
            for name, beat in beats.items():
                assert_intact(client, name, placed[name], lab, beat)
        finally:
            client.call("POST", "/v1/hosts/host3/maintenance", on=False)
        assert client.call("GET", "/v1/hosts/host3")["maintenance"] is False


def test_maintenance_without_room_is_refused_and_changes_nothing(
        client: Client, lab: LabConfig) -> None:
    with vms(client, lab, {"drs-big": "host1"}):
        client.call("POST", "/v1/hosts/host2/maintenance", on=True)
        try:
            client.call("POST", "/v1/rules", {"name": "pin", "kind": "vm_host_must",
                                              "vms": ["drs-big"], "hosts": ["host1"]})
            with pytest.raises(NoCapacity, match="drs-big"):
                client.call("POST", "/v1/hosts/host1/maintenance", on=True)
            assert client.call("GET", "/v1/hosts/host1")["maintenance"] is False
            assert where(client, ["drs-big"]) == {"drs-big": "host1"}
            wait_heartbeat(client, "drs-big")
        finally:
            client.call("POST", "/v1/hosts/host2/maintenance", on=False)


def test_bad_rules_are_refused(client: Client, lab: LabConfig) -> None:
    for body, message in [
        ({"name": "r1", "kind": "anti_affinity", "vms": ["no-such-vm", "x"]}, "no VM"),
        ({"name": "r1", "kind": "sometimes", "vms": ["a"]}, "kind"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            client.call("POST", "/v1/rules", body)
    assert client.call("GET", "/v1/rules") == []
