"""uvicorn over TLS, with the verified peer certificate's identity in each request.

uvicorn does not put the client certificate into the ASGI scope, so a subclass of its
h11 protocol reads it from the TLS transport once per connection and adds it to every
request's scope as `scope["extensions"]["ferry.peer"]`. The certificate was verified
against the cluster CA by the TLS layer before any request was read.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ferry.pki.certs import Identity, identity_of

PEER_KEY = "ferry.peer"


class PeerCertProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        peer = (identity_of(ssl_object.getpeercert(), ssl_object.getpeercert(binary_form=True))
                if ssl_object is not None else None)
        inner: ASGIApp = self.app

        async def with_peer(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})[PEER_KEY] = peer
            await inner(scope, receive, send)

        self.app = with_peer


def peer_identity(request: Request) -> Identity | None:
    peer = (request.scope.get("extensions") or {}).get(PEER_KEY)
    return peer if isinstance(peer, Identity) else None


def tls_config(app: Any, host: str, port: int, *, ca: Path, cert: Path, key: Path,
               require_client_cert: bool, keep_alive_s: int = 5) -> uvicorn.Config:
    """A uvicorn config serving `app` over TLS 1.2+ with client certificates checked
    against `ca` (required, or optional where bearer tokens are the other way in); an
    idle connection is closed after `keep_alive_s`."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", http=PeerCertProtocol,
        ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(ca),
        ssl_cert_reqs=ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL,
        timeout_keep_alive=keep_alive_s)
    return config
