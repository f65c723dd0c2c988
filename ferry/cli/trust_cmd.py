"""`ferry token …` and `ferry host join-token`: the trust model from the command line
(`ferry events` is in events_cmd.py)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ferry.cli.client import connect
from ferry.cli.output import console, print_json, table
from ferry.domain.units import parse_duration_ms

token_app = typer.Typer(help="API tokens (viewer, operator, admin).", no_args_is_help=True)
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def register(app: typer.Typer, host_app: typer.Typer,
             handle_errors: Callable[..., Any]) -> None:
    @token_app.command("create")
    @handle_errors
    def token_create(name: Annotated[str, typer.Argument(help="what the token is for")],
                     role: Annotated[str, typer.Option(
                         help="viewer, operator or admin (at most your own role)")] = "viewer",
                     url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Create a token; its secret is printed this once and stored only hashed."""
        made = connect(url).call("POST", "/v1/tokens", {"name": name, "role": role})
        if json_out:
            print_json(made)
            return
        console.print(f"token {made['info']['id']} ({made['info']['role']}) created; "
                      "its secret is shown only now:")
        console.print(made["token"], markup=False, highlight=False)

    @token_app.command("list")
    @handle_errors
    def token_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
        """Tokens you may see (an admin sees all); never their secrets."""
        tokens = connect(url).call("GET", "/v1/tokens")
        if json_out:
            print_json(tokens)
            return
        table("Tokens", ["id", "name", "role", "created", "by", "state"],
              [[t["id"], t["name"], t["role"], _when(t["created_at"]), t["created_by"] or "-",
                "revoked" if t["revoked"] else "active"] for t in tokens])

    @token_app.command("revoke")
    @handle_errors
    def token_revoke(token_id: Annotated[str, typer.Argument(help="the token's id")],
                     url: UrlOpt = None) -> None:
        """Revoke a token at once (one you created, or any as an admin)."""
        t = connect(url).call("DELETE", f"/v1/tokens/{token_id}")
        console.print(f"token {t['id']} ({t['name']}) revoked")

    @host_app.command("join-token")
    @handle_errors
    def join_token(host: Annotated[str, typer.Argument(help="name the host will have")],
                   ttl: Annotated[str, typer.Option(help="valid for, e.g. 1h")] = "1h",
                   url: UrlOpt = None) -> None:
        """A one-time token with which a new host enrols.

        Put it in the host's agent config as join_token, with control_url and control_ca."""
        out = connect(url).call("POST", "/v1/join-tokens",
                                {"host": host, "ttl_s": parse_duration_ms(ttl) // 1000})
        console.print(f"join token for {host}, valid {out['expires_in_s']} s, usable once:")
        console.print(out["token"], markup=False, highlight=False)

    app.add_typer(token_app, name="token")
