"""The control plane's gates: bearer tokens with roles for people and scripts, verified
client certificates for agents, a Host allow-list (DNS rebinding), an Origin check
(cross-site requests) and an audit event for every action and every refusal.

No cookies are ever read, so a page in the operator's browser cannot act with the
operator's rights: every request must carry `Authorization: Bearer …` itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, params
from fastapi.responses import JSONResponse, Response

from ferry.domain.audit import Outcome
from ferry.domain.auth import Principal, Privilege, parse_token
from ferry.domain.errors import Forbidden, Unauthenticated
from ferry.pki import Identity, Role
from ferry.pki.serve import peer_identity
from ferry.store import Store
from ferry.wire import error_body, status_for

PRINCIPAL_KEY = "ferry_principal"


def bearer(request: Request) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("this request carries no bearer token",
                              "pass `Authorization: Bearer <token>`; the lab's admin token "
                              "is found by the CLI, others come from `ferry token create`")
    return parse_token(value.strip())


def need(store: Store, privilege: Privilege) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the request's token, which must grant `privilege`."""

    async def check(request: Request) -> Principal:
        token_id, secret = bearer(request)
        principal = await store.security.authenticate(token_id, secret)
        request.state.__setattr__(PRINCIPAL_KEY, principal)
        principal.require(privilege)
        return principal

    return check


def requires(store: Store, privilege: Privilege) -> list[params.Depends]:
    """`dependencies=` for a route that needs `privilege`."""
    return [Depends(need(store, privilege))]


def enrolled_host(request: Request) -> Identity:
    """The agent on the other end, as its certificate (verified by TLS) names it."""
    peer = peer_identity(request)
    if peer is None or peer.role is not Role.HOST:
        raise Unauthenticated("only an enrolled host may send heartbeats",
                              "enrol the host with a join token (`ferry host join-token`)")
    return peer


def _actor(request: Request) -> str:
    principal = getattr(request.state, PRINCIPAL_KEY, None)
    if isinstance(principal, Principal):
        return f"token {principal.name} ({principal.token_id})"
    peer = peer_identity(request)
    if peer is not None:
        return f"{peer.role} {peer.name}"
    client = request.client.host if request.client else "?"
    return f"anonymous from {client}"


def install_gates(app: FastAPI, store: Store, allowed_hosts: tuple[str, ...]) -> None:
    """Host and Origin checks before anything else; the audit log after everything."""
    allowed = {h.lower() for h in allowed_hosts}

    @app.middleware("http")
    async def gate(request: Request,
                   call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
        origin = request.headers.get("origin")
        refusal: Forbidden | None = None
        if host.lower() not in allowed:
            refusal = Forbidden(f"the Host header {host!r} is not one this control plane "
                                "answers to", "use its address, or add the name with "
                                "`ferry server --allowed-host`")
        elif origin is not None and (urlsplit(origin).hostname or "").lower() not in allowed:
            refusal = Forbidden(f"cross-origin request from {origin!r} refused",
                                "call the API directly, not from another site")
        if refusal is not None:
            response: Response = JSONResponse(error_body(refusal), status_code=403)
        else:
            response = await call_next(request)
        status = response.status_code
        if request.method != "GET" or status in (401, 403):
            outcome = (Outcome.OK if status < 400 else
                       Outcome.FAILED if status >= 500 else Outcome.REFUSED)
            if not (request.url.path == "/v1/agents/heartbeat" and outcome is Outcome.OK):
                await store.security.add_event(
                    "audit", _actor(request), f"{request.method} {request.url.path}",
                    request.url.path, outcome, f"HTTP {status}")
        return response


def unauthenticated_response(exc: Unauthenticated) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=status_for(exc),
                        headers={"WWW-Authenticate": "Bearer"})
