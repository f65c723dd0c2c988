"""The agent's taps (agent/taps.py) made by the kernel's calls in a scratch namespace:
what `ip` then shows of them, what a second plug does, and a bridge that is not there
(the lab tests run guests on such taps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NS = f"ferry-tap-{os.getpid()}"
TAP, BRIDGE = "fyt-test0", "fyb-test"
# Run in the namespace: make and plug the tap, then make and plug it again; print how
# each step ended.
PLUG = """
import json, sys
from ferry.agent import taps
tap, bridge = sys.argv[1:3]
ends = {}
def attempt(key, call, *args):
    try:
        call(*args)
        ends[key] = "ok"
    except taps.TapFailed as exc:
        ends[key] = f"{type(exc).__name__}: {exc.problem}"
attempt("make", taps.make_tap, tap)
attempt("plug", taps.plug_tap, tap, 1400, bridge)
attempt("make_again", taps.make_tap, tap)
attempt("plug_again", taps.plug_tap, tap, 1400, bridge)
attempt("exists", lambda: None if taps.link_exists(tap) else 1 / 0)
print(json.dumps(ends))
"""


def _in_ns(*argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", NS, *argv], text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _link(name: str) -> dict[str, object]:
    out = _in_ns("ip", "-d", "-j", "link", "show", "dev", name)
    links: list[dict[str, object]] = json.loads(out)
    return links[0]


def test_a_tap_is_made_persistent_on_its_bridge_and_up() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root, as CI does")
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=30)
    try:
        _in_ns("ip", "link", "add", BRIDGE, "type", "bridge")
        ends = json.loads(_in_ns(sys.executable, "-c", PLUG, TAP, BRIDGE))
        assert ends["make"] == "ok" and ends["plug"] == "ok"
        assert ends["make_again"] == "ok"  # a persistent tap no file holds: taken again
        assert ends["plug_again"].startswith("TapBusy")  # a port already: networks.py
        assert ends["exists"] == "ok"
        tap = _link(TAP)
        assert tap["mtu"] == 1400 and tap["master"] == BRIDGE
        assert "UP" in tap["flags"]  # type: ignore[operator]
        info = tap["linkinfo"]
        assert isinstance(info, dict) and info["info_kind"] == "tun"
        data = info["info_data"]
        # What `ip tuntap add mode tap` makes: a persistent tap without the PI header.
        assert data["type"] == "tap" and data["pi"] is False and data["persist"] is True
    finally:
        subprocess.run(["ip", "netns", "del", NS], timeout=30)


def test_a_tap_on_a_bridge_that_is_not_there_is_refused_naming_it() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root, as CI does")
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=30)
    try:
        script = ("import sys\nfrom ferry.agent import taps\ntaps.make_tap(sys.argv[1])\n"
                  "try:\n    taps.plug_tap(sys.argv[1], 1450, 'fyb-nosuch')\n"
                  "except taps.TapFailed as exc:\n    print(exc.problem)\n")
        problem = _in_ns(sys.executable, "-c", script, TAP)
        assert "fyb-nosuch" in problem and TAP in problem
    finally:
        subprocess.run(["ip", "netns", "del", NS], timeout=30)
