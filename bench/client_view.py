"""The client's view of a migration for the benchmarks: the lab's echo client
(ferry/lab/echo.py) around a migration, and the taps a raw (hand-started) QEMU needs on
the lab's VM network.

The echo client runs in the lab's client namespace (an "outside" machine on the VM
network `vmnet`) against the probe guest's static address: a UDP request every 1 ms and
one TCP connection streaming 16-byte messages. It is started just before a migration (it
waits for its first UDP reply and its TCP connection) and stopped SETTLE_S after the
migration ended, so a gap still open at the end is measured (the echo client counts the
silence up to its last send as a gap too).
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.cli.client import Client
from ferry.domain.networks import bridge_name, tap_name
from ferry.lab.config import NETWORK, LabConfig
from ferry.lab.echo import EchoReport, EchoSession, start_echo

SETTLE_S = 1.0  # the echo client keeps running this long after the migration ended


@dataclass
class View:
    """What the echo client saw during one run (JSON-friendly)."""

    gap_ms: float
    tcp_broken: bool
    tcp_error: str | None
    tcp_bytes_sent: int
    tcp_bytes_echoed: int
    udp_sent: int
    udp_lost: int

    @classmethod
    def of(cls, report: EchoReport) -> View:
        return cls(gap_ms=round(report.max_gap_ms, 1),
                   tcp_broken=report.tcp_broken or not report.tcp_connected,
                   tcp_error=report.tcp_error, tcp_bytes_sent=report.tcp_bytes_sent,
                   tcp_bytes_echoed=report.tcp_bytes_echoed, udp_sent=report.udp_sent,
                   udp_lost=report.udp_lost)

    def record(self) -> dict[str, object]:
        """The body of PUT /v1/migrations/{id}/client-view."""
        return {"gap_ms": self.gap_ms, "tcp_survived": not self.tcp_broken,
                "udp_lost": self.udp_lost, "announce": True}


class Watch:
    """A running echo client; `stop(ended)` waits until SETTLE_S after `ended` (a
    time.monotonic() value, when the migration was seen to end) and returns the view."""

    def __init__(self, session: EchoSession) -> None:
        self.session = session
        self.view: View | None = None

    def stop(self, ended: float) -> View:
        time.sleep(max(0.0, ended + SETTLE_S - time.monotonic()))
        self.view = View.of(self.session.stop())
        return self.view


def forget_neighbor(config: LabConfig, address: str) -> None:
    """Drop the client machine's ARP entry for `address`: the benchmarks give the same
    address to guests with other MACs, one after another."""
    subprocess.run(["ip", "-n", config.client_ns, "neigh", "flush", "to", address],
                   check=False, capture_output=True)


@contextlib.contextmanager
def watching(config: LabConfig, address: str) -> Iterator[Watch]:
    """The echo client against `address`, from now until Watch.stop (or, on an error,
    killed on the way out)."""
    forget_neighbor(config, address)
    with (tempfile.TemporaryDirectory(prefix="ferry-bench-echo-") as tmp,
          start_echo(config.client_ns, address, Path(tmp) / "echo.json") as session):
        yield Watch(session)


# --- a raw QEMU's NIC on the VM network -------------------------------------------
@dataclass(frozen=True)
class VmNet:
    bridge: str
    mtu: int


def vm_network(client: Client) -> VmNet:
    """The lab's VM network as every host provides it (bridge fyb<vni>, its MTU)."""
    spec = client.call("GET", f"/v1/networks/{NETWORK}")["spec"]
    return VmNet(bridge_name(int(spec["vni"])), int(spec["mtu"]))


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def raw_taps(config: LabConfig, hosts: list[str], vm_uuid: str, nic: str, vmnet: VmNet
             ) -> Iterator[str]:
    """The tap Ferry's agent would make for the NIC, on the VM network's bridge in every
    host namespace in `hosts`; always removed on the way out (also after a failure)."""
    tap = tap_name(vm_uuid, nic)
    made: list[str] = []
    try:
        for host in hosts:
            ns = config.netns(host)
            _ip("-n", ns, "link", "del", tap, check=False)  # a leftover of a killed run
            _ip("-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
            made.append(ns)
            _ip("-n", ns, "link", "set", tap, "mtu", str(vmnet.mtu), "master", vmnet.bridge,
                "up")
        yield tap
    finally:
        for ns in made:
            _ip("-n", ns, "link", "del", tap, check=False)


def tap_exists(config: LabConfig, host: str, tap: str) -> bool:
    return subprocess.run(["ip", "-n", config.netns(host), "link", "show", tap],
                          check=False, capture_output=True).returncode == 0
