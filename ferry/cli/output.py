"""Tables and messages on the terminal; JSON when asked."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from ferry.domain.errors import FerryError

console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_error(exc: FerryError) -> None:
    err_console.print(f"[bold red]error:[/] {exc.problem}")
    if exc.fix:
        err_console.print(f"[yellow]fix:[/] {exc.fix}")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console.print(t)


def mib(n: int | None) -> str:
    return "" if n is None else f"{n / 1048576:.1f}"


def heartbeat_text(hb: dict[str, Any] | None) -> str:
    if not hb:
        return "-"
    return (f"seq={hb['seq']} written={hb['pages_written']} "
            f"errors={hb['mem_errors'] + hb['disk_errors']}")
