"""Recording what a client saw (PUT /v1/migrations/ID/client-view) over fake agents:
only once the migration ended, and `announce` is the migration's own option."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.domain.errors import Conflict, NotFound
from ferry.domain.migration import Phase, StreamOptions
from ferry.domain.records import ClientView
from tests.unit.fake_cluster import FakeCluster, web1_on_host1


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FakeCluster]:
    c = await web1_on_host1(tmp_path)
    yield c
    await c.close()


async def test_the_view_is_recorded_with_the_migrations_own_announce(
        cluster: FakeCluster) -> None:
    rec = await cluster.orchestrator.start("web1", "host2", StreamOptions(announce=False))
    done = await cluster.orchestrator.wait(rec.id, 30)
    assert done.phase is Phase.COMPLETED, done.reason
    # The client says the destination announced: the migration says it did not.
    saved = await cluster.orchestrator.record_client_view(
        rec.id, ClientView(gap_ms=80.5, tcp_survived=True, udp_lost=3, announce=True))
    view = saved.client_view
    assert view is not None and (view.gap_ms, view.tcp_survived, view.udp_lost,
                                 view.announce) == (80.5, True, 3, False)
    assert saved.iterations == done.iterations  # the whole record, passes included
    # Recorded once: a second view (a stranger's made-up gap) changes nothing.
    with pytest.raises(Conflict, match="already has what a client saw"):
        await cluster.orchestrator.record_client_view(rec.id, ClientView(gap_ms=1.0))
    assert (await cluster.store.migration(rec.id)).client_view == view


async def test_no_view_for_a_running_or_unknown_migration(cluster: FakeCluster) -> None:
    with pytest.raises(NotFound):
        await cluster.orchestrator.record_client_view("nosuch", ClientView(gap_ms=1))
    release = asyncio.Event()
    cluster.agents["host1"].on_call["progress"] = release.wait  # held in pre-copy
    rec = await cluster.orchestrator.start("web1", "host2")
    with pytest.raises(Conflict, match="still"):
        await cluster.orchestrator.record_client_view(rec.id, ClientView(gap_ms=1))
    assert (await cluster.store.migration(rec.id)).client_view is None
    release.set()
    assert (await cluster.orchestrator.wait(rec.id, 30)).phase is Phase.COMPLETED
