"""Bad migration streams (issue 9, "Bad input, fuzzed"): a destination fed a garbage or
truncated stream fails and says so, and a migration whose stream is corrupted mid-way
ends in a clean rollback, the VM intact where it was.

(The destination QEMU killed mid-stream is test_migration_failures.py's
test_destination_qemu_killed_during_precopy.)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ferry.cli.client import Client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.streams import migration_endpoint
from ferry.lab.config import LabConfig
from ferry.pki import ControlPki
from ferry.pki.layout import client_context
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    follow,
    next_mac,
    qemu_hosts,
    remove_vm,
    slow_options,
    wait_phase,
    wait_until,
)

# A stream that is not QEMU's at all, and QEMU's own header cut off where the first
# section (the machine configuration) begins.
STREAMS = {
    "garbage": bytes(range(256)) * 64,
    "truncated": b"QEVM" + struct.pack(">I", 3) + b"\x07\x00\x00\x00",
}


def _agent(lab: LabConfig, host: str) -> httpx.Client:
    pki = ControlPki(lab.pki_dir)
    return httpx.Client(base_url=lab.agent_url(host), trust_env=False, timeout=60,
                        verify=client_context(pki.ca_cert, pki.cert, pki.key))


@pytest.fixture
def bystander(lab: LabConfig, client: Client) -> Iterator[dict[str, Any]]:
    """Another VM on the same host, whose heartbeat before is returned."""
    boot_probe(client, lab, "bs-by", "host1", memory=128, probe_mib=16)
    try:
        yield wait_heartbeat(client, "bs-by")
    finally:
        remove_vm(client, "bs-by")


@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_incoming_vm_fed_a_bad_stream_fails_and_is_reported(
        lab: LabConfig, client: Client, bystander: dict[str, Any], stream: str) -> None:
    """An incoming VM prepared as a migration would (cleartext: no tls_peer), sent bad
    bytes on its migration port from outside: its QEMU exits with an error, the agent
    reports it exited (the next call answers, nothing hangs), and the VM next to it
    runs on untouched."""
    name = f"bs-in-{stream}"
    spec = probe_spec(lab, name, 128, 16, 0, mac=next_mac())
    body = {"migration_id": f"bs{stream}01", "spec": spec, "tls_peer": None}
    with _agent(lab, "host1") as agent:
        resp = agent.post("/v1/incoming", json=body)
        assert resp.status_code == 200, resp.text
        try:
            assert agent.get(f"/v1/vms/{name}").json()["state"] == "incoming"
            address, port = migration_endpoint(resp.json()["uri"])
            with socket.create_connection((address, port), timeout=30) as conn:
                conn.sendall(STREAMS[stream])
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(30)
                with contextlib.suppress(ConnectionResetError):  # QEMU gave up: unread
                    while conn.recv(4096):  # bytes in its buffer make its close a reset
                        pass

            def exited() -> bool:
                return bool(agent.get(f"/v1/vms/{name}").json()["state"] == "exited")

            wait_until(exited, 60, f"the agent to report {name}'s QEMU exited")
            info = agent.get(f"/v1/vms/{name}").json()
            assert info["exit_code"] not in (0, None), info
            assert qemu_hosts(lab, name) == []
        finally:
            agent.post(f"/v1/vms/{name}/stop", params={"force": True})
    assert_intact(client, "bs-by", "host1", lab, bystander)


# --- garbage in the middle of a running migration's stream ------------------------------
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class StreamTap:
    """The TCP stream from one lab host to another, as it enters the receiver's link:
    read with an AF_PACKET socket on the root side of that link, and written to by
    forging segments that carry the sender's addresses and the next sequence numbers
    (TCP has no defence against that; TLS and QEMU's loader are what must notice)."""

    def __init__(self, iface: str, src: str, dst: str, ignore_ports: tuple[int, ...]) -> None:
        self.src, self.dst = socket.inet_aton(src), socket.inet_aton(dst)
        self.ignore = ignore_ports
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, 0))
        self.sock.settimeout(0.2)
        self.last: tuple[bytes, bytes, int, int, int, int] | None = None
        self.injected = 0

    def close(self) -> None:
        self.sock.close()

    def watch(self, seconds: float) -> None:
        """Follow the stream for a while: remember its latest data segment."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 54 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != socket.IPPROTO_TCP or ip[12:16] != self.src or ip[16:20] != self.dst:
                continue
            tcp = ip[ihl:]
            sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
            payload = struct.unpack("!H", ip[2:4])[0] - ihl - (tcp[12] >> 4) * 4
            if payload > 0 and dport not in self.ignore:
                # (ethernet destination, source), ports, next sequence number, ack
                self.last = (frame[0:6], frame[6:12], sport, dport,
                             (seq + payload) & 0xFFFFFFFF, ack)

    def inject(self, garbage: bytes, segments: int = 16) -> None:
        """Forge `segments` segments of garbage from the next sequence number on: the
        first is taken in order, the others wait out of order and win over the real
        bytes for the same sequence numbers, which arrive later."""
        assert self.last is not None, "no data segment of the stream seen yet"
        eth_dst, eth_src, sport, dport, seq, ack = self.last
        for i in range(segments):
            tcp = struct.pack("!HHIIBBHHH", sport, dport, (seq + i * len(garbage))
                              & 0xFFFFFFFF, ack, 5 << 4, 0x18, 0xFFFF, 0, 0)
            pseudo = self.src + self.dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP,
                                                       len(tcp) + len(garbage))
            tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + garbage)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(garbage), 0,
                             0x4000, 64, socket.IPPROTO_TCP, 0, self.src, self.dst)
            ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
            self.sock.send(eth_dst + eth_src + struct.pack("!H", ETH_P_IP) + ip + tcp
                           + garbage)
            self.injected += 1


@pytest.mark.parametrize("encryption", ["required", "disabled"])
def test_garbage_mid_stream_rolls_back_with_the_vm_intact_on_the_source(
        lab: LabConfig, client: Client, encryption: str) -> None:
    """A slow migration host1 → host2 whose stream gets garbage spliced in on the way
    (after the TLS layer has started, or into QEMU's own stream when cleartext): the
    destination refuses the stream, the migration ends FAILED after a rollback, and the
    VM runs on the source as the same probe run, its memory intact. Cleartext garbage
    that lands inside a page's bytes is nothing QEMU's loader can see: then the memory
    check must find and repair it (COMPLETED with repaired pages, the guest intact on
    the destination)."""
    name = f"bs-mid-{encryption}"
    boot_probe(client, lab, name, "host1", dirty=5)
    before = wait_heartbeat(client, name)
    tap = StreamTap(lab.veth("host2"), lab.host_ip("host1"), lab.host_ip("host2"),
                    ignore_ports=(8100,))
    try:
        rec = client.call("POST", "/v1/migrations", {
            "vm": name, "target": "host2",
            "options": {**slow_options(2), "encryption": encryption}})
        wait_phase(client, rec["id"], "precopy")
        tap.watch(1.0)
        garbage = bytes(range(256)) * 5 + b"\xff" * 120  # 1400 bytes
        # Until the destination gives up: a forged segment can lose the race against a
        # real one already on its way, so splice again while pre-copy goes on.
        for _ in range(60):
            tap.inject(garbage)
            tap.watch(0.5)
            if client.call("GET", f"/v1/migrations/{rec['id']}")["phase"] != "precopy":
                break
        done = follow(client, rec["id"])
        assert tap.injected > 0
        check = done.get("memory_check") or {}
        if encryption == "disabled" and done["phase"] == "completed" and \
                check.get("repaired_pages"):
            wait_until(lambda: qemu_hosts(lab, name) == ["host2"], 60, "no QEMU on host1")
            assert_intact(client, name, "host2", lab, before)
            return
        assert done["phase"] == "failed", (done, "no spliced segment reached QEMU?")
        assert list(done["phase_times"])[-2:] == ["rolling_back", "failed"], done
        wait_until(lambda: qemu_hosts(lab, name) == ["host1"], 60, "no QEMU left on host2")
        assert_intact(client, name, "host1", lab, before)
    finally:
        tap.close()
        remove_vm(client, name)
