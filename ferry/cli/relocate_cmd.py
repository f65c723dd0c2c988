"""`ferry vm relocate` (Storage vMotion) with a progress bar, and `ferry relocation ...`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from ferry.cli.client import Client, connect
from ferry.cli.output import console, print_json, table
from ferry.domain.storage import DEFAULT_COPY_PROGRESS_TIMEOUT_S
from ferry.domain.units import parse_rate

relocation_app = typer.Typer(help="Disk moves (Storage vMotion): list, show, cancel.",
                             no_args_is_help=True)
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def describe(rec: dict[str, Any]) -> str:
    t = rec["phase_times"]
    end = t.get("completed", t.get("failed", 0.0))
    took = f" in {end - t['pending']:.1f} s" if end else ""
    where = (f"{rec['source']['datastore']}:{rec['source']['path']} → "
             f"{rec['target']['datastore']}:{rec['target']['path']} "
             f"({rec['target']['format']}, {rec['target']['provisioning']})")
    if rec["phase"] == "completed":
        kept = "kept" if rec["keep_source"] else "removed"
        return f"[green]completed[/]{took}: {where}; old image {kept}" + (
            f" ({escape(str(rec['reason']))})" if rec.get("reason") else "")
    if rec["phase"] == "failed":
        return f"[red]failed[/]{took}: {escape(str(rec['reason']))}"
    return f"{rec['phase']}: {where}"


def follow(client: Client, relocation_id: str, quiet: bool) -> dict[str, Any]:
    rec: dict[str, Any] = client.call("GET", f"/v1/relocations/{relocation_id}")
    events = client.events(f"/v1/relocations/{relocation_id}/events")
    if quiet:
        for event in events:
            rec = event
        return rec
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"disk {rec['disk']} of {rec['vm']}", total=None)
        for event in events:
            rec = event
            bar.update(task, completed=rec["copied_bytes"], total=rec["total_bytes"] or None,
                       description=f"disk {rec['disk']} of {rec['vm']}: {rec['phase']}")
    return rec


def register(vm_app: typer.Typer, handle_errors: Callable[..., Any]) -> None:
    @vm_app.command("relocate")
    @handle_errors
    def vm_relocate(
        name: Annotated[str, typer.Argument(help="VM whose disk moves (it keeps running)")],
        datastore: Annotated[str, typer.Option(help="datastore to move the disk to")],
        disk: Annotated[str | None, typer.Option(help="which disk (needed if several)")
                        ] = None,
        fmt: Annotated[str | None, typer.Option("--format", help="qcow2 or raw "
                                                "(default: keep)")] = None,
        provisioning: Annotated[str | None, typer.Option(help="thin or thick "
                                                         "(default: keep)")] = None,
        path: Annotated[str | None, typer.Option(help="image path inside the datastore "
                                                 "(default VM/DISK.FORMAT)")] = None,
        keep_source: Annotated[bool, typer.Option(help="keep the old image")] = False,
        bandwidth: Annotated[str | None, typer.Option(
            help="cap the copy, e.g. 50MiB (per second), to spare the storage")] = None,
        progress_timeout: Annotated[int, typer.Option(
            help="give up (and keep the VM on its disk) when the copy has not gained on "
                 "the guest's writes for this many seconds")
        ] = DEFAULT_COPY_PROGRESS_TIMEOUT_S,
        no_wait: Annotated[bool, typer.Option("--no-wait", help="print the id and return")
                           ] = False,
        url: UrlOpt = None, json_out: JsonOpt = False,
    ) -> None:
        """Move a running VM's disk to another datastore, live (Storage vMotion)."""
        client = connect(url)
        rec = client.call("POST", "/v1/relocations", {
            "vm": name, "datastore": datastore, "disk": disk, "format": fmt,
            "provisioning": provisioning, "path": path, "keep_source": keep_source,
            "bandwidth_bytes_s": parse_rate(bandwidth) if bandwidth else 0,
            "progress_timeout_s": progress_timeout})
        if no_wait:
            print_json(rec) if json_out else print(rec["id"])
            return
        rec = follow(client, rec["id"], quiet=json_out)
        print_json(rec) if json_out else console.print(describe(rec))
        if rec["phase"] != "completed":
            raise typer.Exit(1)

    @relocation_app.command("list")
    @handle_errors
    def relocation_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Every disk move, newest last."""
        recs = connect(url).call("GET", "/v1/relocations")
        if json_out:
            print_json(recs)
            return
        table("Disk moves", ["id", "VM", "disk", "phase", "to", "MiB", "reason"],
              [[r["id"], r["vm"], r["disk"], r["phase"],
                f"{r['target']['datastore']}:{r['target']['path']}",
                r["total_bytes"] >> 20, r["reason"]] for r in recs])

    @relocation_app.command("show")
    @handle_errors
    def relocation_show(relocation_id: str, url: UrlOpt = None, json_out: JsonOpt = False
                        ) -> None:
        """One disk move: phases, progress, outcome."""
        rec = connect(url).call("GET", f"/v1/relocations/{relocation_id}")
        if json_out:
            print_json(rec)
            return
        t0 = rec["phase_times"]["pending"]
        table(f"relocation {relocation_id}", ["phase", "at (s)"],
              [[p, f"{ts - t0:.3f}"] for p, ts in rec["phase_times"].items()])
        console.print(describe(rec))

    @relocation_app.command("cancel")
    @handle_errors
    def relocation_cancel(relocation_id: str, url: UrlOpt = None) -> None:
        """Cancel a disk move before its pivot; the VM keeps its original disk."""
        connect(url).call("POST", f"/v1/relocations/{relocation_id}/cancel")
        console.print(f"cancel requested for {relocation_id}")
