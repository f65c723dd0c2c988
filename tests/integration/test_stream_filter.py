"""A cleartext migration's listeners admit its source host only (agent/stream_filter.py):
the rules through the kernel in a scratch namespace, then a cleartext migration in the
lab whose destination filters its port while the stream runs and lets go after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from ipaddress import IPv4Address

import pytest

from ferry.agent.stream_filter import TABLE, ruleset
from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    follow,
    remove_vm,
    slow_options,
    wait_phase,
)

NS = f"ferry-sf-{os.getpid()}"
LISTEN, SOURCE, STRANGER = "10.77.0.1", "10.77.0.2", "10.77.0.3"
PORT = 40123
# Listen on LISTEN:PORT, then connect from each address given; print how each attempt
# ended: connected, refused (a reset) or timed out (dropped).
CONNECT = """
import json, socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
ends = {}
for source in sys.argv[3:]:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5.0,
                                 source_address=(source, 0)).close()
        ends[source] = "connected"
    except ConnectionRefusedError:
        ends[source] = "refused"
    except OSError as exc:
        ends[source] = type(exc).__name__
print(json.dumps(ends))
"""


def _in_ns(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", NS, *argv], input=stdin, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def test_the_port_admits_its_source_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root, as CI does")
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=30)
    try:
        _in_ns("ip", "link", "set", "lo", "up")
        for address in (LISTEN, SOURCE, STRANGER):
            _in_ns("ip", "addr", "add", f"{address}/32", "dev", "lo")

        def attempts() -> dict[str, str]:
            out = _in_ns(sys.executable, "-c", CONNECT, LISTEN, str(PORT), SOURCE, STRANGER)
            return dict(json.loads(out))

        both = {SOURCE: "connected", STRANGER: "connected"}
        assert attempts() == both  # unfiltered: the test can tell
        _in_ns("nft", "-f", "-", stdin=ruleset({PORT: IPv4Address(SOURCE)}))
        # The stranger is refused at once (a reset), not left to time out.
        assert attempts() == {SOURCE: "connected", STRANGER: "refused"}
        _in_ns("nft", "-f", "-", stdin=ruleset({}))
        assert attempts() == both
    finally:
        subprocess.run(["ip", "netns", "del", NS], timeout=30)


def _stream_rules(lab: LabConfig, host: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", lab.netns(host), "nft", "list", "table",
                           "inet", TABLE], capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else ""


def test_a_cleartext_migration_admits_its_source_only(lab: LabConfig, client: Client
                                                      ) -> None:
    name = "sf-clear"
    boot_probe(client, lab, name, "host1", dirty=5)
    try:
        before = wait_heartbeat(client, name)
        rec = client.call("POST", "/v1/migrations", {
            "vm": name, "target": "host2",
            "options": {**slow_options(16), "encryption": "disabled"}})
        wait_phase(client, rec["id"], "precopy")
        uri = client.call("GET", f"/v1/migrations/{rec['id']}")["dest_uri"]
        port = int(uri.rsplit(":", 1)[1])
        rules = _stream_rules(lab, "host2")
        assert f"tcp dport {port} ip saddr != {lab.host_ip('host1')} " in rules, rules
        done = follow(client, rec["id"])
        assert done["phase"] == "completed", (done.get("reason"), done)
        assert_intact(client, name, "host2", lab, before)
        # gone once the destination runs: the port is nobody's any more
        assert f"dport {port} " not in _stream_rules(lab, "host2")
    finally:
        remove_vm(client, name)


def _host1(lab: LabConfig, *argv: str, check: bool = True) -> None:
    subprocess.run(["ip", "netns", "exec", lab.netns("host1"), *argv], check=check,
                   timeout=30)


def test_a_source_that_connects_from_another_address_is_refused_at_once(
        lab: LabConfig, client: Client) -> None:
    """host1 reaches host2 from an address it does not report (a route with another
    `src`): host2 refuses the cleartext stream with a reset, the migration fails at
    once saying what to set, and the VM runs on where it was."""
    name = "sf-other"
    other = str(lab.subnet.broadcast_address - 5)
    route = [f"{lab.host_ip('host2')}/32", "dev", "eth0"]
    added: list[list[str]] = []  # what this test added to host1, undone in reverse
    try:
        boot_probe(client, lab, name, "host1")
        _host1(lab, "ip", "addr", "add", f"{other}/32", "dev", "eth0")
        added.append(["addr", "del", f"{other}/32", "dev", "eth0"])
        _host1(lab, "ip", "route", "add", *route, "src", other)
        added.append(["route", "del", *route])
        before = wait_heartbeat(client, name)
        rec = client.call("POST", "/v1/migrations", {
            "vm": name, "target": "host2", "options": {"encryption": "disabled"}})
        done = follow(client, rec["id"])
        assert done["phase"] == "failed", done
        assert "refused" in done["reason"].lower(), done["reason"]
        assert "host2 admits this cleartext stream only from the address host1 reports" \
            in done["reason"], done["reason"]
        assert_intact(client, name, "host1", lab, before)
    finally:
        for undo in reversed(added):
            _host1(lab, "ip", *undo, check=False)
        remove_vm(client, name)
