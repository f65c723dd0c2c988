"""Idempotent agent calls ride out a refused connection; others are never repeated."""

from __future__ import annotations

import httpx
import pytest

from ferry.agent.client import AgentClient
from ferry.domain.errors import HostUnavailable


def flaky(fail_first: int) -> tuple[httpx.MockTransport, list[str]]:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) <= fail_first:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=[])

    return httpx.MockTransport(handle), seen


async def test_a_get_is_retried_after_refused_connections() -> None:
    transport, seen = flaky(2)
    client = AgentClient("host1", "https://h1", transport=transport)
    assert await client.list_vms() == []
    assert seen == ["GET", "GET", "GET"]


async def test_a_post_is_not_repeated() -> None:
    transport, seen = flaky(1)
    client = AgentClient("host1", "https://h1", transport=transport)
    with pytest.raises(HostUnavailable, match="unreachable"):
        await client.resume_vm("web1")
    assert seen == ["POST"]


async def test_retries_are_bounded() -> None:
    transport, seen = flaky(100)
    client = AgentClient("host1", "https://h1", transport=transport)
    with pytest.raises(HostUnavailable):
        await client.list_vms()
    assert len(seen) == 3
