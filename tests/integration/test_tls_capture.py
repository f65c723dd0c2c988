"""What a wiretap on the lab bridge sees of a migration: with TLS (the default) none of
the guest's memory, with encryption disabled the probe's page pattern in the clear."""

from __future__ import annotations

import socket
import threading

from ferry.cli.client import Client
from ferry.lab.config import LabConfig
from tests.integration.helpers import assert_intact, boot_probe, follow, remove_vm

ETH_P_ALL = 0x0003
PROBE_PAGES = 256  # look for these pages of the probe's buffer (generation 0)
MASK = (1 << 64) - 1


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    x ^= x >> 31
    return x


def probe_words(page: int) -> bytes:
    """Words 1-3 of a never-rewritten probe page, as guest/probe.c fills it."""
    seed = _mix64(((page << 32) | 0) ^ 0x46455252595052)
    step = 0x9E3779B97F4A7C15
    return b"".join(((seed + i * step) & MASK).to_bytes(8, "little") for i in (1, 2, 3))


class Tap:
    """Every frame crossing one interface, read with an AF_PACKET socket."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65536))
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return b"\x00".join(self.frames)


def captured_pages(lab: LabConfig, client: Client, vm: str, encryption: str) -> int:
    """Migrate `vm` host1 → host2 while tapping host1's link; how many probe pages were
    seen in the clear."""
    hb = boot_probe(client, lab, vm, "host1", memory=128, probe_mib=16)
    tap = Tap(lab.veth("host1"))
    try:
        rec = client.call("POST", "/v1/migrations", {
            "vm": vm, "target": "host2",
            "options": {"encryption": encryption, "max_bandwidth_bytes_s": 40 << 20}})
        done = follow(client, rec["id"])
    finally:
        wire = tap.stop()
    assert done["phase"] == "completed", done
    assert done["encrypted"] is (encryption != "disabled"), done
    assert_intact(client, vm, "host2", lab, hb)
    assert len(wire) > 64 << 20, f"the tap saw only {len(wire)} bytes"
    return sum(1 for page in range(PROBE_PAGES) if probe_words(page) in wire)


def test_tls_migration_shows_no_guest_memory_on_the_wire(lab: LabConfig,
                                                         client: Client) -> None:
    try:
        clear = captured_pages(lab, client, "cap-clear", "disabled")
        sealed = captured_pages(lab, client, "cap-tls", "required")
    finally:
        remove_vm(client, "cap-clear")
        remove_vm(client, "cap-tls")
    assert clear > PROBE_PAGES // 4, f"cleartext capture found only {clear} probe pages"
    assert sealed == 0, f"{sealed} probe pages readable in an encrypted migration"
