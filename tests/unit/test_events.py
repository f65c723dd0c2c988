"""The event log: `since` parsing, paging in the store, the API's filters and refusals
(recorded as events themselves), the SSE follower's ids, and /metrics' families."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ferry.api.app import create_app
from ferry.api.event_routes import _follow
from ferry.control import eventlog, metrics
from ferry.control.service import ControlPlane
from ferry.domain.audit import Outcome
from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.domain.drs_model import ClusterSnapshot
from ferry.domain.errors import InvalidInput
from ferry.domain.events import SYSTEM, EventKind, EventQuery, parse_since
from ferry.domain.memory_check import MemoryCheck
from ferry.domain.migration import Phase
from ferry.domain.records import ActionRecord, MigrationRecord
from ferry.pki import ControlPki
from ferry.store import Store
from ferry.store.store import sqlite_url

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("text", "back_s"), [
    ("1h", 3600), ("30m", 1800), ("30min", 1800), ("90s", 90), ("2d", 172_800),
    ("1.5h", 5400), ("500ms", 0.5)])
def test_since_durations_count_back_from_now(text: str, back_s: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(NOW - back_s)


def test_since_iso_times_and_epoch_seconds() -> None:
    assert parse_since("2027-01-15T08:00:00Z", NOW) == NOW
    assert parse_since("2027-01-15T08:00:00Z", NOW) == parse_since(
        "2027-01-15T08:00:00+00:00", NOW)
    # Without a zone: UTC, never the server's local time.
    assert parse_since("2027-01-15T08:00:00", NOW) == parse_since("2027-01-15T08:00:00Z", NOW)
    assert parse_since("1700000000.5", NOW) == 1_700_000_000.5  # older clients' form


@pytest.mark.parametrize("text", ["", "soon", "1 week", "5y", "-1", "nan", "2027-13-01",
                                  "1e400", "9" * 400 + "h", "9" * 400 + "d"])
def test_a_bad_since_names_the_parameter(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_since(text, NOW)
    assert "since" in err.value.problem


def test_a_page_request_is_checked() -> None:
    with pytest.raises(InvalidInput, match="limit"):
        EventQuery(limit=0)
    with pytest.raises(InvalidInput, match="after"):
        EventQuery(after=-1)
    with pytest.raises(InvalidInput, match="ambiguous"):
        EventQuery(after=1, before=5)
    assert EventQuery(after=0).ascending and not EventQuery().ascending


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = await Store.open(db_url)
    yield s
    await s.close()


async def test_pages_newest_first_or_after_an_id_oldest_first(store: Store) -> None:
    for i in range(7):
        await store.events.add(EventKind.LEVER, SYSTEM, f"a{i}", f"m{i}",
                               vm="web1" if i % 2 else "db1")
    newest = await store.events.page(EventQuery(limit=3))
    assert [e.action for e in newest] == ["a6", "a5", "a4"]
    older = await store.events.page(EventQuery(limit=3, before=newest[-1].id))
    assert [e.action for e in older] == ["a3", "a2", "a1"]
    first = await store.events.page(EventQuery(limit=2, after=0))
    rest = await store.events.page(EventQuery(limit=100, after=first[-1].id))
    assert [e.action for e in first + rest] == [f"a{i}" for i in range(7)]
    assert [e.action for e in await store.events.page(EventQuery(vm="web1"))] == [
        "a5", "a3", "a1"]
    assert await store.events.page(EventQuery(since=time.time() + 60)) == []
    assert await store.events.last_id() == newest[0].id
    assert (await store.events.counts())[EventKind.LEVER] == 7


async def test_recording_names_the_acting_token_or_system(store: Store) -> None:
    rec = MigrationRecord(id="m1", vm="web1", source="h1", target="h2",
                          phase=Phase.PENDING, created_at=NOW)
    await eventlog.migration_started(store, rec)
    token = eventlog.acting.set("token ci (abc)")
    try:
        await eventlog.migration_ended(store, rec.model_copy(update={
            "phase": Phase.FAILED, "reason": "target refused"}))
    finally:
        eventlog.acting.reset(token)
    await eventlog.ha_restart(store, "web1", "h2", "h3", "h2 stopped answering")
    started, ended, ha = await store.events.page(EventQuery(after=0))
    assert (started.kind, started.actor, started.vm) == (
        EventKind.MIGRATION_STARTED, SYSTEM, "web1")
    assert "h1 -> h2" in started.detail
    assert (ended.kind, ended.actor, ended.outcome) == (
        EventKind.MIGRATION_ENDED, "token ci (abc)", Outcome.FAILED)
    assert "target refused" in ended.detail
    assert ha.kind is EventKind.HA_RESTART


async def test_the_follower_yields_each_event_with_its_id(tmp_path: Path,
                                                          store: Store) -> None:
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    control = ControlPlane(store, pki)
    # The API as a lone control plane serves it, its loops not started: leading,
    # and its job writes unfenced (no other replica's term to guard against).
    control.leadership.leading, control.store.fence = True, None
    a = await store.events.add(EventKind.AUDIT, SYSTEM, "x", "o1", vm="web1")
    await store.events.add(EventKind.AUDIT, SYSTEM, "y", "o2", vm="db1")
    c = await store.events.add(EventKind.AUDIT, SYSTEM, "z", "o3", vm="web1")
    follower = _follow(control, 0, "web1", None)
    position = await anext(follower)  # where a reconnecting client resumes
    assert (position.id, position.data) == ("0", None)
    got = [await anext(follower), await anext(follower)]
    assert [g.id for g in got] == [str(a.id), str(c.id)]
    assert '"object":"o3"' in str(got[1].data)
    await follower.aclose()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Store]]:
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    secret = new_secret()
    info = await store.security.add_token("admin", TokenRole.ADMIN, secret, None)
    control = ControlPlane(store, pki)
    # The API as a lone control plane serves it, its loops not started: leading,
    # and its job writes unfenced (no other replica's term to guard against).
    control.leadership.leading, control.store.fence = True, None
    async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(control)),
            base_url="http://127.0.0.1",
            headers={"authorization": f"Bearer {format_token(info.id, secret)}"}) as client:
        yield client, store
    await control.close()


async def test_api_filters_and_names_a_bad_parameter(
        api: tuple[httpx.AsyncClient, Store]) -> None:
    client, store = api
    await store.events.add(EventKind.DRS_MOVE, SYSTEM, "move web1", "m1", vm="web1")
    await store.events.add(EventKind.DRS_MOVE, SYSTEM, "move db1", "m2", vm="db1")
    resp = await client.get("/v1/events", params={"vm": "web1", "since": "1h"})
    assert resp.status_code == 200, resp.text
    assert [e["action"] for e in resp.json()] == ["move web1"]
    resp = await client.get("/v1/events", params={"after": 0, "limit": 1})
    assert [e["action"] for e in resp.json()] == ["move web1"]
    for params, name in (({"since": "yesterday"}, "since"), ({"after": -3}, "after"),
                         ({"limit": 0}, "limit")):
        resp = await client.get("/v1/events", params=params)
        assert resp.status_code == 422, resp.text
        assert name in resp.json()["error"]["problem"], resp.text
    # Refusals are events too, with the why, and the token that asked.
    [refused] = [e for e in (await client.get("/v1/events", params={"limit": 10})).json()
                 if e["kind"] == "request_refused" and "yesterday" in e["detail"]]
    assert refused["actor"].startswith("token admin") and refused["outcome"] == "refused"


async def test_a_bad_token_is_refused_and_recorded(
        api: tuple[httpx.AsyncClient, Store]) -> None:
    client, store = api
    for path in ("/v1/events", "/metrics", "/v1/events/stream"):
        resp = await client.get(path, headers={"authorization": "Bearer fy_nope_" + "x" * 20})
        assert resp.status_code == 401, (path, resp.text)
    refused = await store.events.page(EventQuery(limit=10))
    assert {e.object for e in refused if e.kind is EventKind.REQUEST_REFUSED} >= {
        "/v1/events", "/metrics", "/v1/events/stream"}
    assert all("unknown or revoked" in e.detail for e in refused)


async def test_metrics_are_prometheus_text_derived_from_the_store(
        api: tuple[httpx.AsyncClient, Store]) -> None:
    client, store = api
    done = MigrationRecord(id="m1", vm="web1", source="h1", target="h2",
                           phase=Phase.COMPLETED, created_at=NOW, total_ms=12_000,
                           downtime_ms=40, transferred_bytes=5 << 20,
                           actions=(ActionRecord(at_ms=900, kind="throttle", value=20),),
                           memory_check=MemoryCheck(chunks=96, differing_chunks=2,
                                                    repaired_pages=5, ms=80))
    await store.add_migration(done)
    await eventlog.drs_move(store, "web1", "h1", "h2", "imbalance 0.3", "m1")
    resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for line in ('ferry_migrations_total{outcome="completed"} 1.0',
                 'ferry_migrations_total{outcome="failed"} 0.0',
                 'ferry_migration_duration_seconds_bucket{le="10.0"} 0.0',
                 'ferry_migration_duration_seconds_bucket{le="20.0"} 1.0',
                 'ferry_migration_downtime_seconds_sum 0.04',
                 'ferry_migration_bytes_sent_total{stream="memory"} 5.24288e+06',
                 'ferry_migration_levers_total{lever="throttle"} 1.0',
                 'ferry_memory_checks_total{result="repaired"} 1.0',
                 'ferry_memory_checks_total{result="skipped"} 0.0',
                 "ferry_memory_repaired_pages_total 5.0",
                 "ferry_drs_moves_total 1.0", "ferry_ha_restarts_total 0.0"):
        assert line in text, (line, text)


def test_host_gauges_come_from_the_snapshot() -> None:
    facts = metrics.ClusterFacts(now=NOW, hosts=(), vms=(), migrations=(), relocations=(),
                                 events={}, snapshot=ClusterSnapshot.model_validate({
                                     "hosts": [{"name": "h1", "cpus": 4,
                                                "memory_mib": 1024}],
                                     "vms": [{"name": "web1", "host": "h1",
                                              "memory_mib": 256, "vcpus": 2,
                                              "cpu_demand": 1.0, "mem_demand_mib": 256}]}))
    text = metrics.render(facts).decode()
    assert 'ferry_host_cpu_load_ratio{host="h1"} 0.25' in text
    assert 'ferry_host_memory_load_ratio{host="h1"} 0.25' in text


async def test_a_role_refusal_names_the_token_and_the_vm(
        api: tuple[httpx.AsyncClient, Store]) -> None:
    client, store = api
    secret = new_secret()
    info = await store.security.add_token("ci-viewer", TokenRole.VIEWER, secret, None)
    resp = await client.post("/v1/vms/web1/start", headers={
        "authorization": f"Bearer {format_token(info.id, secret)}"})
    assert resp.status_code == 403, resp.text
    [refused] = await store.events.page(EventQuery(vm="web1"))
    assert refused.kind is EventKind.REQUEST_REFUSED and refused.outcome is Outcome.REFUSED
    assert f"ci-viewer ({info.id})" in refused.actor
    assert "lacks the privilege vm.power" in refused.detail
    # an action that went through is an audit event, not a refusal
    assert (await client.post("/v1/tokens", json={"name": "x", "role": "viewer"})
            ).status_code == 201
    [made] = await store.events.page(EventQuery(limit=1))
    assert (made.kind, made.outcome) == (EventKind.AUDIT, Outcome.OK)
