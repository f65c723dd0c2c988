"""`ferry vm migrate` with its live progress display, and `ferry migration ...`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ferry.cli.client import Client, connect
from ferry.cli.output import console, mib, print_json, table
from ferry.cli.policy_cmd import (
    AllowThrottleOpt,
    BandwidthOpt,
    BudgetOpt,
    CompressOpt,
    DowntimeOpt,
    EncryptionOpt,
    MultifdOpt,
    PolicyOpt,
    PostcopyOpt,
    ThrottleOpt,
    overrides,
)
from ferry.domain.memory_check import VerifyMemory
from ferry.domain.migration import Phase

migration_app = typer.Typer(help="Migrations: list, show, cancel.", no_args_is_help=True)
STAGES = [Phase.CHECKING, Phase.PREPARING_TARGET, Phase.DISK_COPY, Phase.PRECOPY,
          Phase.POSTCOPY, Phase.SWITCHOVER, Phase.RESUMING_TARGET]
OPTIONAL = {Phase.DISK_COPY, Phase.POSTCOPY}  # shown only when the migration went there
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def stage_table(rec: dict[str, Any]) -> Table:
    """One line per stage: done, running (with pre-copy numbers) or waiting."""
    t = Table(title=f"migration {rec['id']}: {rec['vm']} {rec['source']} → {rec['target']}",
              title_justify="left")
    t.add_column("stage")
    t.add_column("state")
    t.add_column("detail")
    times: dict[str, float] = rec["phase_times"]
    phase = Phase(rec["phase"])
    for stage in _stages(times):
        if stage.value not in times:
            state, detail = "waiting", ""
        elif phase is stage:
            state, detail = "[cyan]running[/]", ""
        else:
            state, detail = "[green]done[/]", ""
        if stage is Phase.DISK_COPY and stage.value in times:
            detail = (f"disks: {mib(rec['disk_copied_bytes'])} of "
                      f"{mib(rec['disk_total_bytes'])} MiB copied")
        elif stage is Phase.PRECOPY and stage.value in times:
            its = rec["iterations"]
            last = its[-1] if its else {}
            detail = (f"pass {last.get('number', 0)}, "
                      f"{mib(rec.get('remaining_bytes'))} MiB left, "
                      f"{mib(rec.get('transferred_bytes'))} MiB sent, "
                      f"dirty {mib(last.get('dirty_rate_bytes_s'))} MiB/s, "
                      f"{mib(int(last.get('throughput_bytes_s', 0)))} MiB/s")
        if phase in (Phase.ROLLING_BACK, Phase.FAILED) and stage.value in times and \
                stage is _last_stage(times):
            state = "[red]failed[/]"
        t.add_row(stage.value, state, detail)
    return t


def _stages(times: dict[str, float]) -> list[Phase]:
    """The stages this migration shows: optional ones only once reached; after post-copy
    there is no separate switchover (the switch happened when post-copy began)."""
    shown = [s for s in STAGES if s not in OPTIONAL or s.value in times]
    if Phase.POSTCOPY.value in times:
        shown = [s for s in shown if s not in (Phase.SWITCHOVER, Phase.RESUMING_TARGET)]
    return shown


def _last_stage(times: dict[str, float]) -> Phase:
    return [s for s in STAGES if s.value in times][-1]


def client_text(rec: dict[str, Any]) -> str:
    """The client-visible gap, when the lab measured it."""
    view = rec.get("client_view")
    if not view:
        return ""
    tcp = {True: "TCP connection intact", False: "TCP connection BROKEN",
           None: "UDP only"}[view.get("tcp_survived")]
    return (f", {view['gap_ms']:.0f} ms as a client saw it ({tcp}"
            f"{'' if view.get('announce', True) else ', no announce'})")


def memory_text(rec: dict[str, Any]) -> str:
    """What the check of the destination's RAM found, when it ran."""
    check = rec.get("memory_check")
    if not check:
        return ""
    if check.get("skipped"):
        return f"; memory not verified ({escape(check['skipped'])})"
    if check["repaired_pages"]:
        return (f"; memory verified, {check['repaired_pages']} stale pages copied again "
                f"({check['ms']} ms)")
    return f"; memory verified ({check['ms']} ms)"


def summary(rec: dict[str, Any]) -> str:
    t = rec["phase_times"]
    total = t.get("completed", t.get("failed", time.time())) - t["pending"]
    if rec["phase"] == Phase.COMPLETED:
        levers = list(dict.fromkeys(a["kind"] for a in rec.get("actions", []))) or ["none"]
        downtime = ("not measured" if rec.get("downtime_ms") is None
                    else f"{rec['downtime_ms']} ms")
        return (f"[green]completed[/] in {total:.2f} s: downtime {downtime} "
                f"(QEMU){client_text(rec)}, {len(rec['iterations'])} passes, "
                f"{mib(rec['transferred_bytes'])} MiB sent, levers: {', '.join(levers)}"
                f"{memory_text(rec)}")
    seen = client_text(rec).removeprefix(", ")
    return (f"[red]failed[/] after {total:.2f} s: {escape(str(rec['reason']))}"
            f"{f' (client: {seen})' if seen else ''}")


def follow(client: Client, migration_id: str, quiet: bool) -> dict[str, Any]:
    rec: dict[str, Any] = client.call("GET", f"/v1/migrations/{migration_id}")
    if quiet:
        for event in client.events(f"/v1/migrations/{migration_id}/events"):
            rec = event
        return rec
    with Live(stage_table(rec), console=console, refresh_per_second=8) as live:
        for rec in client.events(f"/v1/migrations/{migration_id}/events"):
            live.update(stage_table(rec))
    return rec


