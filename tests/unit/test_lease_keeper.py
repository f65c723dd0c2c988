"""The agent's lease keeper (ferry/agent/leases.py) on a temporary directory, two keepers
standing for two hosts, with fast timing and fake guests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.agent.leases import LeaseKeeper
from ferry.domain.errors import Conflict
from ferry.domain.leases import LeaseTiming

FAST = LeaseTiming(renew_s=0.05, fence_s=0.3, expire_s=0.5)


class FakeGuests:
    def __init__(self) -> None:
        self.running: set[str] = set()
        self.paused: set[str] = set()
        self.lost_vms: list[str] = []

    def alive(self, vm: str) -> bool:
        return vm in self.running or vm in self.paused

    async def executing(self, vm: str) -> bool:
        return vm in self.running

    async def pause(self, vm: str) -> bool:
        if vm in self.running:
            self.running.discard(vm)
            self.paused.add(vm)
            return True
        return False

    async def unpause(self, vm: str) -> None:
        if vm in self.paused:
            self.paused.discard(vm)
            self.running.add(vm)

    async def lost(self, vm: str) -> None:
        self.lost_vms.append(vm)
        self.running.discard(vm)
        self.paused.discard(vm)


def keeper(root: Path, host: str) -> tuple[LeaseKeeper, FakeGuests]:
    guests = FakeGuests()
    return LeaseKeeper(host, "shared", root, FAST, f"127.0.0.1:{1}", guests), guests


async def test_a_lease_is_held_by_one_host_and_taken_only_after_it_expires(
        tmp_path: Path) -> None:
    k1, g1 = keeper(tmp_path, "h1")
    k2, _ = keeper(tmp_path, "h2")
    await k1.start([])
    await k2.start([])
    try:
        await k1.acquire("vm1")
        g1.running.add("vm1")
        with pytest.raises(Conflict, match="holds the lease"):
            await k2.acquire("vm1", wait_s=0.3)  # h1 renews: never expires
        await k1.close()  # h1 dies: nobody renews
        await k2.acquire("vm1", wait_s=3.0)
        assert "vm1" in k2.held and k2.held["vm1"].generation == 2
    finally:
        await k1.close()
        await k2.close()


async def test_a_released_lease_is_free_at_once(tmp_path: Path) -> None:
    k1, _ = keeper(tmp_path, "h1")
    k2, _ = keeper(tmp_path, "h2")
    await k1.start([])
    await k2.start([])
    try:
        await k1.acquire("vm1")
        await k1.release("vm1")
        await k2.acquire("vm1")  # no wait
        assert k2.held["vm1"].owner == "h2"
    finally:
        await k1.close()
        await k2.close()


async def test_a_lease_taken_for_a_start_is_kept_while_the_qemu_launches(
        tmp_path: Path) -> None:
    """Rounds between taking the lease and the launch registering the QEMU renew it;
    they must not release it as "its QEMU is gone" (the guest would then run on a
    released lease that nobody renews or fences)."""
    k1, g1 = keeper(tmp_path, "h1")
    await k1.start([])
    try:
        with k1.starting("vm1"):
            await k1.take_over("vm1")
            first = k1.held["vm1"].counter
            await asyncio.sleep(FAST.renew_s * 6)  # several rounds; no QEMU yet
            assert "vm1" in k1.held and k1.held["vm1"].counter > first
            assert not k1.files.read_lease("vm1").released  # type: ignore[union-attr]
            g1.running.add("vm1")  # the launch registered it
        await asyncio.sleep(FAST.renew_s * 3)
        assert "vm1" in k1.held
        g1.running.discard("vm1")  # and once it is really gone, the lease is released
        await asyncio.sleep(FAST.renew_s * 3)
        assert "vm1" not in k1.held
        assert k1.files.read_lease("vm1").released  # type: ignore[union-attr]
    finally:
        await k1.close()


async def test_a_handover_makes_the_old_holder_yield(tmp_path: Path) -> None:
    k1, g1 = keeper(tmp_path, "h1")
    k2, g2 = keeper(tmp_path, "h2")
    await k1.start([])
    await k2.start([])
    try:
        await k1.acquire("vm1")
        g1.running.add("vm1")
        await k2.take_over("vm1")
        g2.running.add("vm1")  # the migration's destination, at switchover
        for _ in range(40):
            await asyncio.sleep(FAST.renew_s)
            if g1.lost_vms:
                break
        assert g1.lost_vms == ["vm1"] and "vm1" not in k1.held
        assert k2.held["vm1"].owner == "h2"
    finally:
        await k1.close()
        await k2.close()


async def test_an_owner_cut_from_the_datastore_fences_before_expiry(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    k1, g1 = keeper(tmp_path, "h1")
    await k1.start([])
    try:
        await k1.acquire("vm1")
        g1.running.add("vm1")

        def unreachable(*_: object) -> None:
            raise OSError("datastore gone")

        monkeypatch.setattr(k1.files, "write_lease", unreachable)
        await asyncio.sleep(FAST.fence_s + 4 * FAST.renew_s)
        assert "vm1" in g1.paused and "vm1" not in g1.running  # fenced
        monkeypatch.undo()
        await asyncio.sleep(FAST.confirm_s + 4 * FAST.renew_s)
        assert "vm1" in g1.running  # still ours: resumed after the confirmation
    finally:
        await k1.close()


async def test_an_adopted_guest_whose_lease_moved_is_lost(tmp_path: Path) -> None:
    k2, _ = keeper(tmp_path, "h2")
    await k2.start([])
    await k2.acquire("vm1")
    await k2.close()
    k1, g1 = keeper(tmp_path, "h1")
    g1.running.add("vm1")
    await k1.start(["vm1"])
    try:
        assert g1.lost_vms == ["vm1"] and "vm1" not in k1.held
    finally:
        await k1.close()


async def test_the_view_reports_hosts_and_leases(tmp_path: Path) -> None:
    k1, g1 = keeper(tmp_path, "h1")
    await k1.start([])
    try:
        await k1.acquire("vm1")
        g1.running.add("vm1")
        await asyncio.sleep(4 * FAST.renew_s)
        view = k1.view()
        assert view.ok and view.hosts["h1"] > 0
        assert view.leases["vm1"].owner == "h1" and view.leases["vm1"].counter > 0
    finally:
        await k1.close()


async def test_a_restarted_agent_frees_the_leases_of_vms_it_no_longer_runs(
        tmp_path: Path) -> None:
    """Host h1 went down with vm1 running (its lease never released). Its agent comes
    back and finds no QEMU for vm1: the lease is freed, so vm1 starts elsewhere at once
    (before: only after an operator waited out the expiry). vm2 still has a run directory
    (a QEMU may live): its lease stays."""
    old, _ = keeper(tmp_path, "h1")
    await old.start([])
    await old.acquire("vm1")
    await old.acquire("vm2")
    await old.close()  # the host dies: nothing released
    back, _ = keeper(tmp_path, "h1")
    other, _ = keeper(tmp_path, "h2")
    await back.start([], present=["vm2"])
    await other.start([])
    try:
        await other.acquire("vm1")  # no wait: free
        assert other.held["vm1"].owner == "h2"
        with pytest.raises(Conflict, match="holds the lease"):
            await other.acquire("vm2")
    finally:
        await back.close()
        await other.close()
