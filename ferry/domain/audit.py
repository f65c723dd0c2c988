"""Records of the trust model as the control plane keeps them (tokens, audit events)."""

from __future__ import annotations

from enum import StrEnum

from ferry.domain.auth import TokenRole
from ferry.domain.specs import Frozen


class TokenInfo(Frozen):
    """A token as listed: never its secret (only a hash is stored)."""

    id: str
    name: str
    role: TokenRole
    created_by: str | None
    created_at: float
    revoked: bool


class Outcome(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


class EventRecord(Frozen):
    """One entry of the event log: what was done, to what, by which token, and how it
    ended."""

    id: int
    at: float
    kind: str
    actor: str
    action: str
    object: str
    outcome: Outcome
    detail: str = ""
