"""API routes over ASGI, no lab: /v1/schedules (errors as the API's error body, privileges
per action) and who may record a migration's client view."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ferry.api.app import create_app
from ferry.control.service import ControlPlane
from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.pki import ControlPki
from ferry.store import Store
from ferry.store.store import sqlite_url


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """The app (no lifespan: no loop runs) and headers of an operator and a viewer."""
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    headers = {}
    for role in (TokenRole.OPERATOR, TokenRole.VIEWER):
        secret = new_secret()
        info = await store.security.add_token(role.value, role, secret, None)
        headers[role.value] = f"Bearer {format_token(info.id, secret)}"
    control = ControlPlane(store, pki)
    # The API as a lone control plane serves it, its loops not started: leading,
    # and its job writes unfenced (no other replica's term to guard against).
    control.leadership.leading, control.store.fence = True, None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(control)),
                                 base_url="http://127.0.0.1") as client:
        yield client, headers
    await control.close()


async def test_add_list_runs_remove(api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    client, tokens = api
    op = {"authorization": tokens["operator"]}
    resp = await client.post("/v1/schedules", headers=op, json={
        "cron": "0 2 * * *", "action": {"kind": "drs_apply"}, "missed": "run"})
    assert resp.status_code == 201, resp.text
    view = resp.json()
    sid = view["schedule"]["id"]
    assert view["schedule"]["created_by_name"] == "operator" and view["next_run_at"] > 0
    listed = (await client.get("/v1/schedules", headers=op)).json()
    assert [v["schedule"]["id"] for v in listed] == [sid]
    assert (await client.get(f"/v1/schedules/{sid}/runs", headers=op)).json() == []
    viewer = {"authorization": tokens["viewer"]}
    assert (await client.delete(f"/v1/schedules/{sid}", headers=viewer)).status_code == 403
    assert (await client.delete(f"/v1/schedules/{sid}", headers=op)).status_code == 200
    gone = await client.get(f"/v1/schedules/{sid}/runs", headers=op)
    assert gone.status_code == 404


@pytest.mark.parametrize("body, status, says", [
    ({"cron": "0 2 * *", "action": {"kind": "drs_apply"}}, 422, "has 4 fields"),
    ({"cron": "0 2 * * *", "action": {"kind": "migrate", "vm": "web1", "target": "host2"}},
     404, "there is no VM 'web1'"),
    ({"cron": "0 2 * * *", "action": {"kind": "reboot"}}, 422, "action"),
    ({"cron": "0 2 * * *", "action": {"kind": "drs_apply"}, "tz": "Nowhere"}, 422,
     "time zone 'Nowhere' is not known"),
])
async def test_refusals_say_why_and_store_nothing(
        api: tuple[httpx.AsyncClient, dict[str, str]], body: dict[str, object],
        status: int, says: str) -> None:
    client, tokens = api
    op = {"authorization": tokens["operator"]}
    resp = await client.post("/v1/schedules", headers=op, json=body)
    assert resp.status_code == status and says in resp.json()["error"]["problem"], resp.text
    assert (await client.get("/v1/schedules", headers=op)).json() == []


async def test_a_viewer_cannot_schedule(api: tuple[httpx.AsyncClient, dict[str, str]]
                                        ) -> None:
    client, tokens = api
    resp = await client.post("/v1/schedules", headers={"authorization": tokens["viewer"]},
                             json={"cron": "@daily", "action": {"kind": "drs_apply"}})
    assert resp.status_code == 403 and "drs.apply" in resp.json()["error"]["problem"]


class CannedClient:
    """Answers the CLI's calls with bodies made from the API's own models."""

    def __init__(self, answers: dict[tuple[str, str], object]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str, object]] = []

    def call(self, method: str, path: str, body: object = None, **_: object) -> object:
        self.sent.append((method, path, body))
        return self.answers[(method, path)]


def test_the_cli_sends_the_action_and_shows_views_and_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ferry.cli import schedule_cmd
    from ferry.cli.main import app
    from ferry.control.schedules import ScheduleView
    from ferry.domain.schedules import (
        MigrateAction,
        RunOutcome,
        Schedule,
        ScheduleRun,
        ScheduleSpec,
    )

    spec = ScheduleSpec(cron="0 2 * * *", action=MigrateAction(vm="web1", target="host2"))
    run = ScheduleRun(id=1, schedule_id="abc", scheduled_at=1_767_232_800,
                      outcome=RunOutcome.MISSED, detail="missed while the control plane "
                      "was down: missed runs are skipped (policy skip); not run",
                      ended_at=1_767_232_900.0, missed_count=1)
    view = ScheduleView(schedule=Schedule(id="abc", spec=spec, created_at=1.0),
                        next_run_at=1_767_319_200, last_run=run, missed_runs=1)
    client = CannedClient({
        ("POST", "/v1/schedules"): view.model_dump(mode="json"),
        ("GET", "/v1/schedules"): [view.model_dump(mode="json")],
        ("GET", "/v1/schedules/abc/runs"): [run.model_dump(mode="json")],
    })
    monkeypatch.setattr(schedule_cmd, "connect", lambda *_a, **_k: client)
    runner = CliRunner()
    added = runner.invoke(app, ["schedule", "add", "0 2 * * *", "migrate", "web1", "host2",
                                "--missed", "run", "--grace", "600"])
    assert added.exit_code == 0, added.output
    assert "next run 2026-01-02 02:00:00 UTC" in added.output
    assert client.sent[0][2] == {
        "cron": "0 2 * * *", "tz": "UTC", "missed": "run", "grace_s": 600,
        "action": {"kind": "migrate", "vm": "web1", "target": "host2"}}
    listed = runner.invoke(app, ["schedule", "list"])
    assert listed.exit_code == 0 and "migrate web1 host2" in listed.output, listed.output
    history = runner.invoke(app, ["schedule", "history", "abc"])
    assert history.exit_code == 0 and "missed while the control plane" in history.output
    bad = runner.invoke(app, ["schedule", "add", "0 2 * * *", "migrate", "web1"])
    assert bad.exit_code == 1 and "migrate VM HOST" in bad.output


async def test_only_an_operator_records_a_client_view(
        api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    """PUT .../client-view: a stranger and a viewer are refused before anything is
    looked up; an operator reaches the migration (none here: 404)."""
    client, tokens = api
    body = {"gap_ms": 1.0, "tcp_survived": True}
    path = "/v1/migrations/nosuch/client-view"
    assert (await client.put(path, json=body)).status_code == 401
    viewer = {"authorization": tokens["viewer"]}
    assert (await client.put(path, json=body, headers=viewer)).status_code == 403
    resp = await client.put(path, json=body, headers={"authorization": tokens["operator"]})
    assert resp.status_code == 404, resp.text
