"""Routes of the trust model: API tokens, join tokens and enrolment (the event log's
routes are in event_routes.py)."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from ferry.api.auth import need
from ferry.api.schemas import (
    Enrolment,
    EnrolRequest,
    JoinToken,
    JoinTokenRequest,
    NewToken,
    TokenRequest,
)
from ferry.control.service import ControlPlane
from ferry.domain.audit import TokenInfo
from ferry.domain.auth import Principal, Privilege, format_token, new_secret
from ferry.domain.errors import Forbidden


def register_trust_routes(app: FastAPI, control: ControlPlane) -> None:
    store = control.store
    # Default-value style: the routes' annotations are strings (PEP 563), which FastAPI
    # resolves in module scope, where local Annotated aliases would not be found.
    token_creator = Depends(need(store, Privilege.TOKEN_CREATE))
    reader = Depends(need(store, Privilege.READ))
    enroller = Depends(need(store, Privilege.HOST_ENROL))

    @app.post("/v1/tokens", status_code=201)
    async def create_token(body: TokenRequest, principal: Principal = token_creator) -> NewToken:
        """A new API token of at most the caller's role; its secret is shown only here."""
        principal.may_grant(body.role)
        secret = new_secret()
        info = await store.security.add_token(body.name, body.role, secret,
                                              created_by=principal.token_id)
        return NewToken(token=format_token(info.id, secret), info=info)

    @app.get("/v1/tokens")
    async def list_tokens(principal: Principal = reader) -> list[TokenInfo]:
        """Every token for an admin; one's own and those one created for others."""
        tokens = await store.security.tokens()
        if principal.has(Privilege.TOKEN_ADMIN):
            return tokens
        return [t for t in tokens if principal.token_id in (t.id, t.created_by)]

    @app.delete("/v1/tokens/{token_id}")
    async def revoke_token(token_id: str, principal: Principal = reader) -> TokenInfo:
        tokens = {t.id: t for t in await store.security.tokens()}
        target = tokens.get(token_id)
        mine = target is not None and principal.token_id in (target.id, target.created_by)
        if not mine and not principal.has(Privilege.TOKEN_ADMIN):
            raise Forbidden(f"token {principal.name!r} may not revoke token {token_id!r}",
                            "only an admin revokes tokens it did not create")
        return await store.security.revoke_token(token_id)

    @app.post("/v1/join-tokens", status_code=201)
    async def join_token(body: JoinTokenRequest, _: Principal = enroller) -> JoinToken:
        """A one-time token with which host `host` enrols (gets its certificate)."""
        token = await control.trust.join_token(body.host, body.ttl_s)
        return JoinToken(host=body.host, token=token, expires_in_s=body.ttl_s)

    @app.post("/v1/enrol")
    async def enrol(body: EnrolRequest) -> Enrolment:
        """An agent's first call: its join token and CSR for a certificate of the CA."""
        host, cert = await control.trust.enrol(body.token, body.csr)
        return Enrolment(host=host, cert=cert.decode(), ca=control.trust.pki.ca_cert
                         .read_text())
