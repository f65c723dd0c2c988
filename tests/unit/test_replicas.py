"""Several control-plane replicas as the CLI and the lab see them: the client moves on
from a replica that is down or standing by (and only then); the lab's options."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ferry.cli.client import Client
from ferry.domain.errors import Conflict, HostUnavailable, InvalidInput, NotLeader
from ferry.lab.config import LabConfig, config_for_up

URLS = ("https://10.0.0.1:8700", "https://10.0.0.1:8701")
STANDBY = json.dumps({"error": {"code": "not_leader", "problem": "standby",
                                "fix": "ask the leader"}}).encode()


def client_over(handler: httpx.MockTransport) -> Client:
    """The CLI's client of two replicas, its HTTP answered by `handler`."""
    client = Client(URLS[0], 5, others=URLS)
    client._http = httpx.Client(base_url=URLS[0], transport=handler)
    return client


def test_a_standby_or_a_dead_replica_is_skipped_for_the_next() -> None:
    seen: list[str] = []

    def standby_first(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.port}")
        if request.url.port == 8700:
            return httpx.Response(503, content=STANDBY)
        return httpx.Response(200, json={"ok": True})
    client = client_over(httpx.MockTransport(standby_first))
    assert client.call("POST", "/v1/networks", {"name": "n"}) == {"ok": True}
    assert seen == ["8700", "8701"] and client.url == URLS[1]

    def first_down(request: httpx.Request) -> httpx.Response:
        if request.url.port == 8701:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": 1})
    client = client_over(httpx.MockTransport(first_down))
    client._switch(0)  # now at the dead one
    assert client.call("GET", "/v1/hosts") == {"ok": 1} and client.url == URLS[0]


def test_only_refusals_that_changed_nothing_are_sent_elsewhere() -> None:
    calls: list[int] = []

    def timeout(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.port or 0)
        raise httpx.ReadTimeout("no answer", request=request)
    client = client_over(httpx.MockTransport(timeout))
    with pytest.raises(HostUnavailable):
        client.call("POST", "/v1/migrations", {"vm": "a", "target": "b"})
    assert calls == [8700]  # the request may have been acted on: not sent twice

    def all_standby(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, content=STANDBY)
    client = client_over(httpx.MockTransport(all_standby))
    with pytest.raises(NotLeader, match="standby"):
        client.call("POST", "/v1/networks", {"name": "n"})


def test_lab_options_for_replicas_and_the_store(tmp_path: Path) -> None:
    new = config_for_up(tmp_path, None, 2, None, None, control_planes=2, db="postgresql")
    assert new.control_urls == ("https://198.18.210.1:8700", "https://198.18.210.1:8701")
    assert new.db == "postgresql" and new.replica_id(1) == "cp2"
    with pytest.raises(InvalidInput, match="--db 'mysql'"):
        config_for_up(tmp_path, None, 2, None, None, db="mysql")
    with pytest.raises(InvalidInput):
        config_for_up(tmp_path, None, 2, None, None, control_planes=4)
    existing = LabConfig.default(tmp_path, 2)
    with pytest.raises(Conflict, match="2 control planes, a postgresql store"):
        config_for_up(tmp_path, existing, None, None, None, control_planes=2,
                      db="postgresql")
    assert config_for_up(tmp_path, existing, None, None, None) == existing
