"""Scheduled tasks in the lab: a task due in a few seconds live-migrates a probe VM (run
recorded, guest intact); a task due while the control plane is stopped is reported
missed once it is back, and is not run, then or after another restart.

The crons carry croniter's sixth field (seconds) so that a task comes due within
seconds, not at the next whole minute."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from typer.testing import CliRunner

from ferry.cli.client import Client
from ferry.cli.main import app
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    hosts_connected,
    remove_vm,
    wait_until,
)

VM = "sch1"


def cron_at(at: int) -> str:
    """A cron (with seconds, UTC) that matches `at` and, this year, no other time."""
    t = datetime.fromtimestamp(at, UTC)
    return f"{t.minute} {t.hour} {t.day} {t.month} * {t.second}"


def add(client: Client, at: int, target: str) -> dict[str, Any]:
    view: dict[str, Any] = client.call("POST", "/v1/schedules", {
        "cron": cron_at(at), "action": {"kind": "migrate", "vm": VM, "target": target}})
    assert view["next_run_at"] == at, view
    return view


def runs(client: Client, schedule_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.call("GET", f"/v1/schedules/{schedule_id}/runs")
    return found


def ended_run(client: Client, schedule_id: str, timeout_s: float) -> dict[str, Any]:
    wait_until(lambda: any(r["outcome"] != "running" for r in runs(client, schedule_id)),
               timeout_s, f"a run of schedule {schedule_id} to end")
    [run] = runs(client, schedule_id)
    return run


def migrations_of(client: Client, vm: str) -> list[dict[str, Any]]:
    return [m for m in client.call("GET", "/v1/migrations") if m["vm"] == vm]


def cli(lab: LabConfig, *args: str) -> tuple[int, str]:
    env = {"FERRY_TOKEN": lab.admin_token_file.read_text().strip(),
           "FERRY_CA": str(lab.ca_file)}
    out = CliRunner().invoke(app, [*args, "--url", lab.control_url], env=env)
    return out.exit_code, out.output


def restart_control(client: Client, lab: LabConfig, until: float = 0.0) -> None:
    """Stop the control plane, keep it down until `until` (time.time()), start it."""
    cluster.stop_control(lab)
    time.sleep(max(0.0, until - time.time()))
    cluster.start_control(lab)
    wait_until(lambda: hosts_connected(client), 60, "control plane back")


@pytest.fixture
def probe(client: Client, lab: LabConfig) -> Iterator[dict[str, Any]]:
    before = boot_probe(client, lab, VM, "host1", memory=128, probe_mib=16)
    try:
        yield before
    finally:
        for view in client.call("GET", "/v1/schedules"):
            client.call("DELETE", f"/v1/schedules/{view['schedule']['id']}")
        remove_vm(client, VM)


def test_a_task_migrates_at_its_time_and_a_missed_one_never_runs(
        client: Client, lab: LabConfig, probe: dict[str, Any]) -> None:
    # --- on time: due in 10 s, the control plane runs it
    due = int(time.time()) + 10
    task = add(client, due, "host2")["schedule"]
    run = ended_run(client, task["id"], timeout_s=180)
    assert run["outcome"] == "succeeded" and run["scheduled_at"] == due, run
    assert due <= run["started_at"] < due + 5 and not run["late"], run
    [migration_id] = run["migrations"]
    rec = client.call("GET", f"/v1/migrations/{migration_id}")
    assert rec["phase"] == "completed" and task["id"] in rec["cause"], rec
    listed = {v["schedule"]["id"]: v for v in client.call("GET", "/v1/schedules")}
    assert listed[task["id"]]["last_run"]["outcome"] == "succeeded"
    assert_intact(client, VM, "host2", lab, probe)

    # --- missed: due while the control plane is stopped; skipped (the default)
    moved = len(migrations_of(client, VM))
    due = int(time.time()) + 12
    task = add(client, due, "host1")["schedule"]
    cluster.stop_control(lab)
    assert time.time() < due - 1, "the control plane took too long to stop"
    restart_control(client, lab, until=due + 3)
    run = ended_run(client, task["id"], timeout_s=30)
    assert run["outcome"] == "missed" and run["scheduled_at"] == due, run
    assert "while the control plane was down" in run["detail"], run
    listed = {v["schedule"]["id"]: v for v in client.call("GET", "/v1/schedules")}
    assert listed[task["id"]]["missed_runs"] == 1
    # never run, and never recorded twice: not after more passes, not after a restart
    restart_control(client, lab)
    time.sleep(3)
    assert len(runs(client, task["id"])) == 1
    assert len(migrations_of(client, VM)) == moved
    assert client.call("GET", f"/v1/vms/{VM}")["host"] == "host2"
    # the same through the CLI: the history shows it missed; refusals say why
    code, out = cli(lab, "schedule", "history", task["id"])
    assert code == 0 and "missed" in out and "control plane was down" in out, out
    code, out = cli(lab, "schedule", "add", "0 2 * *", "migrate", VM, "host1")
    assert code == 1 and "has 4 fields, not 5 or 6" in out, out
    code, out = cli(lab, "schedule", "add", "0 2 * * *", "migrate", "nosuchvm", "host1")
    assert code == 1 and "there is no VM 'nosuchvm'" in out, out
