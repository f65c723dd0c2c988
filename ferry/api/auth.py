"""The control plane's gates: bearer tokens with roles for people and scripts, verified
client certificates for agents, a Host allow-list (DNS rebinding), an Origin check
(cross-site requests) and an audit event for every action and every refusal.

No cookies are ever read, so a page in the operator's browser cannot act with the
operator's rights: every request must carry `Authorization: Bearer …` itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, params
from fastapi.responses import JSONResponse, Response

from ferry.control import eventlog
from ferry.domain.audit import Outcome
from ferry.domain.auth import Principal, Privilege, parse_token
from ferry.domain.errors import Forbidden, Unauthenticated
from ferry.domain.events import EventKind
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
        # Events this request causes (and its jobs' events) name this token.
        eventlog.acting.set(token_actor(principal))
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


def token_actor(principal: Principal) -> str:
    return f"token {principal.name} ({principal.token_id})"


def _actor(request: Request) -> str:
    principal = getattr(request.state, PRINCIPAL_KEY, None)
    if isinstance(principal, Principal):
        return token_actor(principal)
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
        if request.method != "GET" or status in REFUSALS:
            outcome = (Outcome.OK if status < 400 else
                       Outcome.FAILED if status >= 500 else Outcome.REFUSED)
            if not (request.url.path == "/v1/agents/heartbeat" and outcome is Outcome.OK):
                detail = f"HTTP {status}"
                if status >= 400:
                    response, problem = await _problem(response)
                    detail = f"{detail}: {problem}" if problem else detail
                kind = EventKind.REQUEST_REFUSED if outcome is Outcome.REFUSED else \
                    EventKind.AUDIT
                await store.events.add(
                    kind, _actor(request), f"{request.method} {request.url.path}",
                    request.url.path, outcome, detail, vm=_vm_of(request.url.path))
        return response


# A GET refused for these is an event too (a bad token, a missing role, a bad parameter,
# a conflict); a GET of something absent (404) is not worth a line of the log.
REFUSALS = frozenset({400, 401, 403, 409, 422})


async def _problem(response: Response) -> tuple[Response, str]:
    """The error's problem text (the why of a refusal), and the response rebuilt, as its
    body can be read only once. Error bodies are small JSON (wire.error_body)."""
    chunks = getattr(response, "body_iterator", None)  # what call_next returns streams
    if chunks is None:
        body = bytes(response.body)
        rebuilt = response
    else:
        body = b"".join([chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                         async for chunk in chunks])
        rebuilt = Response(body, status_code=response.status_code,
                           headers=dict(response.headers), media_type=response.media_type)
    try:
        problem = json.loads(body)["error"]["problem"]
    except (ValueError, KeyError, TypeError):
        return rebuilt, ""
    return rebuilt, str(problem)


def _vm_of(path: str) -> str | None:
    """The VM a request's path names (/v1/vms/NAME/...), for the log's `vm` filter."""
    parts = path.strip("/").split("/")
    return parts[2] if len(parts) >= 3 and parts[:2] == ["v1", "vms"] else None


def unauthenticated_response(exc: Unauthenticated) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=status_for(exc),
                        headers={"WWW-Authenticate": "Bearer"})
