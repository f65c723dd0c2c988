"""Records of the trust model as the control plane keeps them (tokens, audit events)."""

from __future__ import annotations

from enum import StrEnum

from ferry.domain.auth import TokenRole
from ferry.domain.events import EventKind
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
    """One entry of the event log: what happened (kind, action), when, to which object
    (and the VM it concerns, if any), why (detail), who caused it (actor: "token NAME
    (ID)", a host, "anonymous from ADDRESS", or "system"), and how it ended."""

    id: int
    at: float
    kind: EventKind
    actor: str
    action: str
    object: str
    outcome: Outcome
    detail: str = ""
    vm: str | None = None
