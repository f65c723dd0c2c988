"""`ferry vm create` refuses an --ip it could not use, before asking the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ferry.cli import main as cli_main


class NoServer:
    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        raise AssertionError(f"nothing may be sent: {method} {path}")


@pytest.mark.parametrize("argv, message", [
    (["vm", "create", "v1", "--ip", "198.19.210.50"], "--probe"),
    (["vm", "create", "v1", "--probe", "--nic", "user", "--ip", "198.19.210.50"],
     "--nic user"),
])
def test_an_ip_that_cannot_be_used_is_refused(monkeypatch: pytest.MonkeyPatch,
                                              argv: list[str], message: str) -> None:
    monkeypatch.setattr(cli_main, "connect", lambda url=None: NoServer())
    monkeypatch.setattr(cli_main, "load", lambda directory: _Lab())
    result = CliRunner().invoke(cli_main.app, argv)
    assert result.exit_code != 0
    assert message in result.output, result.output


class _Lab:
    images_dir = Path("/nonexistent")

    class vm_subnet:  # stands in for an IPv4Network
        prefixlen = 24
