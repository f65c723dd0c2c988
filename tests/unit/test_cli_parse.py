"""The CLI's own parsing of compact options, before anything reaches the API."""

from __future__ import annotations

import re

import pytest

from ferry.cli.main import parse_disk
from ferry.domain.errors import InvalidInput
from ferry.domain.specs import DiskSpec


def test_disk_defaults_to_qcow2_and_leaves_the_cache_to_the_spec() -> None:
    disk = parse_disk("root=shared:vms/web1.qcow2")
    assert disk == {"name": "root", "datastore": "shared", "path": "vms/web1.qcow2",
                    "format": "qcow2"}
    assert DiskSpec.model_validate(disk).cache == "none"


def test_disk_format_and_cache() -> None:
    disk = parse_disk("data=local-host1:d.raw:raw:writeback")
    assert DiskSpec.model_validate(disk).cache == "writeback"
    assert disk["format"] == "raw"


@pytest.mark.parametrize("text, says", [
    ("root", "not NAME=DATASTORE:PATH"),
    ("root=shared", "not NAME=DATASTORE:PATH"),
    ("=shared:a.qcow2", "not NAME=DATASTORE:PATH"),
    ("root=shared:a.qcow2:qcow2:none:extra", "not NAME=DATASTORE:PATH"),
    ("root=shared:a.qcow2:qcow2:unsafe", "cache 'unsafe' is not one of none, writeback"),
])
def test_bad_disk_options_name_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        parse_disk(text)


def test_schedule_actions_parse_to_the_api_body() -> None:
    from ferry.cli.schedule_cmd import parse_action
    assert parse_action(["migrate", "web1", "host2"]) == {
        "kind": "migrate", "vm": "web1", "target": "host2"}
    assert parse_action(["relocate", "web1", "fast"])["datastore"] == "fast"
    assert parse_action(["relocate", "web1", "fast", "data"])["disk"] == "data"
    assert parse_action(["maintenance", "host3", "off"])["on"] is False
    assert parse_action(["drs", "apply"]) == {"kind": "drs_apply"}


@pytest.mark.parametrize("words, says", [
    ([], "no action given"),
    (["migrate", "web1"], "`migrate web1` is not `migrate VM HOST`"),
    (["maintenance", "host3", "maybe"], "is not `maintenance HOST on|off`"),
    (["reboot", "web1"], "unknown action 'reboot'"),
])
def test_bad_schedule_actions_name_the_expected_form(words: list[str], says: str) -> None:
    from ferry.cli.schedule_cmd import parse_action
    with pytest.raises(InvalidInput, match=re.escape(says)):
        parse_action(words)
