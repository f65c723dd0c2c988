"""Creating a network over a real store (no hosts): two creates racing for the lowest
free VNI both succeed, with different VNIs; a VNI the user gave is not changed for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.control.agents import AgentPool
from ferry.control.networks import Networks
from ferry.domain.errors import Conflict
from ferry.domain.networks import NetworkSpec
from ferry.store import Store
from ferry.store.networks import NetworkStore
from ferry.store.store import sqlite_url


async def test_a_create_that_loses_the_race_for_a_free_vni_picks_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await Store.open(sqlite_url(str(tmp_path / "ferry.db")))
    nets = Networks(store, AgentPool())
    real_add = NetworkStore.add
    raced: list[int] = []

    async def add_after_a_rival(self: NetworkStore, spec: NetworkSpec) -> NetworkSpec:
        if not raced:  # another create stores the same VNI just before this one
            raced.append(spec.vni)
            await real_add(self, NetworkSpec(name=f"rival{spec.vni}", vni=spec.vni))
        return await real_add(self, spec)

    monkeypatch.setattr(NetworkStore, "add", add_after_a_rival)
    try:
        view = await nets.create("mine", None, None, ())
        assert raced == [100] and view.spec.vni == 101
        assert {n.name: n.vni for n in await store.networks.all()} == {"rival100": 100,
                                                                      "mine": 101}
        raced.clear()
        with pytest.raises(Conflict, match="VNI 102 is already used"):
            await nets.create("given", 102, None, ())
        assert "given" not in {n.name for n in await store.networks.all()}
    finally:
        await nets.close()
        await store.close()
