"""`ferry events`: the event log from the command line, once or followed live."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ferry.cli.client import connect
from ferry.cli.output import console, print_json, table

UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts (with "
                                       "--follow: one event per line)")]
COLUMNS = ["id", "when", "kind", "object", "actor", "action", "outcome", "why"]


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _row(e: dict[str, Any]) -> list[Any]:
    return [e["id"], _when(e["at"]), e["kind"], e["object"], e["actor"], e["action"],
            e["outcome"], e["detail"]]


def _line(e: dict[str, Any]) -> str:
    """One event as a line (for --follow, where a table cannot grow)."""
    outcome = "" if e["outcome"] == "ok" else f" [{e['outcome']}]"
    return (f"{_when(e['at'])} #{e['id']} {e['kind']}{outcome} {e['object']}: "
            f"{e['action']} ({e['actor']}) {e['detail']}").rstrip()


def register(app: typer.Typer, handle_errors: Callable[..., Any]) -> None:
    @app.command("events")
    @handle_errors
    def events(
            vm: Annotated[str | None, typer.Option(
                "--vm", help="only events about this VM (its migrations, relocations, "
                "levers, requests on it)")] = None,
            since: Annotated[str | None, typer.Option(
                "--since", help="only events newer than this: a duration back from now "
                "(30s, 15m, 1h, 2d) or an ISO time (2026-11-26T14:00:00Z)")] = None,
            limit: Annotated[int, typer.Option(
                help="at most this many (with --follow: of the past ones shown first)",
                min=1, max=1000)] = 50,
            follow: Annotated[bool, typer.Option(
                "--follow", "-f", help="after the recent events, print new ones as they "
                "happen, until Ctrl-C (server-sent events, resumed if the connection "
                "drops)")] = False,
            url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """The event log: what happened, when, why and which token caused it.

        Migrations started and ended, convergence levers, DRS moves, relocations, HA
        restarts, every action taken through the API and every request refused.

        Without --follow the newest come first; with --follow, oldest first as a log.
        """
        client = connect(url)
        rows: list[dict[str, Any]] = client.call("GET", "/v1/events", limit=limit, vm=vm,
                                                  since=since)
        if not follow:
            if json_out:
                print_json(rows)
                return
            table("Events", COLUMNS, [_row(e) for e in rows])
            return
        for e in reversed(rows):
            _emit(e, json_out)
        last = max((e["id"] for e in rows), default=None)
        try:
            for _, e in client.follow("/v1/events/stream", last_id=last, vm=vm,
                                      since=since if last is None else None):
                _emit(e, json_out)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


def _emit(e: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(e), flush=True)
    else:
        console.print(_line(e), markup=False, highlight=False, soft_wrap=True)
