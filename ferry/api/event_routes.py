"""Routes of the event log and metrics: `GET /v1/events` (pages), `GET /v1/events/stream`
(server-sent events, sse-starlette) and `GET /metrics` (Prometheus text format).

All three need a token with the read role, as every other read does: the log names
tokens and objects, and the metrics name hosts and their load. Prometheus sends one with
`authorization: {credentials: ...}` (or `bearer_token_file`) in its scrape config.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from ferry.api.auth import need
from ferry.control import metrics
from ferry.control.service import ControlPlane
from ferry.domain.audit import EventRecord
from ferry.domain.auth import Principal, Privilege
from ferry.domain.errors import InvalidInput
from ferry.domain.events import MAX_EVENT_ID, MAX_PAGE, EventQuery, parse_since

# How long a follower waits for an in-process wake-up before it reads the log again
# (events another replica wrote are seen within this).
POLL_S = 1.0
DEFAULT_PING_S = 15.0


def register_event_routes(app: FastAPI, control: ControlPlane) -> None:
    store = control.store
    # Default-value style, as in trust_routes.py (string annotations under PEP 563).
    reader = Depends(need(store, Privilege.READ))

    @app.get("/v1/events")
    async def events(_: Principal = reader,
                     limit: int = Query(100, ge=1, le=MAX_PAGE),
                     after: int | None = Query(None, ge=0, le=MAX_EVENT_ID),
                     before: int | None = Query(None, ge=1, le=MAX_EVENT_ID),
                     vm: str | None = Query(None, min_length=1, max_length=64),
                     since: str | None = Query(None, max_length=64)) -> list[EventRecord]:
        """The event log. Without `after`: newest first (page back with `before`, the
        last id seen). With `after`: the events after that id, oldest first (page on
        with the last id seen). `vm` keeps one VM's events; `since` is a duration
        (1h, 30m), an ISO time or epoch seconds."""
        since_at = parse_since(since, time.time()) if since is not None else None
        return await store.events.page(EventQuery(limit=limit, after=after, before=before,
                                                  vm=vm, since=since_at))

    # Not in /openapi.json: a valid request is answered by a stream that never ends, and
    # the schema-driven fuzzer (tests/integration/test_fuzz.py) sends every valid GET and
    # reads its body to the end. Documented in docs/events.md; tested in test_events.py.
    @app.get("/v1/events/stream", include_in_schema=False)
    async def stream(request: Request, _: Principal = reader,
                     after: int | None = Query(None, ge=0, le=MAX_EVENT_ID),
                     vm: str | None = Query(None, min_length=1, max_length=64),
                     since: str | None = Query(None, max_length=64),
                     ping: float = Query(DEFAULT_PING_S, ge=0.5, le=300)
                     ) -> EventSourceResponse:
        """Server-sent events: each event of the log as it is recorded, its SSE id the
        event's id. Starts after `Last-Event-ID` (a reconnecting client's), else after
        `after`, else with `since`'s events, else with the next new event. A comment
        line every `ping` seconds keeps proxies from closing an idle stream."""
        cursor = _resume_from(request.headers.get("last-event-id"), after)
        since_at = parse_since(since, time.time()) if since is not None else None
        if cursor is None:
            cursor = 0 if since_at is not None else await store.events.last_id()
        return EventSourceResponse(_follow(control, cursor, vm, since_at), ping=ping)

    @app.get("/metrics", response_class=Response)
    async def prometheus(_: Principal = reader) -> Response:
        """The cluster's metrics in Prometheus' text format (see docs/events.md)."""
        facts = await metrics.gather(store, control.drs)
        return Response(metrics.render(facts), media_type=metrics.CONTENT_TYPE)


def _resume_from(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id is None or not last_event_id.strip():
        return after
    try:
        value = int(last_event_id)
    except ValueError:
        raise InvalidInput(f"Last-Event-ID {last_event_id!r} is not an event id",
                           "send the id of the last event received, or none") from None
    if not 0 <= value <= MAX_EVENT_ID:
        raise InvalidInput(f"Last-Event-ID {value} is not an event id",
                           f"send an id between 0 and {MAX_EVENT_ID}")
    return value


async def _follow(control: ControlPlane, cursor: int, vm: str | None,
                  since: float | None) -> AsyncIterator[ServerSentEvent]:
    store = control.store
    # The position first, as an id-only message: a client that reconnects before any
    # event arrived resumes from here (Last-Event-ID) instead of from "now", and so
    # misses nothing recorded while it was reconnecting.
    yield ServerSentEvent(id=str(cursor), comment="events after this id follow")
    while True:
        page = await store.events.page(EventQuery(limit=MAX_PAGE, after=cursor, vm=vm,
                                                  since=since))
        for event in page:
            yield ServerSentEvent(data=event.model_dump_json(), id=str(event.id))
        if page:
            cursor = page[-1].id
        if len(page) < MAX_PAGE:
            await store.events.wait(POLL_S)
