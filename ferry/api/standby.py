"""A standby replica serves reads and refuses changes, saying which replica leads.

Only the leader drives jobs (ferry/control/leader.py); a change accepted by a standby
would be a job nobody drives, or one two replicas race on. What any replica may take:
reads, the compatibility check (it changes nothing), an agent's heartbeat (facts about
the host, recorded in the shared store; its actions run only on the leader) and an
agent's enrolment (a join token is single-use in the store, whoever redeems it).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ferry.api.auth import bearer, need, unauthenticated_response
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege
from ferry.domain.errors import NotLeader, Unauthenticated
from ferry.domain.specs import Frozen
from ferry.wire import error_body

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_REPLICA = frozenset({"/v1/agents/heartbeat", "/v1/enrol", "/v1/migrations/check"})


async def refusal(control: ControlPlane) -> NotLeader:
    """Why this replica refuses a change: who leads, if anyone does."""
    me = control.leadership.replica
    try:
        lease = await control.store.leader.read()
        holder = lease.holder
    except Exception:  # the database is unreachable: say so rather than guess
        holder = ""
    leader = (f"replica {holder!r} leads" if holder and holder != me
              else "no replica leads right now")
    return NotLeader(
        f"this control plane (replica {me!r}) is a standby: only the leader changes the "
        f"cluster, and {leader}",
        "send the request to the leading replica's address; if the leader is gone, a "
        "standby takes over once its lease term has run out (seconds): retry then")


def install_standby_gate(app: FastAPI, control: ControlPlane) -> None:
    @app.middleware("http")
    async def standby_gate(request: Request,
                           call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if (request.method in SAFE_METHODS or request.url.path in ANY_REPLICA
                or control.leadership.leading):
            return await call_next(request)
        # Who leads is told only to a caller with a valid token (a stranger gets the
        # 401 the route would give).
        try:
            await control.store.security.authenticate(*bearer(request))
        except Unauthenticated as exc:
            return unauthenticated_response(exc)
        return JSONResponse(error_body(await refusal(control)), status_code=503)


class LeaderView(Frozen):
    """Which replica answered, whether it leads, and the lease as the store has it."""

    replica: str
    leading: bool
    holder: str  # "" when no replica holds the lease
    term: int  # the fencing token of the current term
    expires_in_s: float  # by this replica's clock; negative: the term has run out


def register_leader_route(app: FastAPI, control: ControlPlane) -> None:
    reader = Depends(need(control.store, Privilege.READ))

    @app.get("/v1/cluster/leader")
    async def leader(_: Principal = reader) -> LeaderView:
        """The control-plane replica that answered and the one that leads."""
        lease = await control.store.leader.read()
        return LeaderView(replica=control.leadership.replica,
                          leading=control.leadership.leading, holder=lease.holder,
                          term=lease.token,
                          expires_in_s=round(lease.expires_at - time.time(), 1))
