"""The nftables script that admits VXLAN only from a host's peers (agent/vxlan_filter.py).
The lab test (tests/integration/test_networks.py) shows a stranger's datagram dropped
and a peer's learnt; here: the script names exactly the peers and nft accepts it."""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import IPv4Address

import pytest

from ferry.agent.vxlan_filter import TABLE, removal, ruleset


def test_the_script_admits_exactly_the_peers_once_each() -> None:
    peers = [IPv4Address("198.18.5.12"), IPv4Address("198.18.5.11"),
             IPv4Address("198.18.5.12")]
    script = ruleset(peers)
    assert "elements = { 198.18.5.11, 198.18.5.12 }" in script
    assert "udp dport 4789 ip saddr != @peers counter drop" in script
    assert "meta nfproto ipv6 udp dport 4789 counter drop" in script  # no v6 VTEPs
    # replaced in one transaction: the old table goes in the same script
    assert script.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")


@pytest.mark.parametrize("peers", [[], [IPv4Address("10.9.8.7")]])
def test_nft_accepts_the_script(peers: list[IPv4Address]) -> None:
    if shutil.which("nft") is None:
        pytest.fail("nft is missing: `make deps` installs nftables")
    # -c: parsed and checked by the kernel, nothing applied; without root (make
    # test-fast) in a network namespace of a user namespace of its own
    argv = ["nft", "-c", "-f", "-"]
    if os.geteuid() != 0:
        argv = ["unshare", "--net", "--map-root-user", *argv]
    for script in (ruleset(peers), removal()):
        done = subprocess.run(argv, input=script, text=True, capture_output=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
