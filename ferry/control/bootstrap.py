"""Create a cluster's trust before its control plane first runs: the CA, the control
plane's certificate, the first admin token, and join tokens for the first hosts.

Synchronous wrappers, for `ferry init` and the lab (which run no event loop)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ferry.domain.auth import TokenRole, format_token, new_secret
from ferry.pki import ControlPki, write_private
from ferry.store import Store

JOIN_TTL_S = 3600


async def _init(db_url: str, pki: ControlPki, addresses: tuple[str, ...]) -> str | None:
    pki.init(addresses)
    store = await Store.open(db_url)
    try:
        if await store.security.has_tokens():
            return None
        secret = new_secret()
        info = await store.security.add_token("admin", TokenRole.ADMIN, secret, None)
        return format_token(info.id, secret)
    finally:
        await store.close()


def init_cluster(db_url: str, pki: ControlPki, addresses: tuple[str, ...],
                 token_file: Path | None = None) -> str | None:
    """The admin token (made now), or None if the cluster already had tokens."""
    token = asyncio.run(_init(db_url, pki, addresses))
    if token is not None and token_file is not None:
        write_private(token_file, f"{token}\n".encode())
    return token


async def _join_tokens(db_url: str, hosts: tuple[str, ...]) -> dict[str, str]:
    store = await Store.open(db_url)
    try:
        out = {}
        for host in hosts:
            secret = new_secret()
            token_id = await store.security.add_join_token(host, secret, JOIN_TTL_S)
            out[host] = format_token(token_id, secret)
        return out
    finally:
        await store.close()


def join_tokens(db_url: str, hosts: tuple[str, ...]) -> dict[str, str]:
    """One single-use join token per host (the lab hands each to its agent)."""
    return asyncio.run(_join_tokens(db_url, hosts))
