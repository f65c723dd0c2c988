"""Control-plane replicas sharing one store (both backends): one leads, the other stands
by; the leader's close hands over at once; a leader that cannot renew stops driving when
its term runs out."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from ferry.api.app import create_app
from ferry.control.leader import Leadership
from ferry.control.service import ControlPlane
from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.domain.errors import NotLeader
from ferry.domain.leader import LeaderTerms
from ferry.domain.migration import Phase
from ferry.domain.records import MigrationRecord
from ferry.pki import ControlPki
from ferry.store import Store


async def test_one_replica_leads_and_hands_over_on_close(tmp_path: Path, db_url: str
                                                         ) -> None:
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    first = ControlPlane(await Store.open(db_url), pki, replica_id="cp1")
    second = ControlPlane(await Store.open(db_url), pki, replica_id="cp2")
    try:
        await first.start()
        await second.start()
        assert first.leadership.leading and not second.leadership.leading
        assert first.leadership.token == 1 and second.leadership.token is None
        await first.close()  # gives the lease up: no waiting out the term
        assert await second.leadership.round()
        assert second.leadership.token == 2
    finally:
        await first.close()
        await second.close()


async def test_a_leader_that_cannot_renew_stops_when_its_term_ends(db_url: str) -> None:
    store = await Store.open(db_url)
    now = [1000.0]
    calls: list[str] = []

    async def lead() -> None:
        calls.append("lead")

    async def stand_by() -> None:
        calls.append("stand_by")
    terms = LeaderTerms(ttl_s=10.0, renew_s=2.0, max_skew_s=1.0)
    leadership = Leadership(store, "cp1", lead, stand_by, terms, clock=lambda: now[0])
    try:
        assert await leadership.round() and calls == ["lead"]

        async def unreachable() -> None:
            raise OSError("database unreachable")
        store.leader.read = unreachable  # type: ignore[assignment,method-assign]
        now[0] = 1009.9
        assert await leadership.round() and calls == ["lead"]  # its term still runs
        now[0] = 1010.0
        assert not await leadership.round() and calls == ["lead", "stand_by"]
    finally:
        await store.close()


def test_a_replica_id_fits_the_lease_row() -> None:
    async def nothing() -> None:
        return None
    with pytest.raises(ValueError, match="1 to 128"):
        Leadership(None, "x" * 129, nothing, nothing)  # type: ignore[arg-type]


async def test_a_standby_serves_reads_and_refuses_changes_naming_the_leader(
        tmp_path: Path, db_url: str) -> None:
    pki = ControlPki(tmp_path / "pki")
    pki.init(("127.0.0.1",))
    leader = ControlPlane(await Store.open(db_url), pki, replica_id="cp1")
    standby = ControlPlane(await Store.open(db_url), pki, replica_id="cp2")
    secret = new_secret()
    info = await standby.store.security.add_token("op", TokenRole.ADMIN, secret, None)
    auth = {"authorization": f"Bearer {format_token(info.id, secret)}"}
    try:
        await leader.start()
        await standby.start()
        assert not standby.leadership.leading
        async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(standby)),
                base_url="http://127.0.0.1") as client:
            assert (await client.get("/v1/vms", headers=auth)).status_code == 200
            stranger = await client.post("/v1/networks", json={"name": "net1"})
            assert stranger.status_code == 401  # told nothing about the replicas
            refused = await client.post("/v1/networks", headers=auth,
                                        json={"name": "net1"})
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "not_leader"
            assert "(replica 'cp2') is a standby" in error["problem"]
            assert "'cp1' leads" in error["problem"] and error["fix"]
            assert await standby.store.networks.all() == []  # nothing changed
            # The compatibility check changes nothing: any replica answers it.
            check = await client.post("/v1/migrations/check", headers=auth,
                                      json={"vm": "nope", "target": "host2"})
            assert check.status_code != 503
        await leader.close()  # hands over: the former standby now takes changes
        assert await standby.leadership.round()
        async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(standby)),
                base_url="http://127.0.0.1") as client:
            taken = await client.post("/v1/networks", headers=auth, json={"name": "net1"})
            assert taken.status_code == 201, taken.text
    finally:
        await leader.close()
        await standby.close()


async def test_job_writes_land_only_in_the_writers_own_term(db_url: str) -> None:
    old = await Store.open(db_url)  # a leader whose term is about to be taken over
    new = await Store.open(db_url)
    try:
        first = await old.leader.read()
        term1 = first.model_copy(update={"holder": "cp1", "expires_at": time.time() + 10,
                                         "token": 1, "version": 1})
        assert await old.leader.write(first, term1)
        old.fence = lambda: 1
        record = MigrationRecord(id="m1", vm="web1", source="a", target="b",
                                 phase=Phase.PENDING, created_at=time.time())
        await old.add_migration(record)
        await old.update_migration("m1", phase=Phase.CHECKING)
        # cp2 takes over (term 2): cp1, not yet aware, tries to go on writing.
        term2 = term1.model_copy(update={"holder": "cp2", "token": 2, "version": 2})
        assert await new.leader.write(term1, term2)
        with pytest.raises(NotLeader, match=r"term 1 .*term 2"):
            await old.update_migration("m1", phase=Phase.FAILED)
        with pytest.raises(NotLeader):
            await old.add_migration(record.model_copy(update={"id": "m2", "vm": "web2"}))
        assert (await new.migration("m1")).phase is Phase.CHECKING  # nothing landed
        assert [m.id for m in await new.migrations()] == ["m1"]
        new.fence = lambda: 2
        assert (await new.update_migration("m1", phase=Phase.FAILED)).phase is Phase.FAILED
        old.fence = lambda: None  # a replica that knows it does not lead
        with pytest.raises(NotLeader, match="no term"):
            await old.update_migration("m1", error="late")
    finally:
        await old.close()
        await new.close()
