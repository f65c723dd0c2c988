"""Control-plane replicas sharing one store (both backends): one leads, the other stands
by; the leader's close hands over at once; a leader that cannot renew stops driving when
its term runs out."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ferry.api.app import create_app
from ferry.control.leader import Leadership
from ferry.control.service import ControlPlane
from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.domain.leader import LeaderTerms
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
