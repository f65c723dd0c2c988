"""Running one nftables script as one transaction (`nft -f -`): the agent's filters
(vxlan_filter.py, nic_filter.py) each replace their own table this way."""

from __future__ import annotations

from ferry import commands
from ferry.domain.errors import HostUnavailable

COMMAND_TIMEOUT_S = 15.0


class FilterFailed(HostUnavailable):
    """nftables refused the rules, or is not installed (HTTP 502, a host failure)."""


async def apply(script: str, purpose: str) -> None:
    """Run `script`; `purpose` says in errors what the rules were for."""
    try:
        done = await commands.run("nft", "-f", "-", timeout_s=COMMAND_TIMEOUT_S,
                                  stdin=script.encode())
    except FileNotFoundError:
        raise FilterFailed(f"nftables (`nft`) is not installed: cannot {purpose}",
                           "apt-get install nftables") from None
    except TimeoutError:
        raise FilterFailed(f"`nft -f -` did not finish in {COMMAND_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise FilterFailed(f"nftables refused the rules to {purpose}: {done.err}")


def replacing(family: str, table: str) -> list[str]:
    """The script's first lines: `add` then `delete` makes the delete succeed whether or
    not the table existed; the whole script is one transaction, so the old rules hold
    until the new ones do."""
    return [f"add table {family} {table}", f"delete table {family} {table}"]


def removal(family: str, table: str) -> str:
    return "\n".join([*replacing(family, table), ""])
