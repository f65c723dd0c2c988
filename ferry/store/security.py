"""The store's part for trust: API tokens (hashed), one-time join tokens, enrolled
hosts' certificate fingerprints. (The event log is store/events.py.)"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.audit import TokenInfo
from ferry.domain.auth import Principal, TokenRole, hash_secret, secret_matches
from ferry.domain.errors import Forbidden, NotFound, Unauthenticated
from ferry.store.engine import insert_missing
from ferry.store.tables import EnrolmentRow, JoinTokenRow, TokenRow


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _info(row: TokenRow) -> TokenInfo:
    return TokenInfo(id=row.id, name=row.name, role=TokenRole(row.role),
                     created_by=row.created_by, created_at=row.created_at,
                     revoked=row.revoked)


class SecurityStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    # --- API tokens ----------------------------------------------------------------
    async def add_token(self, name: str, role: TokenRole, secret: str,
                        created_by: str | None) -> TokenInfo:
        async with self._session.begin() as s:
            row = TokenRow(id=_new_id(), name=name, role=role.value,
                           secret_hash=hash_secret(secret), created_by=created_by,
                           created_at=time.time(), revoked=False)
            s.add(row)
            return _info(row)

    async def authenticate(self, token_id: str, secret: str) -> Principal:
        async with self._session() as s:
            row = await s.get(TokenRow, token_id)
        if row is None or row.revoked or not secret_matches(secret, row.secret_hash):
            raise Unauthenticated("the bearer token is unknown or revoked",
                                  "ask an admin for a token (`ferry token create`)")
        return Principal(token_id=row.id, name=row.name, role=TokenRole(row.role))

    async def tokens(self) -> list[TokenInfo]:
        async with self._session() as s:
            rows = (await s.scalars(select(TokenRow).order_by(TokenRow.created_at))).all()
            return [_info(r) for r in rows]

    async def has_tokens(self) -> bool:
        async with self._session() as s:
            return (await s.scalar(select(TokenRow.id).limit(1))) is not None

    async def revoke_token(self, token_id: str) -> TokenInfo:
        async with self._session.begin() as s:
            row = await s.get(TokenRow, token_id)
            if row is None:
                raise NotFound(f"there is no token {token_id!r}", "see `ferry token list`")
            row.revoked = True
            return _info(row)

    # --- join tokens and enrolment ---------------------------------------------------
    async def add_join_token(self, host: str, secret: str, ttl_s: float) -> str:
        async with self._session.begin() as s:
            row = JoinTokenRow(id=_new_id(), host=host, secret_hash=hash_secret(secret),
                               expires_at=time.time() + ttl_s, used_at=None)
            s.add(row)
            return row.id

    async def use_join_token(self, token_id: str, secret: str) -> str:
        """Spend a join token (once): returns the host name it was issued for."""
        now = time.time()
        async with self._session.begin() as s:
            row = await s.get(JoinTokenRow, token_id)
            if row is None or not secret_matches(secret, row.secret_hash):
                raise Unauthenticated("the join token is unknown",
                                      "create one with `ferry host join-token HOST`")
            if row.expires_at < now:
                raise Unauthenticated("the join token has expired",
                                      "create a new one with `ferry host join-token HOST`")
            # Compare-and-set: two enrolments racing with one token, only one wins.
            spent = await s.execute(update(JoinTokenRow).where(
                JoinTokenRow.id == token_id, JoinTokenRow.used_at.is_(None)).values(used_at=now))
            if spent.rowcount != 1:  # type: ignore[attr-defined]
                raise Forbidden("the join token was already used",
                                "create a new one with `ferry host join-token HOST`")
            return row.host

    async def enrol(self, host: str, fingerprint: str) -> None:
        async with self._session.begin() as s:
            # A re-enrolment replaces the fingerprint; inserted first so it has a row.
            await insert_missing(s, EnrolmentRow, host=host, fingerprint=fingerprint,
                                 enrolled_at=time.time())
            row = await s.get(EnrolmentRow, host, with_for_update=True)
            assert row is not None
            row.fingerprint, row.enrolled_at = fingerprint, time.time()

    async def enrolment(self, host: str) -> str | None:
        """The fingerprint of the certificate `host` holds now, or None if not enrolled."""
        async with self._session() as s:
            row = await s.get(EnrolmentRow, host)
            return row.fingerprint if row is not None else None
