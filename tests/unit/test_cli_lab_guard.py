"""A request meant for the lab never leaves the machine while the lab is down."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli.client import connect
from ferry.domain.errors import HostUnavailable
from ferry.lab.config import LabConfig


def test_cli_refuses_to_call_a_lab_that_is_down(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_URL", raising=False)
    config = LabConfig.default(tmp_path, 2, prefix="zq", subnet_octet=250)
    config.directory.mkdir(parents=True, exist_ok=True)
    config.config_file.write_text(config.model_dump_json())
    with pytest.raises(HostUnavailable, match="the lab is not running: `ferry lab up`"):
        connect(lab_dir=tmp_path)
    # The same when the lab's URL is given explicitly.
    with pytest.raises(HostUnavailable, match="not running"):
        connect(config.control_url, lab_dir=tmp_path)


def test_lab_subnet_is_a_test_range_and_configurable(tmp_path: Path) -> None:
    config = LabConfig.default(tmp_path, 3)
    assert config.bridge_ip.startswith("198.18.") and config.control_url.startswith("https")
    other = LabConfig.default(tmp_path, 3, subnet="10.99.0.0/24")
    assert other.host_ip("host2") == "10.99.0.11"
    with pytest.raises(ValueError):
        LabConfig.default(tmp_path, 3, subnet="10.99.0.0/30")
