"""A guest sends only with its own NIC's MAC (vSphere's "forged transmits: reject"; one
nftables table per host).

Otherwise a guest could send frames with another VM's MAC: the bridges and the VXLAN
devices, which learn where a MAC lives from the frames they see, would send that VM's
traffic to it. Each VM NIC's tap is admitted with its NIC's MAC as source and nothing
else; other frames are dropped as they enter the bridge. A tap the table does not list
(made by an agent from before the filter) is left unfiltered rather than cut off.

The table is rewritten whole, in one transaction, whenever a NIC is plugged or
unplugged, from the agent's list of its taps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ferry.agent import nft
from ferry.domain.errors import InvalidInput

TABLE = "ferry_nics"
PURPOSE = "stop guests sending with another VM's MAC"
# What the rules interpolate: tap names (domain.networks.tap_name) and NicSpec MACs,
# checked again here because a quote or brace would change the script.
_TAP = re.compile(r"[a-z0-9]{1,15}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def ruleset(macs: Mapping[str, str]) -> str:
    """The nft script that (re)creates the table admitting each tap's frames only with
    its MAC as source (pure)."""
    for tap, mac in macs.items():
        if not _TAP.fullmatch(tap) or not _MAC.fullmatch(mac):
            raise InvalidInput(f"tap {tap!r} with MAC {mac!r} cannot be filtered",
                               "taps are named by the agent; MACs look like 52:54:00:12:34:56")
    if not macs:
        return nft.removal("bridge", TABLE)
    taps = ", ".join(f'"{tap}"' for tap in sorted(macs))
    pairs = ", ".join(f'"{tap}" . {mac}' for tap, mac in sorted(macs.items()))
    return "\n".join([
        *nft.replacing("bridge", TABLE),
        f"table bridge {TABLE} {{",
        f"  set taps {{ type ifname; elements = {{ {taps} }} }}",
        f"  set sources {{ type ifname . ether_addr; elements = {{ {pairs} }} }}",
        "  chain prerouting {",
        "    type filter hook prerouting priority -200; policy accept;",
        "    iifname @taps iifname . ether saddr != @sources counter drop",
        "  }",
        "}",
        ""])


async def admit_only(macs: Mapping[str, str]) -> None:
    """Each tap in `macs` sends with its MAC only (no taps: the table goes)."""
    await nft.apply(ruleset(macs), PURPOSE)
