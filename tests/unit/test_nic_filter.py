"""The nftables script that lets a guest send only with its NIC's MAC
(agent/nic_filter.py). tests/integration/test_nic_filter.py sends the frames through a
real bridge; here: the script names exactly the taps and MACs, and nft accepts it."""

from __future__ import annotations

import pytest

from ferry.agent.nic_filter import TABLE, ruleset
from ferry.domain.errors import InvalidInput
from tests.unit.nft_check import assert_nft_accepts


def test_each_tap_is_admitted_with_its_own_mac_only() -> None:
    script = ruleset({"fytbbb": "52:54:00:00:00:02", "fytaaa": "52:54:00:00:00:01"})
    assert 'set taps { type ifname; elements = { "fytaaa", "fytbbb" } }' in script
    assert ('elements = { "fytaaa" . 52:54:00:00:00:01, "fytbbb" . 52:54:00:00:00:02 }'
            in script)
    assert "iifname @taps iifname . ether saddr != @sources counter drop" in script
    # replaced in one transaction; no tap left: only the removal
    assert script.startswith(f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n")
    assert ruleset({}) == f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n"


@pytest.mark.parametrize("tap, mac", [
    ('fyt" }', "52:54:00:00:00:01"), ("fytaaa", "52:54:00:00:00:01 } drop"),
    ("fyt0123456789abc", "52:54:00:00:00:01"), ("fytaaa", "52-54-00-00-00-01")])
def test_what_could_change_the_script_is_refused(tap: str, mac: str) -> None:
    with pytest.raises(InvalidInput, match="cannot be filtered"):
        ruleset({tap: mac})


@pytest.mark.parametrize("macs", [{}, {"fytaaa": "52:54:00:00:00:01"},
                                  {"fytaaa": "52:54:00:00:00:01",
                                   "fyt0123456789ab": "52:54:00:ff:ee:dd"}])
def test_nft_accepts_the_script(macs: dict[str, str]) -> None:
    assert_nft_accepts(ruleset(macs))
