"""Admit VXLAN only from the cluster's own endpoints (one nftables table per host).

VXLAN has no authentication: anyone who can send UDP to port 4789 of a host could put
frames on a VM network, and with MAC learning on (which lets a migrated guest's
announcement re-point the other hosts) poison the forwarding table so that a guest's
traffic goes to them. So the host drops every VXLAN datagram whose source is not a peer
of the network its VNI names (the other hosts, and extra endpoints that network lists):
an extra endpoint of one network (the lab's client) reaches that network only.

The table is replaced atomically by one `nft -f` script each time the peers change, and
removed when the host has no network left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address

from ferry.agent import nft
from ferry.domain.networks import VXLAN_PORT

TABLE = "ferry_vxlan"
PURPOSE = "limit VXLAN to the cluster's hosts"
# The VNI: 24 bits after the UDP header (8 bytes) and the VXLAN flags word (4 bytes).
VNI_FIELD = "@th,96,24"


def _addresses(peers: Iterable[IPv4Address]) -> str:
    return ", ".join(str(a) for a in sorted(set(peers), key=int))


def ruleset(networks: Mapping[int, Iterable[IPv4Address]]) -> str:
    """The nft script that (re)creates the table admitting, for each VNI, only that
    network's peers (pure)."""
    peers = {vni: _addresses(p) for vni, p in sorted(networks.items())}
    anyone = _addresses(a for p in networks.values() for a in p)
    elements = f"elements = {{ {anyone} }}" if anyone else ""
    vni_rules = [
        # A network without peers (a one-host cluster) takes VXLAN from nobody.
        f"    meta nfproto ipv4 udp dport {VXLAN_PORT} {VNI_FIELD} {vni} "
        + (f"ip saddr != {{ {who} }} " if who else "") + "counter drop"
        for vni, who in peers.items()]
    known = ", ".join(str(vni) for vni in peers)
    return "\n".join([
        *nft.replacing("inet", TABLE),
        f"table inet {TABLE} {{",
        f"  set peers {{ type ipv4_addr; {elements} }}",
        "  chain input {",
        "    type filter hook input priority -10; policy accept;",
        f"    meta nfproto ipv4 udp dport {VXLAN_PORT} ip saddr != @peers counter drop",
        *vni_rules,
        *([f"    meta nfproto ipv4 udp dport {VXLAN_PORT} {VNI_FIELD} != {{ {known} }} "
           "counter drop"] if known else []),
        f"    meta nfproto ipv6 udp dport {VXLAN_PORT} counter drop",
        "  }",
        "}",
        ""])


def removal() -> str:
    return nft.removal("inet", TABLE)


async def admit_only(networks: Mapping[int, Iterable[IPv4Address]]) -> None:
    """Allow VXLAN for each VNI from that network's peers, and from nobody else."""
    await nft.apply(ruleset(networks), PURPOSE)


async def remove() -> None:
    await nft.apply(removal(), PURPOSE)
