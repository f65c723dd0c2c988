"""`ferry events` against a stand-in client: the page it prints, and --follow printing
the recent events oldest first, then the stream's, from the last id it printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from ferry.cli import events_cmd
from ferry.cli.main import app


def _event(i: int, kind: str = "migration_started") -> dict[str, Any]:
    return {"id": i, "at": 1_800_000_000.0 + i, "kind": kind, "actor": "token ci (abc)",
            "action": f"migrate web1 #{i}", "object": "m1", "outcome": "ok",
            "detail": "web1: host1 -> host2", "vm": "web1"}


class StandIn:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.followed: dict[str, Any] = {}

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        self.calls.append((path, params))
        return [_event(3), _event(2)]  # newest first, as the API answers

    def follow(self, path: str, last_id: int | None = None, **params: Any
               ) -> Iterator[tuple[int, dict[str, Any]]]:
        self.followed = {"path": path, "last_id": last_id, **params}
        yield 4, _event(4, "migration_ended")


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    client = StandIn()
    monkeypatch.setattr(events_cmd, "connect", lambda url=None: client)
    return client


def test_a_page_passes_the_filters_to_the_api(stand_in: StandIn) -> None:
    out = CliRunner().invoke(app, ["events", "--vm", "web1", "--since", "1h", "--json"])
    assert out.exit_code == 0, out.output
    assert [e["id"] for e in json.loads(out.output)] == [3, 2]
    assert stand_in.calls == [("/v1/events", {"limit": 50, "vm": "web1", "since": "1h"})]
    out = CliRunner().invoke(app, ["events", "--vm", "web1"])
    assert out.exit_code == 0 and "migration_started" in out.output, out.output


def test_follow_prints_oldest_first_then_the_stream_after_the_last_id(
        stand_in: StandIn) -> None:
    out = CliRunner().invoke(app, ["events", "--vm", "web1", "--follow", "--json"])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["id"] for line in out.output.splitlines()] == [2, 3, 4]
    assert stand_in.followed == {"path": "/v1/events/stream", "last_id": 3, "vm": "web1",
                                 "since": None}
    out = CliRunner().invoke(app, ["events", "--follow"])
    assert "#4 migration_ended m1: migrate web1 #4 (token ci (abc))" in out.output, out.output
