"""Admit VXLAN only from the cluster's own endpoints (one nftables table per host).

VXLAN has no authentication: anyone who can send UDP to port 4789 of a host could put
frames on a VM network, and with MAC learning on (which lets a migrated guest's
announcement re-point the other hosts) poison the forwarding table so that a guest's
traffic goes to them. So the host drops every VXLAN datagram whose source is not a peer
of one of its networks (the other hosts, and extra endpoints the network names).

The table is replaced atomically by one `nft -f` script each time the peers change, and
removed when the host has no network left.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

from ferry import commands
from ferry.domain.errors import HostUnavailable
from ferry.domain.networks import VXLAN_PORT

TABLE = "ferry_vxlan"
COMMAND_TIMEOUT_S = 15.0


class FilterFailed(HostUnavailable):
    """nftables refused the rules, or is not installed (HTTP 502, a host failure)."""


def ruleset(peers: Iterable[IPv4Address]) -> str:
    """The nft script that (re)creates the table admitting only `peers` (pure)."""
    addresses = sorted(set(peers), key=int)
    elements = f"elements = {{ {', '.join(str(a) for a in addresses)} }}" if addresses else ""
    return "\n".join([
        # `add` then `delete` makes the delete succeed whether or not it existed; the
        # whole script is one transaction, so there is no moment without the rule.
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f"  set peers {{ type ipv4_addr; {elements} }}",
        "  chain input {",
        "    type filter hook input priority -10; policy accept;",
        f"    meta nfproto ipv4 udp dport {VXLAN_PORT} ip saddr != @peers counter drop",
        f"    meta nfproto ipv6 udp dport {VXLAN_PORT} counter drop",
        "  }",
        "}",
        ""])


def removal() -> str:
    return f"add table inet {TABLE}\ndelete table inet {TABLE}\n"


async def apply(script: str) -> None:
    try:
        done = await commands.run("nft", "-f", "-", timeout_s=COMMAND_TIMEOUT_S,
                                  stdin=script.encode())
    except FileNotFoundError:
        raise FilterFailed("nftables (`nft`) is not installed: VXLAN cannot be limited to "
                           "the cluster's hosts", "apt-get install nftables") from None
    except TimeoutError:
        raise FilterFailed(f"`nft -f -` did not finish in {COMMAND_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise FilterFailed(f"nftables refused the VXLAN filter: {done.err}")


async def admit_only(peers: Iterable[IPv4Address]) -> None:
    """Allow VXLAN from `peers` and from nobody else."""
    await apply(ruleset(peers))


async def remove() -> None:
    await apply(removal())
