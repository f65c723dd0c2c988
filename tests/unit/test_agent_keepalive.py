"""The control plane reuses idle connections to an agent, and the agent never closes one
first (a request sent as the server closes its connection would fail)."""

from __future__ import annotations

from pathlib import Path

import httpx

from ferry.agent import client, main
from ferry.pki.serve import tls_config


def test_the_agent_keeps_a_connection_longer_than_the_control_plane() -> None:
    assert main.KEEPALIVE_S > client.KEEPALIVE_S > 5  # httpx's and uvicorn's 5 s


def test_the_agent_server_is_configured_with_it() -> None:
    config = tls_config(object(), "127.0.0.1", 0, ca=Path("ca"), cert=Path("c"),
                        key=Path("k"), require_client_cert=True,
                        keep_alive_s=main.KEEPALIVE_S)
    assert config.timeout_keep_alive == main.KEEPALIVE_S


def test_the_agent_client_keeps_idle_connections() -> None:
    agent = client.AgentClient("h1", "https://127.0.0.1:1")
    pool = agent._http._transport._pool  # type: ignore[attr-defined]
    assert pool._keepalive_expiry == client.KEEPALIVE_S
    assert isinstance(agent._http, httpx.AsyncClient)
