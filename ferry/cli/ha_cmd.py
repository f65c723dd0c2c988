"""`ferry cluster ha` and `ferry vm ha`: VM high availability from the command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from ferry.cli.client import connect
from ferry.cli.output import console, print_json, table
from ferry.domain.ha import IsolationResponse, Priority

cluster_app = typer.Typer(help="Cluster-wide settings (HA) and the control plane's leader.",
                          no_args_is_help=True)
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def show(status: dict[str, Any]) -> None:
    s, r = status["settings"], status["reserve"]
    console.print(f"HA {'enabled' if s['enabled'] else 'disabled'}; host failures to "
                  f"tolerate {s['host_failures_to_tolerate']}; isolation response "
                  f"{s['isolation_response']}; power fencing "
                  f"{'on' if s.get('power_fencing', True) else 'off'}")
    worst = ", ".join(r["worst"]) or "-"
    verdict = "ok" if r["ok"] else f"[red]not kept[/]: {r['reason']}"
    console.print(f"reserve: {verdict}; protected VMs {r['protected_mib']} MiB of "
                  f"{r['capacity_mib']} MiB; worst case ({worst} failed) leaves "
                  f"{r['spare_mib']} MiB free")
    table("hosts", ["host", "health"], [[h, v] for h, v in sorted(status["hosts"].items())])
    if status["priorities"]:
        table("VM priorities (others: medium)", ["VM", "priority"],
              [[v, p] for v, p in sorted(status["priorities"].items())])


def register(vm_app: typer.Typer, handle_errors: Callable[..., Any]) -> None:
    @cluster_app.command("ha")
    @handle_errors
    def cluster_ha(
            enable: Annotated[bool | None, typer.Option(
                "--enable/--disable", help="turn HA on or off for the cluster")] = None,
            failures: Annotated[int | None, typer.Option(
                "--failures", help="host failures to tolerate (admission control)")] = None,
            isolation_response: Annotated[IsolationResponse | None, typer.Option(
                "--isolation-response", help="what an isolated host does with its VMs")
            ] = None,
            power_fencing: Annotated[bool | None, typer.Option(
                "--power-fencing/--no-power-fencing",
                help="power a dead host off through its power driver first; once the "
                "driver confirms it off, its VMs restart without waiting for their leases "
                "to expire")] = None,
            url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Show HA settings, host health and the reserve; change them with the options."""
        client = connect(url)
        changes: dict[str, Any] = {}
        if enable is not None:
            changes["enabled"] = enable
        if failures is not None:
            changes["host_failures_to_tolerate"] = failures
        if isolation_response is not None:
            changes["isolation_response"] = isolation_response.value
        if power_fencing is not None:
            changes["power_fencing"] = power_fencing
        status = (client.call("PATCH", "/v1/cluster/ha", changes) if changes
                  else client.call("GET", "/v1/cluster/ha"))
        print_json(status) if json_out else show(status)

    @cluster_app.command("leader")
    @handle_errors
    def cluster_leader(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Which control-plane replica leads (drives jobs, HA, DRS, schedules)."""
        view = connect(url).call("GET", "/v1/cluster/leader")
        if json_out:
            print_json(view)
            return
        holder = view["holder"] or "no replica"
        console.print(f"{holder} leads (term {view['term']}, lease "
                      f"{'runs' if view['expires_in_s'] > 0 else 'ran out'} "
                      f"{abs(view['expires_in_s']):.1f} s "
                      f"{'from now' if view['expires_in_s'] > 0 else 'ago'}); answered by "
                      f"{view['replica']} ({'leader' if view['leading'] else 'standby'})")

    @vm_app.command("ha")
    @handle_errors
    def vm_ha(name: str,
              priority: Annotated[Priority, typer.Option(
                  "--priority", help="restart priority: high, medium, low or disabled")],
              url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Set a VM's HA restart priority (disabled: never restarted by HA)."""
        out = connect(url).call("PUT", f"/v1/vms/{name}/ha", {"priority": priority.value})
        print_json(out) if json_out else console.print(
            f"VM {name}: HA priority {out['priority']}")
