"""The error body every Ferry HTTP service returns, and its mapping both ways.

Services turn a FerryError into {"error": {"code", "problem", "fix"}} with a status
from STATUS; clients turn that body back into the same exception class.
"""

from __future__ import annotations

import json
from typing import Any

from ferry.domain.errors import (
    ERRORS_BY_CODE,
    Conflict,
    FerryError,
    Forbidden,
    HostUnavailable,
    Incompatible,
    InvalidInput,
    NoCapacity,
    NotFound,
    NotLeader,
    Unauthenticated,
)

STATUS: dict[type[FerryError], int] = {
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    NoCapacity: 409,
    Incompatible: 409,
    HostUnavailable: 502,
    NotLeader: 503,
    Unauthenticated: 401,
    Forbidden: 403,
}


_BY_STATUS: dict[int, type[FerryError]] = {
    422: InvalidInput, 404: NotFound, 409: Conflict, 502: HostUnavailable}


def status_for(exc: FerryError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(exc: FerryError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "problem": exc.problem, "fix": exc.fix}}


def error_from_response(status: int, content: bytes) -> FerryError:
    """The FerryError an HTTP error response stands for (JSON body or plain text)."""
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content.decode(errors="replace")
    return error_from_body(status, body)


def error_from_body(status: int, body: Any) -> FerryError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        # A code of a subclass the domain does not know (e.g. the hypervisor's) comes
        # back as the domain class its status stands for.
        cls = ERRORS_BY_CODE.get(str(err.get("code"))) or _BY_STATUS.get(status, FerryError)
        return cls(str(err.get("problem", "")), str(err.get("fix", "")))
    if status == 422 and isinstance(body, dict) and "detail" in body:
        return InvalidInput(describe_validation(body["detail"]))
    return FerryError(f"HTTP {status}: {body}")


def describe_validation(detail: Any) -> str:
    """FastAPI/pydantic validation details as one readable sentence."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {item.get('msg', 'invalid')}" if loc else item.get("msg", ""))
    return "; ".join(parts)