def register(vm_app: typer.Typer, handle_errors: Callable[..., Any]) -> None:
    @vm_app.command("migrate")
    @handle_errors
    def vm_migrate(
        name: Annotated[str, typer.Argument(help="VM to move")],
        host: Annotated[str, typer.Argument(help="destination host")],
        check_only: Annotated[bool, typer.Option(
            "--check-only", help="only run the compatibility checks")] = False,
        no_wait: Annotated[bool, typer.Option(
            "--no-wait", help="print the migration id and return")] = False,
        policy: PolicyOpt = None, max_downtime: DowntimeOpt = None,
        bandwidth: BandwidthOpt = None, budget: BudgetOpt = None,
        max_throttle: ThrottleOpt = None, throttle: AllowThrottleOpt = None,
        allow_postcopy: PostcopyOpt = None, multifd: MultifdOpt = None,
        compress: CompressOpt = None, encryption: EncryptionOpt = None,
        datastore: Annotated[str | None, typer.Option(
            help="move the disks too, onto this datastore of the target host")] = None,
        announce: Annotated[bool, typer.Option(
            help="announce the guest's MACs from the destination after the switch "
                 "(--no-announce only to measure what it saves)")] = True,
        verify_memory: Annotated[VerifyMemory | None, typer.Option(
            help="compare the destination's RAM with the source's before it runs and "
                 "copy differing pages again (auto: on TCG hosts, where QEMU can lose "
                 "a write during pre-copy)")] = None,
        url: UrlOpt = None, json_out: JsonOpt = False,
    ) -> None:
        """Live-migrate a running VM to another host (vMotion).

        Options not given come from the cluster's policy (`ferry policy show`)."""
        client = connect(url)
        if check_only:
            result = client.call("POST", "/v1/migrations/check", {
                "vm": name, "target": host, "datastore": datastore,
                "options": overrides(encryption=encryption)})
            if json_out:
                print_json(result)
            elif result["ok"]:
                console.print(f"[green]ok:[/] {name} can migrate to {host}")
            else:
                for r in result["refusals"]:
                    console.print(f"[red]refused ({r['reason']}):[/] {escape(r['message'])}")
            raise typer.Exit(0 if result["ok"] else 1)
        options = overrides(policy, max_downtime, bandwidth, budget, max_throttle, throttle,
                            allow_postcopy, multifd, compress, encryption)
        if not announce:
            options["announce"] = False
        if verify_memory is not None:
            options["verify_memory"] = verify_memory.value
        rec = client.call("POST", "/v1/migrations",
                          {"vm": name, "target": host, "options": options,
                           "datastore": datastore})
        if no_wait:
            print_json(rec) if json_out else print(rec["id"])
            return
        rec = follow(client, rec["id"], quiet=json_out)
        if json_out:
            print_json(rec)
        else:
            console.print(summary(rec))
        if rec["phase"] != Phase.COMPLETED:
            raise typer.Exit(1)

    @migration_app.command("list")
    @handle_errors
    def migration_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Every migration, newest last."""
        recs = connect(url).call("GET", "/v1/migrations")
        if json_out:
            print_json(recs)
            return
        table("Migrations", ["id", "VM", "from", "to", "phase", "downtime ms", "MiB sent",
                             "reason"],
              [[r["id"], r["vm"], r["source"], r["target"], r["phase"], r["downtime_ms"],
                mib(r["transferred_bytes"]), r["reason"]] for r in recs])

    @migration_app.command("show")
    @handle_errors
    def migration_show(migration_id: str, url: UrlOpt = None, json_out: JsonOpt = False
                       ) -> None:
        """One migration: its stages, pre-copy passes, levers pulled and downtime.

        Downtime as QEMU measured it and, when the lab's echo client measured it, as a
        client saw it (longest gap in echo replies, whether TCP survived)."""
        rec = connect(url).call("GET", f"/v1/migrations/{migration_id}")
        if json_out:
            print_json(rec)
            return
        console.print(stage_table(rec))
        t0 = rec["phase_times"]["pending"]
        table("Stages", ["phase", "at (s)"],
              [[p, f"{ts - t0:.3f}"] for p, ts in rec["phase_times"].items()])
        table("Pre-copy passes", ["pass", "at ms", "remaining MiB", "sent MiB",
                                  "dirty MiB/s", "MiB/s", "expected downtime ms"],
              [[i["number"], i["at_ms"], mib(i["remaining_bytes"]),
                mib(i["transferred_bytes"]), mib(i["dirty_rate_bytes_s"]),
                mib(int(i["throughput_bytes_s"])), i["expected_downtime_ms"]]
               for i in rec["iterations"]])
        if rec.get("actions"):
            table("Convergence actions", ["at ms", "action", "value", "why"],
                  [[a["at_ms"], a["kind"], a["value"], a["reason"]] for a in rec["actions"]])
        if rec["phase"] in (Phase.COMPLETED, Phase.FAILED):
            console.print(summary(rec))

    @migration_app.command("cancel")
    @handle_errors
    def migration_cancel(migration_id: str, url: UrlOpt = None) -> None:
        """Cancel a migration before switchover; the VM keeps running on its source."""
        connect(url).call("POST", f"/v1/migrations/{migration_id}/cancel")
        console.print(f"cancel requested for {migration_id}")


__all__ = ["migration_app", "register"]
