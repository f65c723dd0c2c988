"""Every command's summary reads as one paragraph in its group's listing."""

from __future__ import annotations

import inspect

import click
import typer

from ferry.cli.main import app


def _commands(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
    found = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += _commands(sub, f"{path} {name}")
    return found


def test_every_summary_is_one_line() -> None:
    # Typer's rich listing keeps a summary's line breaks: a docstring whose first
    # paragraph spans lines shows up broken mid-sentence in `ferry GROUP --help`.
    commands = _commands(typer.main.get_command(app), "ferry")
    assert len(commands) > 40
    broken = [path for path, cmd in commands
              if "\n" in inspect.cleandoc(cmd.help or "").split("\n\n")[0]]
    assert broken == []
