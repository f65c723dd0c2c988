"""The agent's taps: a VM whose second tap cannot be made leaves no first one behind
(the kernel calls stood in for: test_taps_kernel.py and the lab tests make real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.agent import networks as agent_networks
from ferry.agent.networks import HostNetworks
from ferry.agent.taps import TapBusy, TapFailed
from ferry.domain.errors import Conflict, FerryError, InvalidInput
from ferry.domain.networks import HostNetwork, tap_name
from ferry.domain.specs import NicSpec
from tests.unit.test_compat_placement import SPEC


async def test_a_failed_plug_removes_the_taps_it_made(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"nics": (
        NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:01"),
        NicSpec(name="nic1", network="vmnet", mac="52:54:00:00:00:02"))})
    taps: set[str] = set()
    fail = {tap_name(spec.uuid, "nic1")}
    filtered: list[dict[str, str]] = []  # each NIC filter written (nic_filter.py)

    async def admit_only(macs: dict[str, str]) -> None:
        filtered.append(dict(macs))

    _fake_kernel(monkeypatch, taps, fail)
    monkeypatch.setattr(agent_networks.nic_filter, "admit_only", admit_only)
    nets = HostNetworks("10.0.0.1", tmp_path / "networks.json")
    nets._have = {"vmnet": HostNetwork(name="vmnet", vni=100, peers=())}
    with pytest.raises(FerryError, match="buffer space"):
        await nets.plug(spec)
    assert taps == set()
    # A tap that was there before (not made by this call) is not this call's to delete.
    taps.add(tap_name(spec.uuid, "nic0"))
    with pytest.raises(FerryError, match="buffer space"):
        await nets.plug(spec)
    assert taps == {tap_name(spec.uuid, "nic0")}
    taps.clear()
    # and a plug that works leaves both
    fail.clear()
    await nets.plug(spec)
    assert taps == {tap_name(spec.uuid, "nic0"), tap_name(spec.uuid, "nic1")}
    assert filtered == []  # the taps are the caller's to filter (filter_nics)


async def test_the_nic_filter_names_the_taps_of_the_vms_here(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each VM's taps with its NICs' MACs; a VM gone is left out at the next rewrite
    (its unplug runs no nft, on a migration's path)."""
    filtered: list[dict[str, str]] = []

    async def admit_only(macs: dict[str, str]) -> None:
        filtered.append(dict(macs))

    async def run(*argv: str, check: bool = True) -> str:
        return ""

    monkeypatch.setattr(agent_networks.nic_filter, "admit_only", admit_only)
    monkeypatch.setattr(agent_networks, "run", run)
    nets = HostNetworks("10.0.0.1", tmp_path / "networks.json")
    one = SPEC.model_copy(update={"nics": (
        NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:01"),
        NicSpec(name="nic1", network="user", mac="52:54:00:00:00:09"))})
    two = SPEC.model_copy(update={
        "name": "two", "uuid": "22222222-2222-4222-8222-222222222222", "nics": (
        NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:02"),)})
    tap1, tap2 = tap_name(one.uuid, "nic0"), tap_name(two.uuid, "nic0")
    await nets.filter_nics(one)
    await nets.filter_nics(two)
    assert filtered == [{tap1: "52:54:00:00:00:01"},
                        {tap1: "52:54:00:00:00:01", tap2: "52:54:00:00:00:02"}]
    await nets.filter_nics(two)  # nothing new: no nft run
    await nets.unplug(one)
    assert len(filtered) == 2
    await nets.filter_nics(one)  # back (a migration back): its rules are still there
    assert len(filtered) == 2
    await nets.unplug(one)
    await nets.unplug(two)
    three = two.model_copy(update={"name": "three",
                                   "uuid": "33333333-3333-4333-8333-333333333333"})
    tap3 = tap_name(three.uuid, "nic0")
    await nets.filter_nics(three)  # a rewrite: the taps gone are left out
    assert filtered[-1] == {tap3: "52:54:00:00:00:02"}
    # the same VM given another MAC is a rewrite too
    await nets.filter_nics(one.model_copy(update={"nics": (
        NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:0a"),)}))
    assert filtered[-1] == {tap3: "52:54:00:00:00:02", tap1: "52:54:00:00:00:0a"}
    await nets.unplug(one)
    # a refused rewrite changes nothing: the next one still names what it must
    async def refuse(macs: dict[str, str]) -> None:
        raise FerryError("nftables refused the rules")

    monkeypatch.setattr(agent_networks.nic_filter, "admit_only", refuse)
    with pytest.raises(FerryError, match="refused"):
        await nets.filter_nics(one)
    monkeypatch.setattr(agent_networks.nic_filter, "admit_only", admit_only)
    await nets.filter_nics(one)
    assert filtered[-1] == {tap3: "52:54:00:00:00:02", tap1: "52:54:00:00:00:01"}


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, taps: set[str], fail: set[str]) -> None:
    """The kernel's taps as the set `taps`; putting a tap of `fail` on its bridge fails."""
    def make_tap(name: str) -> None:
        taps.add(name)

    def plug_tap(name: str, mtu: int, bridge: str) -> None:
        assert name in taps and (mtu, bridge) == (1450, "fyb100")
        if name in fail:
            raise TapFailed(f"cannot put on bridge {bridge} the tap {name}: "
                            "No buffer space available")

    async def run(*argv: str, check: bool = True) -> str:
        assert argv[:3] == ("ip", "link", "delete")
        taps.discard(argv[3])
        return ""

    async def link_exists(name: str) -> bool:
        return name in taps

    monkeypatch.setattr(agent_networks.taps, "make_tap", make_tap)
    monkeypatch.setattr(agent_networks.taps, "plug_tap", plug_tap)
    monkeypatch.setattr(agent_networks, "run", run)
    monkeypatch.setattr(agent_networks, "link_exists", link_exists)


async def test_link_exists_asks_the_kernel() -> None:
    assert await agent_networks.link_exists("lo")
    assert not await agent_networks.link_exists("fyt-no-such")


async def test_a_network_too_large_for_the_link_under_it_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    async def run(*argv: str, check: bool = True) -> str:
        assert argv[:4] == ("ip", "-j", "addr", "show")
        return json.dumps([{"ifname": "eth0", "mtu": 1500}])

    monkeypatch.setattr(agent_networks, "run", run)
    nets = HostNetworks("10.0.0.1", tmp_path / "networks.json")
    await nets._check_underlay(HostNetwork(name="n", vni=7, mtu=1450, peers=()))
    with pytest.raises(InvalidInput, match=r"needs 1550 .* eth0 .* has 1500") as err:
        await nets._check_underlay(HostNetwork(name="n", vni=7, mtu=1500, peers=()))
    assert "--mtu 1450" in err.value.fix


async def test_a_stale_network_goes_before_a_new_one_takes_its_vni(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host that missed network A's delete learns of B, given A's freed VNI: A's
    devices (named after the VNI) go first, then B's are made, not the other way
    round (which would delete B's bridge and still report B ready)."""
    calls: list[tuple[str, str]] = []
    busy: set[str] = set()

    async def remove(self: HostNetworks, net: HostNetwork) -> None:
        if net.name in busy:
            raise Conflict(f"network {net.name} is still used by 1 VM NIC(s) on this host")
        calls.append(("remove", net.name))

    async def ensure(self: HostNetworks, net: HostNetwork) -> None:
        calls.append(("ensure", net.name))

    async def narrow(self: HostNetworks) -> None:
        return None

    monkeypatch.setattr(HostNetworks, "_remove", remove)
    monkeypatch.setattr(HostNetworks, "_ensure", ensure)
    monkeypatch.setattr(HostNetworks, "_narrow_filter", narrow)
    nets = HostNetworks("10.0.0.1", tmp_path / "networks.json")
    nets._have = {"a": HostNetwork(name="a", vni=100, peers=())}
    b = HostNetwork(name="b", vni=100, peers=())
    results = await nets.apply((b,))
    assert calls == [("remove", "a"), ("ensure", "b")]
    assert {r.name: r.ok for r in results} == {"a": True, "b": True}
    assert nets.names() == ("b",)
    # A stale network still carrying a NIC keeps its VNI: the new one is refused there.
    calls.clear()
    busy.add("a")
    nets._have = {"a": HostNetwork(name="a", vni=100, peers=())}
    results = await nets.apply((b,))
    assert calls == []
    assert {r.name: r.ok for r in results} == {"a": False, "b": False}
    assert "VNI 100 is still used here by VM NICs of deleted network a" in str(
        [r.error for r in results if r.name == "b"])
    assert nets.names() == ("a",)


async def test_a_refused_nic_filter_leaves_no_tap_the_attach_made(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A VM whose NIC filter cannot be set does not start, and its taps made for it go;
    one that was there before stays (not this call's to delete)."""
    spec = SPEC.model_copy(update={"nics": (
        NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:01"),
        NicSpec(name="nic1", network="vmnet", mac="52:54:00:00:00:02"))})
    taps = {tap_name(spec.uuid, "nic0")}

    async def refuse(macs: dict[str, str]) -> None:
        raise FerryError("nftables refused the rules")

    _fake_kernel(monkeypatch, taps, set())
    monkeypatch.setattr(agent_networks.nic_filter, "admit_only", refuse)
    nets = HostNetworks("10.0.0.1", tmp_path / "networks.json")
    nets._have = {"vmnet": HostNetwork(name="vmnet", vni=100, peers=())}
    with pytest.raises(FerryError, match="refused"):
        await nets.attach(spec, guest_waits=False)
    assert taps == {tap_name(spec.uuid, "nic0")}
    # a destination's attach returns at once; the failure comes with the filter's task
    filtered = await nets.attach(spec, guest_waits=True)
    with pytest.raises(FerryError, match="refused"):
        await filtered


async def test_a_tap_left_on_a_bridge_is_moved_by_ip(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """A tap already a bridge port (left over) is not this call's (not made, not
    deleted); `ip link set master` puts it on the network's bridge."""
    spec = SPEC.model_copy(update={"nics": (
        NicSpec(name="nic0", network="vmnet", mac="52:54:00:00:00:01"),)})
    tap = tap_name(spec.uuid, "nic0")
    ran: list[tuple[str, ...]] = []

    def make_tap(name: str) -> None:
        raise AssertionError("the tap exists: nothing to make")

    def plug_tap(name: str, mtu: int, bridge: str) -> None:
        raise TapBusy(f"tap {name} is a bridge port already")

    async def run(*argv: str, check: bool = True) -> str:
        ran.append(argv)
        return ""

    async def link_exists(name: str) -> bool:
        return name == tap

    monkeypatch.setattr(agent_networks.taps, "make_tap", make_tap)
    monkeypatch.setattr(agent_networks.taps, "plug_tap", plug_tap)
    monkeypatch.setattr(agent_networks, "run", run)
    monkeypatch.setattr(agent_networks, "link_exists", link_exists)
    nets = HostNetworks("10.0.0.1", tmp_path / "networks.json")
    nets._have = {"vmnet": HostNetwork(name="vmnet", vni=100, peers=())}
    assert await nets.plug(spec) == []
    assert ran == [("ip", "link", "set", tap, "master", "fyb100", "up")]
