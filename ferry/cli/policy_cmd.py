"""`ferry policy show|set`: the cluster's default migration policy; and the shared
option parsing that `ferry vm migrate` uses for per-migration overrides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from ferry.cli.client import connect
from ferry.cli.output import console, print_json, table
from ferry.domain.migration import (
    DEFAULT_BUDGET_S_PER_GIB,
    KUBEVIRT_BUDGET_S_PER_GIB,
    PolicyKind,
)
from ferry.domain.units import parse_duration_ms, parse_rate

app = typer.Typer(help="The cluster's default migration policy.", no_args_is_help=True)

PolicyOpt = Annotated[str | None, typer.Option(
    help="convergence policy: ferry (low downtime, throttle, post-copy if allowed), "
    "nova, nova-legacy, kubevirt, qemu")]
DowntimeOpt = Annotated[str | None, typer.Option(help="longest allowed downtime, e.g. 500ms")]
BandwidthOpt = Annotated[str | None, typer.Option(
    help="cap the stream, e.g. 200MiB (per second) or 500mbit; 0 = unlimited")]
BudgetOpt = Annotated[int | None, typer.Option(
    help="completion budget in seconds per GiB of RAM (default: the policy's own, "
    "KubeVirt 150, the others 800 as Nova)")]
ThrottleOpt = Annotated[int | None, typer.Option(
    help="largest vCPU throttle in percent (1-99) the policy may apply; see --no-throttle")]
AllowThrottleOpt = Annotated[bool | None, typer.Option(
    "--throttle/--no-throttle", help="allow slowing the guest's vCPUs to converge")]
PostcopyOpt = Annotated[bool | None, typer.Option(
    "--allow-postcopy/--no-postcopy",
    help="allow post-copy; a network failure after the switch LOSES the VM")]
MultifdOpt = Annotated[int | None, typer.Option(help="parallel streams (0 = off)")]
CompressOpt = Annotated[str | None, typer.Option(
    help="none, zlib or zstd (needs --multifd)")]
EncryptionOpt = Annotated[str | None, typer.Option(
    help="TLS for memory and disk streams: required (default), opportunistic, disabled")]


def overrides(policy: str | None = None, max_downtime: str | None = None,
              bandwidth: str | None = None, budget: int | None = None,
              max_throttle: int | None = None, throttle: bool | None = None,
              postcopy: bool | None = None, multifd: int | None = None,
              compress: str | None = None, encryption: str | None = None) -> dict[str, Any]:
    """Only the fields the user gave; the server merges them onto its defaults."""
    out: dict[str, Any] = {}
    if policy is not None:
        out["policy"] = policy
    if max_downtime is not None:
        out["max_downtime_ms"] = parse_duration_ms(max_downtime)
    if bandwidth is not None:
        out["max_bandwidth_bytes_s"] = 0 if bandwidth == "0" else parse_rate(bandwidth)
    if budget is not None:
        out["completion_budget_s_per_gib"] = budget
    if max_throttle is not None:
        out["max_throttle_pct"] = max_throttle
    if throttle is not None:
        out["allow_throttle"] = throttle
    if postcopy is not None:
        out["allow_postcopy"] = postcopy
    if multifd is not None:
        out["multifd_channels"] = multifd
    if compress is not None:
        out["compression"] = compress
    if encryption is not None:
        out["encryption"] = encryption
    return out


def budget_text(p: dict[str, Any]) -> str:
    own = p.get("completion_budget_s_per_gib")
    if own is not None:
        return f"{own} s per GiB"
    policy_own = (KUBEVIRT_BUDGET_S_PER_GIB if p["policy"] == PolicyKind.KUBEVIRT
                  else DEFAULT_BUDGET_S_PER_GIB)
    return f"{policy_own} s per GiB (the policy's own)"


def show_policy(p: dict[str, Any]) -> None:
    bw = p["max_bandwidth_bytes_s"]
    table("Migration policy (cluster default)", ["setting", "value"], [
        ["policy", p["policy"]], ["max downtime", f"{p['max_downtime_ms']} ms"],
        ["bandwidth", f"{bw / 1048576:.0f} MiB/s" if bw else "unlimited"],
        ["completion budget", budget_text(p)],
        ["progress timeout", f"{p['progress_timeout_s']} s"],
        ["throttle", f"up to {p['max_throttle_pct']} %" if p["allow_throttle"] else "off"],
        ["post-copy", "allowed" if p["allow_postcopy"] else "off"],
        ["multifd", p["multifd_channels"] or "off"], ["compression", p["compression"]],
        ["encryption", p.get("encryption", "required")]])


def register(handle_errors: Callable[..., Any]) -> None:
    @app.command("show")
    @handle_errors
    def policy_show(url: Annotated[str | None, typer.Option("--url")] = None,
                    json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Show the defaults every migration starts from."""
        p = connect(url).call("GET", "/v1/policy")
        print_json(p) if json_out else show_policy(p)

    @app.command("set")
    @handle_errors
    def policy_set(policy: PolicyOpt = None, max_downtime: DowntimeOpt = None,
                   bandwidth: BandwidthOpt = None, budget: BudgetOpt = None,
                   max_throttle: ThrottleOpt = None, throttle: AllowThrottleOpt = None,
                   allow_postcopy: PostcopyOpt = None, multifd: MultifdOpt = None,
                   compress: CompressOpt = None, encryption: EncryptionOpt = None,
                   url: Annotated[str | None, typer.Option("--url")] = None) -> None:
        """Change the defaults; fields not given stay as they are."""
        changes = overrides(policy, max_downtime, bandwidth, budget, max_throttle, throttle,
                            allow_postcopy, multifd, compress, encryption)
        if not changes:
            console.print("nothing to change; see `ferry policy set --help`")
            raise typer.Exit(2)
        show_policy(connect(url).call("PATCH", "/v1/policy", changes))
