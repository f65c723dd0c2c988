"""A guest sends only with its own NIC's MAC (agent/nic_filter.py), through the kernel:
frames written into a real tap on a real bridge, one with the NIC's MAC and others
forged, and what reaches the bridge's other port. Needs root; no lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.agent.nic_filter import ruleset

NS = f"ferry-nicf-{os.getpid()}"
TAP, OTHER_TAP = "fyttestnic0", "fyttestnic1"
OWN, OTHERS = "52:54:00:aa:00:01", "52:54:00:aa:00:02"
FORGED = "52:54:00:bb:00:09"
FRAMES = Path(__file__).with_name("nic_frames.py")


def _in_ns(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", NS, *argv], input=stdin, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@pytest.fixture
def bridge() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root, as CI does")
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=30)
    try:
        for cmd in ("link add br0 type bridge stp_state 0",
                    "link add vin type veth peer name vout",
                    f"tuntap add dev {TAP} mode tap", f"tuntap add dev {OTHER_TAP} mode tap",
                    "link set vin master br0 up", "link set vout up",
                    f"link set {TAP} master br0 up", f"link set {OTHER_TAP} master br0 up",
                    "link set br0 up"):
            _in_ns("ip", *cmd.split())
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS], timeout=30)


def _arrived(tap: str, sources: list[str]) -> list[str]:
    out = _in_ns(sys.executable, str(FRAMES), tap, "vout", *sources)
    return list(json.loads(out))


def test_a_guest_sends_with_its_own_mac_only(bridge: None) -> None:
    # without the filter every frame crosses the bridge: the test can tell
    assert _arrived(TAP, [OWN, FORGED, OTHERS]) == [OWN, FORGED, OTHERS]
    _in_ns("nft", "-f", "-", stdin=ruleset({TAP: OWN, OTHER_TAP: OTHERS}))
    # its own MAC passes; a made-up one, and the MAC of the VM on the other tap, do not
    assert _arrived(TAP, [OWN, FORGED, OTHERS]) == [OWN]
    assert _arrived(OTHER_TAP, [OWN, OTHERS]) == [OTHERS]
    assert '"fyttestnic0"' in _in_ns("nft", "list", "table", "bridge", "ferry_nics")
    # a tap the table does not name (an older agent's) is left alone
    _in_ns("nft", "-f", "-", stdin=ruleset({OTHER_TAP: OTHERS}))
    assert _arrived(TAP, [OWN, FORGED]) == [OWN, FORGED]
