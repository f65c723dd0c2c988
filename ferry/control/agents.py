"""One AgentClient per host, created on demand from the host's registered URL."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from ferry.agent.client import AgentClient
from ferry.agent.models import VmInfo
from ferry.domain.errors import HostUnavailable
from ferry.domain.records import HostRecord


class AgentPool:
    def __init__(self, tls: ssl.SSLContext | None = None,
                 term: Callable[[], int | None] | None = None) -> None:
        # The control plane's client context (mutual TLS); None only for tests that
        # replace the clients.
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True
        # This replica's leader term, sent with every call (ferry/agent/terms.py).
        self._term = term
        self._clients: dict[str, AgentClient] = {}
        self._urls: dict[str, str] = {}
        # Latest VM list each agent sent with its heartbeat: what runs where, cheaply.
        self.reported: dict[str, dict[str, VmInfo]] = {}

    def client(self, host: HostRecord) -> AgentClient:
        if not host.url:
            raise HostUnavailable(f"host {host.name} has no agent address yet")
        if self._urls.get(host.name) != host.url:
            self._clients[host.name] = AgentClient(host.name, host.url, verify=self._tls,
                                                   term=self._term)
            self._urls[host.name] = host.url
        return self._clients[host.name]

    def report(self, host: str, vms: tuple[VmInfo, ...]) -> None:
        self.reported[host] = {vm.name: vm for vm in vms}

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
