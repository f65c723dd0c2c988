"""`ferry drs …`, `ferry rule …` and `ferry host maintenance`: DRS from the command line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ferry.cli.client import Client, connect
from ferry.cli.output import console, print_json, table

drs_app = typer.Typer(help="DRS: balance the cluster by live migration.",
                      no_args_is_help=True)
rule_app = typer.Typer(help="Placement rules: VM-VM (anti-)affinity, VM-host must/should.",
                       no_args_is_help=True)
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
FOLLOW_TIMEOUT_S = 3600.0


def _load(load: dict[str, float]) -> str:
    return f"cpu {load['cpu'] * 100:.0f}% mem {load['memory'] * 100:.0f}%"


def moves_table(title: str, moves: list[dict[str, Any]],
                results: list[dict[str, Any]] | None = None) -> None:
    rows = []
    for i, m in enumerate(moves):
        row = [m["vm"], m["source"], m["target"], m["reason"], m.get("rule") or "-",
               f"{m['gain']:.3f}", f"{m['cost']:.3f}", _load(m["source_after"]),
               _load(m["target_after"])]
        if results is not None:
            r = results[i]
            row.append(r.get("migration_id") or (
                "starts once the moves it needs end" if r.get("deferred")
                else f"refused: {r.get('error')}"))
        rows.append(row)
    cols = ["VM", "from", "to", "reason", "rule", "gain", "cost", "source after",
            "target after"] + (["migration"] if results is not None else [])
    table(title, cols, rows)


def show_plan(plan: dict[str, Any], results: list[dict[str, Any]] | None = None) -> None:
    moves_table(f"DRS plan: imbalance {plan['imbalance_before']:.3f} → "
                f"{plan['imbalance_after']:.3f}, {len(plan['moves'])} moves",
                plan["moves"], results)
    for conflict in plan.get("conflicts", []):
        console.print(f"[red]rule conflict:[/] {conflict}")
    for what in plan.get("unplaced", []):
        console.print(f"[red]no room:[/] {what}")


def follow_all(client: Client, ids: list[str]) -> list[dict[str, Any]]:
    """Poll the migrations until every one has ended; print each as it ends."""
    pending, done = set(ids), []
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for mid in sorted(pending):
            rec = client.call("GET", f"/v1/migrations/{mid}")
            if rec["phase"] in ("completed", "failed"):
                pending.discard(mid)
                done.append(rec)
                console.print(f"  {rec['vm']} {rec['source']} → {rec['target']}: "
                              f"{rec['phase']}" + (f" ({rec['reason']})"
                                                   if rec.get("reason") else ""))
        time.sleep(0.5)
    return done


def register(host_app: typer.Typer, handle_errors: Callable[..., Any]) -> None:
    @drs_app.command("plan")
    @handle_errors
    def drs_plan(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Preview what DRS would move now, with each move's reason."""
        plan = connect(url).call("GET", "/v1/drs/plan")
        print_json(plan) if json_out else show_plan(plan)

    @drs_app.command("apply")
    @handle_errors
    def drs_apply(wait: Annotated[bool, typer.Option(
            help="follow the moves until they end")] = True,
            url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Plan now and start the moves as live migrations (in parallel, within limits)."""
        client = connect(url)
        applied = client.call("POST", "/v1/drs/apply")
        if json_out:
            print_json(applied)
            return
        show_plan(applied["plan"], applied["results"])
        if wait:
            ended = follow_all(client, [r["migration_id"] for r in applied["results"]
                                        if r.get("migration_id")])
            failed = [r for r in ended if r["phase"] != "completed"]
            if failed:
                raise typer.Exit(1)

    @drs_app.command("settings")
    @handle_errors
    def drs_settings(
        automation: Annotated[str | None, typer.Option(
            help="manual (plans only), partial (initial placement), full (a loop applies "
                 "plans)")] = None,
        threshold: Annotated[int | None, typer.Option(
            help="1 (only mandatory moves) to 5 (act on slight gains); default 3")] = None,
        interval: Annotated[int | None, typer.Option(
            help="seconds between rounds when fully automated (default 60)")] = None,
        per_host_limit: Annotated[int | None, typer.Option(
            help="parallel migrations per host, in and out each (default 8)")] = None,
        dpm: Annotated[bool | None, typer.Option(
            help="DPM with full automation: standby hosts below the band, wake above")
        ] = None,
        url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Show DRS settings, or change the ones given."""
        client = connect(url)
        changes = {k: v for k, v in (("automation", automation), ("threshold", threshold),
                                     ("interval_s", interval), ("dpm", dpm),
                                     ("per_host_limit", per_host_limit)) if v is not None}
        config = (client.call("PATCH", "/v1/drs/settings", changes) if changes
                  else client.call("GET", "/v1/drs/settings"))
        if json_out:
            print_json(config)
            return
        table("DRS settings", ["", ""], [[k, v] for k, v in config.items()])

    @rule_app.command("add")
    @handle_errors
    def rule_add(name: Annotated[str, typer.Argument(help="the rule's name")],
                 kind: Annotated[str, typer.Option(
                     help="affinity, anti_affinity, vm_host_must, vm_host_must_not, "
                          "vm_host_should, vm_host_should_not")],
                 vm: Annotated[list[str], typer.Option(help="a VM, repeatable")],
                 host: Annotated[list[str] | None, typer.Option(
                     help="a host of the group (VM-host rules), repeatable")] = None,
                 url: UrlOpt = None) -> None:
        """Add a placement rule; one that conflicts with another must-rule is refused."""
        rule = connect(url).call("POST", "/v1/rules", {"name": name, "kind": kind,
                                                       "vms": vm, "hosts": host or []})
        console.print(f"rule {rule['name']} added ({rule['kind']})")

    @rule_app.command("list")
    @handle_errors
    def rule_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Every placement rule."""
        rules = connect(url).call("GET", "/v1/rules")
        if json_out:
            print_json(rules)
            return
        table("Rules", ["rule", "kind", "VMs", "hosts"],
              [[r["name"], r["kind"], ", ".join(r["vms"]), ", ".join(r["hosts"]) or "-"]
               for r in rules])

    @rule_app.command("remove")
    @handle_errors
    def rule_remove(name: str, url: UrlOpt = None) -> None:
        """Remove a placement rule."""
        connect(url).call("DELETE", f"/v1/rules/{name}")
        console.print(f"rule {name} removed")

    @host_app.command("power")
    @handle_errors
    def host_power(name: str,
                   driver: Annotated[str, typer.Option(help="ipmi, wol or lab")],
                   address: Annotated[str | None, typer.Option(help="IPMI: BMC address")] = None,
                   username: Annotated[str | None, typer.Option(help="IPMI: user")] = None,
                   password_file: Annotated[str | None, typer.Option(
                       help="IPMI: absolute path of a file holding the password")] = None,
                   mac: Annotated[str | None, typer.Option(help="Wake-on-LAN: MAC")] = None,
                   url: UrlOpt = None) -> None:
        """Set how a host is powered off and on (for DPM and `ferry host standby`)."""
        body = {k: v for k, v in (("driver", driver), ("address", address),
                                  ("username", username), ("password_file", password_file),
                                  ("mac", mac)) if v is not None}
        connect(url).call("PUT", f"/v1/hosts/{name}/power", body)
        console.print(f"host {name}: power driver {driver}")

    @host_app.command("standby")
    @handle_errors
    def host_standby(name: str, off: Annotated[bool, typer.Option(
            "--off", help="power it up again and let it take VMs")] = False,
            url: UrlOpt = None) -> None:
        """Evacuate a host by live migration and power it down (DPM's standby)."""
        h = connect(url, timeout_s=FOLLOW_TIMEOUT_S).call(
            "POST", f"/v1/hosts/{name}/standby", on=not off)
        console.print(f"host {name}: {h['state']}")

    @host_app.command("maintenance")
    @handle_errors
    def host_maintenance(name: str, off: Annotated[bool, typer.Option(
            "--off", help="take the host out of maintenance")] = False,
            wait: Annotated[bool, typer.Option(
                help="follow the evacuation until every VM has moved")] = True,
            url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Enter maintenance: evacuate the host's VMs by live migration.

        The VMs are spread by DRS, in parallel; refused with the reason when the other
        hosts lack room."""
        client = connect(url)
        result = client.call("POST", f"/v1/hosts/{name}/maintenance", on=not off)
        if json_out:
            print_json(result)
            return
        if off:
            console.print(f"host {name} is out of maintenance")
            return
        evac = result["evacuation"]
        if evac["plan"]["moves"]:
            moves_table(f"evacuating {name}", evac["plan"]["moves"], evac["results"])
        console.print(f"host {name} is in maintenance")
        if wait:
            ended = follow_all(client, [r["migration_id"] for r in evac["results"]
                                        if r.get("migration_id")])
            if any(r["phase"] != "completed" for r in ended):
                raise typer.Exit(1)
