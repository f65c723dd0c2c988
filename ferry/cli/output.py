"""Tables and messages on the terminal; JSON when asked."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ferry.domain.errors import FerryError

# No emoji codes: user text such as "shared:a:qcow2" must print as written.
console = Console(width=None if sys.stdout.isatty() else 200, emoji=False)
err_console = Console(stderr=True, emoji=False)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_error(exc: FerryError) -> None:
    # escape: problems quote user input and syntax like "PATH[:FORMAT]", not markup
    err_console.print(f"[bold red]error:[/] {escape(exc.problem)}")
    if exc.fix:
        err_console.print(f"[yellow]fix:[/] {escape(exc.fix)}")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))
    console.print(t)


def mib(n: int | None) -> str:
    return "" if n is None else f"{n / 1048576:.1f}"


def heartbeat_text(hb: dict[str, Any] | None) -> str:
    if not hb:
        return "-"
    return (f"seq={hb['seq']} written={hb['pages_written']} "
            f"errors={hb['mem_errors'] + hb['disk_errors']}")
