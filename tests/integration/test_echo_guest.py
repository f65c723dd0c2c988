"""The probe guest on a real network: /init configures ip=, echod answers, and the lab's
echo client (ferry.lab.echo) sees its UDP replies and an intact TCP echo stream.

Not through the Ferry lab: one QEMU in a throwaway namespace ("fyecho-<pid>", a prefix
the lab never uses) with a tap whose host side holds the guest's gateway address.
Everything is removed in the fixture's finalizer, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.domain.probe import heartbeats
from ferry.lab.cluster import GUEST_DIR, GUEST_FILES  # FERRY_GUEST_DIR, default build/guest
from ferry.lab.echo import start_echo

HOST_IP = "198.19.210.1"  # the tap's side, inside the namespace
GUEST_IP = "198.19.210.10"
BOOT_TIMEOUT_S = 120  # TCG on a busy 2-core machine


@dataclass(frozen=True)
class EchoGuest:
    ns: str
    serial: Path

    def lines(self) -> list[str]:
        return self.serial.read_text(errors="replace").splitlines()


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


def _wait_for(serial: Path, proc: subprocess.Popen[bytes], needles: list[str]) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if all(n in text for n in needles):
            return
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited with status {proc.returncode}; serial:\n{text}")
        time.sleep(0.2)
    pytest.fail(f"guest never printed {needles} in {BOOT_TIMEOUT_S} s; serial:\n{text}")


@pytest.fixture
def echo_guest(tmp_path: Path) -> Iterator[EchoGuest]:
    if os.geteuid() != 0:
        # As the lab fixture: a run without root is a setup error, not a pass.
        pytest.fail("needs root (network namespace, tap device): run `make test` as root")
    if not all((GUEST_DIR / f).exists() for f in GUEST_FILES):
        pytest.fail(f"no guest image in {GUEST_DIR}: run `make guest`")
    ns = f"fyecho-{os.getpid()}"
    serial = tmp_path / "serial.log"
    _ip("netns", "del", ns, check=False)  # a leftover of a crashed run with our pid
    proc: subprocess.Popen[bytes] | None = None
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "tuntap", "add", "mode", "tap", "name", "tap0")
        _ip("-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", "tap0")
        _ip("-n", ns, "link", "set", "tap0", "up")
        append = (f"console=ttyS0 quiet panic=-1 ferry.probe_mib=32 "
                  f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "qemu-system-x86_64", "-accel", "tcg",
             "-cpu", "Nehalem", "-m", "256", "-nodefaults", "-display", "none",
             "-serial", f"file:{serial}", "-kernel", str(GUEST_DIR / "vmlinuz"),
             "-initrd", str(GUEST_DIR / "initrd.img"), "-append", append,
             "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
             "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:01"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_for(serial, proc, ["FERRY-ECHO-READY", "FERRY-PROBE-READY"])
        yield EchoGuest(ns, serial)
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        _ip("netns", "del", ns, check=False)


def test_echo_client_against_the_probe_guest(echo_guest: EchoGuest, tmp_path: Path) -> None:
    lines = echo_guest.lines()
    assert any(f"FERRY-GUEST-NET addr={GUEST_IP}/24 dev=eth0" in ln for ln in lines), lines
    assert any("FERRY-ECHO-READY udp=7 tcp=7" in ln for ln in lines), lines
    before = heartbeats(lines)

    with start_echo(echo_guest.ns, GUEST_IP, tmp_path / "echo.json",
                    ready_timeout_s=60) as session:
        time.sleep(3)
        report = session.stop()

    assert report.udp_replies > 0, report
    assert report.tcp_connected and not report.tcp_broken, report
    assert report.tcp_bytes_sent > 0, report
    assert report.tcp_bytes_echoed == report.tcp_bytes_sent, report
    # The probe kept running beside echod, its memory intact.
    deadline = time.monotonic() + 30
    after = heartbeats(echo_guest.lines())
    while len(after) <= len(before) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = heartbeats(echo_guest.lines())
    assert len(after) > len(before), "no probe heartbeat during the echo run"
    assert all(hb.mem_errors == 0 for hb in after), after[-1]
