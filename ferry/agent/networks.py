"""This host's side of the VM networks: a bridge and a VXLAN device per network, a tap
per VM NIC (iproute2 commands as argv lists, never a shell; a tap is made in-process:
agent/taps.py).

What the control plane last asked for is kept in `networks.json` beside the run
directory, so a restarted agent reports it (the kernel keeps the devices) and the
control plane does not push it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from ferry import commands
from ferry.agent import nic_filter, taps, vxlan_filter
from ferry.agent.models import NetworkResult
from ferry.domain.errors import Conflict, FerryError, HostUnavailable, InvalidInput
from ferry.domain.networks import (
    USER_NETWORK,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    HostNetwork,
    bridge_name,
    tap_name,
)
from ferry.domain.specs import NicSpec, VmSpec

log = logging.getLogger("ferry.agent.networks")
COMMAND_TIMEOUT_S = 15.0
ZERO_MAC = "00:00:00:00:00:00"
_SAVED = TypeAdapter(tuple[HostNetwork, ...])


class NetworkCommandFailed(HostUnavailable):
    """An iproute2 command failed on this host (HTTP 502, like other host failures)."""


async def run(*argv: str, check: bool = True, stdin: bytes | None = None,
              shown: str | None = None) -> str:
    """`shown`: how errors name the command (default: argv)."""
    shown = shown or " ".join(argv)
    try:
        done = await commands.run(*argv, timeout_s=COMMAND_TIMEOUT_S, stdin=stdin)
    except TimeoutError:
        raise NetworkCommandFailed(f"`{shown}` did not finish in "
                                   f"{COMMAND_TIMEOUT_S:.0f} s") from None
    if check and done.returncode != 0:
        raise NetworkCommandFailed(f"`{shown}` failed: {done.err}")
    return done.out


def _no_ipv6(dev: str) -> None:
    """No address of this host on a VM network: without it a bridge that is up gets an
    IPv6 link-local one, through which every guest on the segment reaches the host's
    services listening on `::`. (This process's /proc/sys/net is its namespace's.)"""
    path = Path("/proc/sys/net/ipv6/conf") / dev / "disable_ipv6"
    try:
        path.write_text("1\n")
    except FileNotFoundError:
        return  # IPv6 is off in this kernel: nothing to take away
    except OSError as exc:
        raise NetworkCommandFailed(f"cannot turn IPv6 off on {dev}: {exc}") from exc


async def link_exists(name: str) -> bool:
    """Whether this network namespace has a link `name` (asked of the kernel directly:
    no `ip` process on a migration's path)."""
    return taps.link_exists(name)


async def _link_details(name: str) -> dict[str, object] | None:
    out = await run("ip", "-d", "-j", "link", "show", "dev", name, check=False)
    try:
        links = json.loads(out) if out.strip() else []
    except ValueError:
        return None
    return links[0] if links else None


class HostNetworks:
    def __init__(self, local_address: str, state_file: Path) -> None:
        self.local = local_address
        self.state_file = state_file
        self._have: dict[str, HostNetwork] = {}
        self._lock = asyncio.Lock()
        self.max_mtu: int | None = None  # probe_underlay: unknown until probed
        self._macs: dict[str, str] = {}  # tap -> the only source MAC its guest may use
        self._live: set[str] = set()  # taps of VMs plugged here (kept at the next rewrite)
        self._nic_lock = asyncio.Lock()

    def load(self) -> None:
        try:
            saved = _SAVED.validate_json(self.state_file.read_bytes())
        except (OSError, ValidationError):
            return  # nothing applied yet (or unreadable): the control plane pushes again
        self._have = {n.name: n for n in saved}

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_bytes(_SAVED.dump_json(tuple(self._have.values())))
        os.replace(tmp, self.state_file)

    # --- what the facts report -----------------------------------------------
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._have))

    def mtus(self) -> dict[str, int]:
        return {name: net.mtu for name, net in self._have.items()}

    def _present(self) -> list[HostNetwork]:
        """The networks applied whose bridge and VXLAN device still exist. One deleted
        under the agent (by hand, by another tool) is reported missing, so the control
        plane pushes it again (and meanwhile sends no VM here)."""
        return [net for _, net in sorted(self._have.items())
                if taps.link_exists(net.bridge) and taps.link_exists(net.vxlan)]

    def digests(self) -> dict[str, str]:
        return {net.name: net.digest() for net in self._present()}

    def segments(self) -> dict[str, tuple[int, int]]:
        return {net.name: (net.vni, net.mtu) for net in self._present()}

    # --- the control plane's desired state -----------------------------------------
    async def apply(self, wanted: tuple[HostNetwork, ...]) -> list[NetworkResult]:
        """Make this host provide exactly `wanted` (idempotent). A network still used by
        a tap is kept and reported, never torn from under a VM."""
        names = [n.name for n in wanted]
        if len(set(names)) != len(names) or len({n.vni for n in wanted}) != len(wanted):
            raise InvalidInput("networks must have unique names and VNIs")
        by_name = {n.name: n for n in wanted}
        results = []
        async with self._lock:
            # Stale networks go first: devices are named after the VNI, and a network
            # created while this host was away may have been given a deleted one's VNI.
            kept: dict[int, str] = {}  # VNI -> the stale network still holding it
            for old in [n for n in self._have.values()
                        if n.name not in by_name or by_name[n.name].vni != n.vni]:
                try:
                    await self._remove(old)
                    del self._have[old.name]
                    if old.name not in by_name:
                        results.append(NetworkResult(name=old.name, ok=True))
                except FerryError as exc:
                    kept[old.vni] = old.name
                    if old.name not in by_name:
                        results.append(NetworkResult(name=old.name, ok=False,
                                                     error=str(exc)))
                    else:
                        log.warning("network %s: %s", old.name, exc)
            for net in wanted:
                try:
                    if net.name in self._have and self._have[net.name].vni != net.vni:
                        raise Conflict(f"network {net.name} still has VNI "
                                       f"{self._have[net.name].vni} on this host, used by "
                                       "VM NICs", "stop or move those VMs first")
                    if net.vni in kept:
                        raise Conflict(f"VNI {net.vni} is still used here by VM NICs of "
                                       f"deleted network {kept[net.vni]}",
                                       "stop or move those VMs first")
                    await self._ensure(net)
                    self._have[net.name] = net
                    results.append(NetworkResult(name=net.name, ok=True))
                except FerryError as exc:
                    log.warning("network %s: %s", net.name, exc)
                    results.append(NetworkResult(name=net.name, ok=False, error=str(exc)))
            self._save()
            await self._narrow_filter()
        return results

    async def restore_filter(self) -> None:
        """At agent start: the VXLAN filter for the networks kept from before (the
        kernel keeps devices and rules; this also covers an agent that predates it)."""
        async with self._lock:
            if self._have:  # none: nothing to filter (a deleted last network took it)
                await self._narrow_filter()

    async def _narrow_filter(self) -> None:
        """Peers of the networks this host has, and nobody else (best effort: a failure
        here leaves a wider filter in place, and is logged)."""
        try:
            if self._have:
                await vxlan_filter.admit_only(self._peers())
            else:
                await vxlan_filter.remove()
        except FerryError as exc:
            log.warning("VXLAN filter not updated: %s", exc)

    def _peers(self, *extra: HostNetwork) -> dict[int, tuple[IPv4Address, ...]]:
        """VNI -> who may send its VXLAN here."""
        return {net.vni: net.peers for net in (*self._have.values(), *extra)}

    async def _underlay(self) -> list[dict[str, object]]:
        """The link(s) holding this host's VXLAN address, as `ip -j` shows them."""
        out = await run("ip", "-j", "addr", "show", "to", f"{self.local}/32", check=False)
        try:
            links = json.loads(out) if out.strip() else []
        except ValueError:
            return []
        return [link for link in links if isinstance(link, dict)]

    async def probe_underlay(self) -> None:
        """Learn the largest segment MTU this host carries (its facts report it, so the
        control plane refuses a network too large for a host before recording it)."""
        mtus = [m for link in await self._underlay() if isinstance(m := link.get("mtu"), int)]
        self.max_mtu = min(mtus) - VXLAN_OVERHEAD if mtus else None

    async def _check_underlay(self, net: HostNetwork) -> None:
        """A segment's frames plus VXLAN's headers must fit the link they cross: larger,
        they are dropped (silently, as far as the guests can tell)."""
        for link in await self._underlay():
            mtu = link.get("mtu")
            if isinstance(mtu, int) and net.mtu + VXLAN_OVERHEAD > mtu:
                raise InvalidInput(
                    f"network {net.name}'s MTU {net.mtu} needs {net.mtu + VXLAN_OVERHEAD} "
                    f"on the link under it, and {link.get('ifname')} ({self.local}) here "
                    f"has {mtu}", f"create the network with --mtu {mtu - VXLAN_OVERHEAD} "
                    "or less, or raise that link's MTU")

    async def _ensure(self, net: HostNetwork) -> None:
        br, vx = net.bridge, net.vxlan
        await self._check_underlay(net)
        if not await link_exists(br):
            await run("ip", "link", "add", br, "type", "bridge", "stp_state", "0")
        details = await _link_details(vx)
        info = (details or {}).get("linkinfo", {})
        data = info.get("info_data", {}) if isinstance(info, dict) else {}
        if details is not None and (data.get("id") != net.vni or data.get("local") != self.local):
            await run("ip", "link", "delete", vx)
            details = None
        if details is None:
            # Learning on: the source VTEP of a frame tells where its MAC lives, so a
            # migrated guest's announcement re-points every host at once.
            await run("ip", "link", "add", vx, "type", "vxlan", "id", str(net.vni),
                      "local", self.local, "dstport", str(VXLAN_PORT), "learning")
        await run("ip", "link", "set", vx, "mtu", str(net.mtu), "master", br)
        await run("ip", "link", "set", br, "mtu", str(net.mtu))
        for dev in (br, vx):
            _no_ipv6(dev)
        await self._flood_list(vx, {str(p) for p in net.peers})
        # Before the device is up: from then on only the cluster's endpoints reach it.
        # A host that cannot filter does not provide the network (the error says why).
        await vxlan_filter.admit_only(self._peers(net))
        await run("ip", "link", "set", vx, "up")
        await run("ip", "link", "set", br, "up")

    async def _flood_list(self, vx: str, peers: set[str]) -> None:
        """Head-end replication: broadcast and unknown frames go to every peer."""
        out = await run("bridge", "-j", "fdb", "show", "dev", vx)
        entries = json.loads(out) if out.strip() else []
        have = {e.get("dst") for e in entries if e.get("mac") == ZERO_MAC and e.get("dst")}
        for dst in sorted(peers - have):
            await run("bridge", "fdb", "append", ZERO_MAC, "dev", vx, "dst", dst)
        for dst in sorted(have - peers):
            await run("bridge", "fdb", "del", ZERO_MAC, "dev", vx, "dst", str(dst))

    async def _remove(self, net: HostNetwork) -> None:
        out = await run("ip", "-j", "link", "show", "master", net.bridge, check=False)
        ports = [p.get("ifname") for p in (json.loads(out) if out.strip() else [])]
        taps = [p for p in ports if isinstance(p, str) and p.startswith("fyt")]
        if taps:
            raise Conflict(f"network {net.name} is still used by {len(taps)} VM NIC(s) on "
                           "this host", "stop or move those VMs first")
        await run("ip", "link", "delete", net.vxlan, check=False)
        await run("ip", "link", "delete", net.bridge, check=False)

    # --- VM NICs -----------------------------------------------------------------
    def check(self, spec: VmSpec, host: str) -> None:
        for nic in spec.nics:
            if nic.network != USER_NETWORK and nic.network not in self._have:
                raise InvalidInput(f"host {host} has no network {nic.network} "
                                   f"(NIC {nic.name})",
                                   f"create it with `ferry network create {nic.network}`, "
                                   "or use --nic user")

    def bridge_of(self, nic: NicSpec) -> str | None:
        net = self._have.get(nic.network)
        return bridge_name(net.vni) if net is not None else None

    @staticmethod
    def _taps(spec: VmSpec) -> dict[str, str]:
        """The VM's taps and each one's MAC."""
        return {tap_name(spec.uuid, nic.name): nic.mac
                for nic in spec.nics if nic.network != USER_NETWORK}

    async def filter_nics(self, spec: VmSpec) -> None:
        """Let the VM's guest send on its taps with its NICs' MACs only (the whole NIC
        filter rewritten: agent/nic_filter.py). Before its guest runs; a tap need not
        exist yet. Raises if the rules cannot be set (the VM must not start then)."""
        want = self._taps(spec)
        async with self._nic_lock:
            # Rules already naming these taps with these MACs (the VM was here before:
            # unplug leaves them) need no nft run; a rewrite drops gone VMs' taps.
            if any(self._macs.get(tap) != mac for tap, mac in want.items()):
                macs = {tap: mac for tap, mac in self._macs.items() if tap in self._live}
                macs.update(want)
                await nic_filter.admit_only(macs)
                self._macs = macs
            self._live.update(want)

    async def guard_adopted(self, specs: Iterable[VmSpec]) -> None:
        """At agent start: the NIC filter for the VMs adopted (and no other). None
        adopted: left as it is (what it names is gone; the next VM rewrites it)."""
        macs = {tap: mac for spec in specs for tap, mac in self._taps(spec).items()}
        if not macs:
            return
        async with self._nic_lock:
            try:
                await nic_filter.admit_only(macs)
                self._macs = macs
                self._live = set(macs)
            except FerryError as exc:
                log.warning("NIC filter not restored: %s", exc)

    async def attach(self, spec: VmSpec, guest_waits: bool) -> asyncio.Task[None]:
        """The VM's taps (plug) and their filter (filter_nics), side by side. Unless
        `guest_waits` (a migration's destination, whose guest runs only on a later
        `cont`), the filter is in place on return; otherwise the caller awaits the
        returned task before the guest can run. A failure leaves no tap this call made
        (a tap that was there before is not its to delete)."""
        filtered = asyncio.create_task(self.filter_nics(spec))
        filtered.add_done_callback(lambda t: t.cancelled() or t.exception())
        made: list[str] = []
        try:
            made = await self.plug(spec)
            if not guest_waits:
                await filtered
        except Exception:
            filtered.cancel()
            await self._delete(made)
            raise
        return filtered

    async def plug(self, spec: VmSpec) -> list[str]:
        """A tap per bridged NIC, on its network's bridge, before QEMU opens it (the
        caller filters them: filter_nics); returns the taps it made."""
        self.check(spec, "this host")
        made: list[str] = []
        try:
            for nic in spec.nics:
                if nic.network == USER_NETWORK:
                    continue
                net = self._have[nic.network]
                tap = tap_name(spec.uuid, nic.name)
                if not await link_exists(tap):
                    made.append(tap)  # before: a failure part-way may have made it
                    taps.make_tap(tap)
                try:
                    taps.plug_tap(tap, net.mtu, net.bridge)
                except taps.TapBusy:  # a port already (left over): `ip` moves it
                    await run("ip", "link", "set", tap, "master", net.bridge, "up")
        except Exception:
            # A VM that does not start leaves none of the taps this call made.
            await self._delete(made)
            raise
        return made

    async def _delete(self, taps: list[str]) -> None:
        for tap in taps:
            if await link_exists(tap):
                await run("ip", "link", "delete", tap, check=False)

    async def unplug(self, spec: VmSpec) -> None:
        """Delete the VM's taps. Their filter entries stay in the kernel until the next
        rewrite (no nft run on a migration's path): an entry for a tap that is gone
        filters nothing, and its name returns only with the same VM's NIC."""
        taps = self._taps(spec)
        for tap in taps:
            await run("ip", "link", "delete", tap, check=False)
        self._live.difference_update(taps)
