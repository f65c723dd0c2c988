"""`ferry network …`: VM networks that span the hosts (a bridge per host, VXLAN between)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape

from ferry.cli.client import connect
from ferry.cli.output import console, print_json, table

app = typer.Typer(help="VM networks spanning the hosts (Linux bridge + VXLAN per host).",
                  no_args_is_help=True)
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _hosts(view: dict[str, Any]) -> str:
    return ", ".join(f"{h}: {s}" for h, s in sorted(view["hosts"].items())) or "-"


def register(handle_errors: Callable[..., Any]) -> None:
    @app.command("create")
    @handle_errors
    def create(name: Annotated[str, typer.Argument(help="lowercase letters, digits, '-'")],
               vni: Annotated[int | None, typer.Option(
                   help="VXLAN network identifier 1-16777215 (default: lowest free from "
                        "100)")] = None,
               mtu: Annotated[int | None, typer.Option(
                   help="MTU of the segment (default 1450: 1500 minus VXLAN)")] = None,
               vtep: Annotated[list[str] | None, typer.Option(
                   help="IPv4 address of an endpoint outside the cluster that joins the "
                        "segment (a router), repeatable")] = None,
               url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Create a network and provide it on every host; VMs join it with --nic NAME."""
        view = connect(url).call("POST", "/v1/networks", {
            "name": name, "vni": vni, "mtu": mtu, "vteps": vtep or []})
        if json_out:
            print_json(view)
            return
        spec = view["spec"]
        console.print(f"network {spec['name']} created: VNI {spec['vni']}, MTU {spec['mtu']}"
                      # a host's state may be an error's text: not markup
                      f"; hosts: {escape(_hosts(view))}")

    @app.command("list")
    @handle_errors
    def list_(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Networks, their VNI, and whether each host provides them."""
        views = connect(url).call("GET", "/v1/networks")
        if json_out:
            print_json(views)
            return
        table("Networks", ["network", "VNI", "MTU", "hosts", "VMs"],
              [[v["spec"]["name"], v["spec"]["vni"], v["spec"]["mtu"], _hosts(v),
                len(v["vms"])] for v in views])

    @app.command("show")
    @handle_errors
    def show(name: str, url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """One network: VNI, MTU, extra endpoints, state per host, the VMs on it."""
        v = connect(url).call("GET", f"/v1/networks/{name}")
        if json_out:
            print_json(v)
            return
        spec = v["spec"]
        table(f"network {name}", ["", ""], [
            ["VNI", spec["vni"]], ["MTU", spec["mtu"]],
            ["extra VTEPs", ", ".join(spec["vteps"]) or "-"],
            *[[f"host {h}", s] for h, s in sorted(v["hosts"].items())],
            ["VMs", ", ".join(v["vms"]) or "-"]])

    @app.command("delete")
    @handle_errors
    def delete(name: str, url: UrlOpt = None) -> None:
        """Delete a network no VM uses; its bridge goes from every host."""
        connect(url).call("DELETE", f"/v1/networks/{name}")
        console.print(f"network {name} deleted")
