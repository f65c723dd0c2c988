"""The nftables script that admits VXLAN only from a host's peers (agent/vxlan_filter.py).
The lab test (tests/integration/test_networks.py) shows a stranger's datagram dropped
and a peer's learnt; here: the script names exactly the peers and nft accepts it."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from ferry.agent.vxlan_filter import TABLE, removal, ruleset
from tests.unit.nft_check import assert_nft_accepts


def test_the_script_admits_each_networks_peers_for_its_vni_only() -> None:
    a, b, c = IPv4Address("198.18.5.11"), IPv4Address("198.18.5.12"), IPv4Address("10.9.8.7")
    script = ruleset({100: [b, a, b], 101: [a, c]})
    assert "elements = { 10.9.8.7, 198.18.5.11, 198.18.5.12 }" in script
    assert "udp dport 4789 ip saddr != @peers counter drop" in script
    # c is an extra endpoint of 101 only: VNI 100 from it is dropped
    assert "udp dport 4789 @th,96,24 100 ip saddr != { 198.18.5.11, 198.18.5.12 } " \
        "counter drop" in script
    assert "udp dport 4789 @th,96,24 101 ip saddr != { 10.9.8.7, 198.18.5.11 } " \
        "counter drop" in script
    assert "udp dport 4789 @th,96,24 != { 100, 101 } counter drop" in script
    assert "meta nfproto ipv6 udp dport 4789 counter drop" in script  # no v6 VTEPs
    # replaced in one transaction: the old table goes in the same script
    assert script.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
    # a network with no peer (one host) takes VXLAN from nobody
    assert "udp dport 4789 @th,96,24 102 counter drop" in ruleset({102: []})


@pytest.mark.parametrize("networks", [
    {}, {100: []}, {100: [IPv4Address("10.9.8.7")]},
    {100: [IPv4Address("10.9.8.7")], 16777215: [IPv4Address("10.9.8.6")]}])
def test_nft_accepts_the_script(networks: dict[int, list[IPv4Address]]) -> None:
    for script in (ruleset(networks), removal()):
        assert_nft_accepts(script)
