"""`ferry schedule …`: actions run by the control plane at the times of a cron line."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from ferry.cli.client import connect
from ferry.cli.output import console, print_json, table
from ferry.domain.errors import InvalidInput
from ferry.domain.schedules import DEFAULT_GRACE_S, ActionKind, MissedPolicy

app = typer.Typer(
    help="Scheduled tasks: migrate, relocate, maintenance or DRS apply at cron times "
         "(UTC unless --tz), run by the control plane.", no_args_is_help=True)
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
ACTIONS = ("migrate VM HOST", "relocate VM DATASTORE [DISK]",
           "maintenance HOST on|off", "drs apply")


def parse_action(words: list[str]) -> dict[str, Any]:
    """The action's words as the API's body; InvalidInput naming the expected form."""
    forms = "; ".join(ACTIONS)
    if not words:
        raise InvalidInput("no action given", f"give one of: {forms}")
    kind, args = words[0], words[1:]
    if kind == "migrate" and len(args) == 2:
        return {"kind": ActionKind.MIGRATE.value, "vm": args[0], "target": args[1]}
    if kind == "relocate" and len(args) in (2, 3):
        return {"kind": ActionKind.RELOCATE.value, "vm": args[0], "datastore": args[1],
                "disk": args[2] if len(args) == 3 else None}
    if kind == "maintenance" and len(args) == 2 and args[1] in ("on", "off"):
        return {"kind": ActionKind.MAINTENANCE.value, "host": args[0], "on": args[1] == "on"}
    if kind == "drs" and args == ["apply"]:
        return {"kind": ActionKind.DRS_APPLY.value}
    known = {"migrate": ACTIONS[0], "relocate": ACTIONS[1], "maintenance": ACTIONS[2],
             "drs": ACTIONS[3]}
    if kind in known:
        raise InvalidInput(f"`{' '.join(words)}` is not `{known[kind]}`",
                           f"give it as: {known[kind]}")
    raise InvalidInput(f"unknown action {kind!r}", f"give one of: {forms}")


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_action(action: dict[str, Any]) -> str:
    kind = action["kind"]
    if kind == ActionKind.MIGRATE:
        return f"migrate {action['vm']} {action['target']}"
    if kind == ActionKind.RELOCATE:
        disk = f" {action['disk']}" if action.get("disk") else ""
        return f"relocate {action['vm']} {action['datastore']}{disk}"
    if kind == ActionKind.MAINTENANCE:
        return f"maintenance {action['host']} {'on' if action['on'] else 'off'}"
    return "drs apply"


def last_text(run: dict[str, Any] | None) -> str:
    if run is None:
        return "-"
    return f"{run['outcome']} (due {when(run['scheduled_at'])})"


def register(handle_errors: Callable[..., Any]) -> None:
    @app.command("add")
    @handle_errors
    def schedule_add(
        cron: Annotated[str, typer.Argument(
            help="when, in quotes: `minute hour day-of-month month day-of-week` as in "
                 "crontab, e.g. \"0 2 * * *\" (02:00 daily); a sixth field is seconds "
                 "(last, as croniter has it); or @daily, @hourly, … Times are UTC "
                 "unless --tz.")],
        action: Annotated[list[str], typer.Argument(
            help="migrate VM HOST | relocate VM DATASTORE [DISK] | maintenance HOST on|off | "
                 "drs apply", show_default=False)],
        tz: Annotated[str, typer.Option(
            help="IANA time zone the cron is read in (e.g. Europe/Paris)")] = "UTC",
        missed: Annotated[MissedPolicy, typer.Option(
            help="a run due while the control plane was down: skip it (reported missed) "
                 "or run it late, within --grace")] = MissedPolicy.SKIP,
        grace: Annotated[int, typer.Option(
            help="seconds after its time a run may still start; later it is missed")
        ] = DEFAULT_GRACE_S,
        url: UrlOpt = None, json_out: JsonOpt = False,
    ) -> None:
        """Schedule an action, e.g. `ferry schedule add "0 2 * * *" migrate web1 host2`.

        The cron is checked and the VM, host or datastore must exist now."""
        body = {"cron": cron, "action": parse_action(action), "tz": tz,
                "missed": missed.value, "grace_s": grace}
        view = connect(url).call("POST", "/v1/schedules", body)
        if json_out:
            print_json(view)
            return
        s = view["schedule"]
        console.print(f"schedule [bold]{s['id']}[/]: {describe_action(s['spec']['action'])} "
                      f"at `{s['spec']['cron']}` ({s['spec']['tz']}); next run "
                      f"{when(view['next_run_at'])}")

    @app.command("list")
    @handle_errors
    def schedule_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Every scheduled task: its next run, its latest run, how many were missed."""
        views = connect(url).call("GET", "/v1/schedules")
        if json_out:
            print_json(views)
            return
        table("Schedules", ["id", "cron", "tz", "action", "missed", "next run (UTC)",
                            "last run", "missed runs", "by"],
              [[v["schedule"]["id"], v["schedule"]["spec"]["cron"],
                v["schedule"]["spec"]["tz"],
                describe_action(v["schedule"]["spec"]["action"]),
                f"{v['schedule']['spec']['missed']} (grace "
                f"{v['schedule']['spec']['grace_s']} s)",
                when(v["next_run_at"]), last_text(v.get("last_run")), v["missed_runs"],
                v["schedule"].get("created_by_name") or "-"] for v in views])

    @app.command("history")
    @handle_errors
    def schedule_history(schedule_id: str, limit: Annotated[int, typer.Option(
            help="how many runs, latest first")] = 20,
            url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """A task's runs: when due, started, ended, outcome, and the migration or error."""
        runs = connect(url).call("GET", f"/v1/schedules/{schedule_id}/runs", limit=limit)
        if json_out:
            print_json(runs)
            return
        table(f"Runs of schedule {schedule_id}",
              ["due (UTC)", "started", "ended", "outcome", "detail"],
              [[when(r["scheduled_at"]), when(r.get("started_at")), when(r.get("ended_at")),
                r["outcome"] + (" (late)" if r.get("late") else ""), r["detail"]]
               for r in runs])

    @app.command("remove")
    @handle_errors
    def schedule_remove(schedule_id: str, url: UrlOpt = None) -> None:
        """Remove a task and its history (a run in progress finishes its action)."""
        connect(url).call("DELETE", f"/v1/schedules/{schedule_id}")
        console.print(f"schedule {schedule_id} removed")
