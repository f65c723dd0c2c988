"""VM networks: a cluster-level layer-2 segment that every host provides as a Linux
bridge, the hosts joined by VXLAN (one VNI per network), a VM NIC a tap on the bridge.

Pure: names, validation, what each host is told (`HostNetwork`) and the digest by which
the control plane sees whether a host already has it. The agent does the I/O
(ferry/agent/networks.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from ferry.domain.errors import Conflict
from ferry.domain.specs import Frozen, HostFacts, Name

# A NIC on this "network" is QEMU user-mode networking: no bridge, reachable by nobody.
USER_NETWORK = "user"
VNI_MIN, VNI_MAX = 1, 2**24 - 1
FIRST_AUTO_VNI = 100
# VXLAN's headers (outer Ethernet, IPv4, UDP, VXLAN): a network's MTU plus these must fit
# the underlay's.
VXLAN_OVERHEAD = 50
# 1500 on the underlay minus VXLAN's overhead.
DEFAULT_MTU = 1450
VXLAN_PORT = 4789
# Endpoints outside the cluster one network may list (routers, the lab's client): each
# is a copy of every broadcast, on every host.
MAX_VTEPS = 64

Vni = Annotated[int, Field(ge=VNI_MIN, le=VNI_MAX, strict=True)]
Mtu = Annotated[int, Field(ge=576, le=9000, strict=True)]


def _unicast(address: IPv4Address, what: str) -> IPv4Address:
    if (address.is_multicast or address.is_unspecified or address.is_loopback
            or address == IPv4Address("255.255.255.255")):
        raise ValueError(f"{what} {address} is not a unicast address of another machine")
    return address


class NetworkSpec(Frozen):
    """What `ferry network create` stores."""

    name: Name
    vni: Vni
    mtu: Mtu = DEFAULT_MTU
    # Endpoints outside the cluster's hosts that take part in the segment (a router, the
    # lab's client machine): they receive its flooded frames like a host.
    vteps: tuple[IPv4Address, ...] = Field(default=(), max_length=MAX_VTEPS)

    @field_validator("name")
    @classmethod
    def _not_user(cls, value: str) -> str:
        if value == USER_NETWORK:
            raise ValueError(f"{USER_NETWORK!r} names user-mode networking (`--nic user`); "
                             "give the network another name")
        return value

    @field_validator("vteps")
    @classmethod
    def _vteps(cls, value: tuple[IPv4Address, ...]) -> tuple[IPv4Address, ...]:
        for address in value:
            _unicast(address, "VTEP")
        if len(set(value)) != len(value):
            raise ValueError("a VTEP is listed twice")
        return value


class HostNetwork(Frozen):
    """A network as one host provides it: its segment and the other endpoints."""

    name: Name
    vni: Vni
    mtu: Mtu = DEFAULT_MTU
    peers: tuple[IPv4Address, ...] = ()

    @model_validator(mode="after")
    def _peers(self) -> HostNetwork:
        for address in self.peers:
            _unicast(address, "VXLAN peer")
        return self

    @property
    def bridge(self) -> str:
        return bridge_name(self.vni)

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.vni)

    def digest(self) -> str:
        """Equal digests: the host has exactly this (the peers in any order)."""
        canonical = HostNetwork(name=self.name, vni=self.vni, mtu=self.mtu,
                                peers=tuple(sorted(set(self.peers), key=int)))
        return hashlib.sha256(canonical.model_dump_json().encode()).hexdigest()[:16]


# Linux interface names have at most 15 characters (IFNAMSIZ - 1).
def bridge_name(vni: int) -> str:
    return f"fyb{vni}"


def vxlan_name(vni: int) -> str:
    return f"fyx{vni}"


def tap_name(vm_uuid: str, nic: str) -> str:
    """Stable for the VM's lifetime (the same on source and destination hosts) and
    unique per NIC; 15 characters."""
    return "fyt" + hashlib.sha256(f"{vm_uuid}/{nic}".encode()).hexdigest()[:12]


def next_vni(used: Iterable[int]) -> int:
    taken = set(used)
    vni = FIRST_AUTO_VNI
    while vni in taken:
        vni += 1
    if vni > VNI_MAX:
        raise Conflict(f"no VXLAN network identifier from {FIRST_AUTO_VNI} up is free",
                       "give one with --vni, or delete networks that are no longer used")
    return vni


def host_view(networks: Iterable[NetworkSpec], host_address: str,
              host_addresses: Iterable[str]) -> tuple[HostNetwork, ...]:
    """What one host must provide: every network, its peers the other hosts' addresses
    and the network's own extra endpoints (never the host itself: an extra endpoint
    that is the host's own address would make it flood to itself)."""
    others = sorted({IPv4Address(a) for a in host_addresses if a != host_address}, key=int)
    try:
        me: IPv4Address | None = IPv4Address(host_address)
    except ValueError:
        me = None
    return tuple(
        HostNetwork(name=n.name, vni=n.vni, mtu=n.mtu,
                    peers=tuple(dict.fromkeys(p for p in [*others, *n.vteps] if p != me)))
        for n in sorted(networks, key=lambda n: n.name))


def out_of_step(names: Iterable[str], networks: Iterable[NetworkSpec], facts: HostFacts
                ) -> list[str]:
    """Which of the networks `names` the host provides as another segment than the
    cluster's (another VNI or MTU: a delete and re-create it missed). Peer lists are
    not compared: one a host has yet to lengthen (a host just joined) is the same
    segment, and heals at the next heartbeat."""
    wanted = {n.name: (n.vni, n.mtu) for n in networks if n.name in set(names)}
    return sorted(name for name, segment in wanted.items()
                  if name in facts.network_segments
                  and tuple(facts.network_segments[name]) != segment)


class Announce(Frozen):
    """QEMU's self-announce after a switchover (RARP from QEMU, and a gratuitous ARP from
    a virtio-net guest): bridges and VXLAN forwarding tables learn the new port at once
    instead of when the guest next happens to send. Milliseconds."""

    initial: int = Field(default=1, ge=1, le=10_000)
    max: int = Field(default=100, ge=1, le=100_000)
    rounds: int = Field(default=5, ge=0, le=100)
    step: int = Field(default=25, ge=0, le=10_000)

    def qmp(self) -> dict[str, int]:
        return {"initial": self.initial, "max": self.max, "rounds": self.rounds,
                "step": self.step}

    def migration_parameters(self) -> dict[str, int]:
        """The same timing as QEMU's automatic announce at the end of an incoming stream
        (rounds 0 turns that off)."""
        return {f"announce-{k}": v for k, v in self.qmp().items()}
