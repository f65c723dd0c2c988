"""A live migration watched from the lab's client machine: the echo client
(ferry/lab/echo.py) runs in the client namespace against the VM's address on the lab's
VM network throughout the migration; what it saw is recorded on the migration record
(`client_view`) and returned with it."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.cli.client import Client
from ferry.domain.errors import InvalidInput
from ferry.domain.probe import Heartbeat, full_pass_after
from ferry.lab.config import LabConfig
from ferry.lab.echo import EchoReport, start_echo


def vm_address(client: Client, vm: str) -> str:
    """The VM's static address from its kernel `ip=` argument (the probe guest's)."""
    spec = client.call("GET", f"/v1/vms/{vm}")["spec"]
    append = (spec.get("kernel") or {}).get("append", "")
    for arg in append.split():
        if arg.startswith("ip="):
            address = arg[3:].split(":")[0].split("/")[0]
            if address:
                return str(address)
    raise InvalidInput(f"VM {vm} has no static address (no ip= on its kernel command line)",
                       "create it with `ferry vm create --probe --ip ADDRESS`")


def follow(client: Client, migration_id: str) -> dict[str, Any]:
    rec: dict[str, Any] = client.call("GET", f"/v1/migrations/{migration_id}")
    for event in client.events(f"/v1/migrations/{migration_id}/events"):
        rec = event
    return rec


def watched_migration(client: Client, lab: LabConfig, vm: str, target: str, *,
                      tcp: bool = True, settle_s: float = 0.0, **request: Any
                      ) -> tuple[dict[str, Any], EchoReport]:
    """Migrate `vm` to `target` with the client's echo running; record its view.
    `request` adds fields of the migration request (options, datastore, ...); without
    `tcp` the client sends UDP echo requests only; it keeps asking `settle_s` after the
    migration ended (a gap still open then is counted up to the end)."""
    address = vm_address(client, vm)
    announce = bool((request.get("options") or {}).get("announce", True))
    with (tempfile.TemporaryDirectory(prefix="ferry-echo-") as tmp,
          start_echo(lab.client_ns, address, Path(tmp) / "echo.json", tcp=tcp) as session):
        rec = client.call("POST", "/v1/migrations", {"vm": vm, "target": target, **request})
        rec = follow(client, rec["id"])
        time.sleep(settle_s)
        report = session.stop()
    view = {"gap_ms": round(report.max_gap_ms, 1),
            "tcp_survived": (report.tcp_connected and not report.tcp_broken
                             if report.tcp_used else None),
            "udp_lost": report.udp_lost, "announce": announce}
    rec = client.call("PUT", f"/v1/migrations/{rec['id']}/client-view", view)
    return rec, report


def current_heartbeat(client: Client, vm: str) -> Heartbeat | None:
    """The latest heartbeat in the serial log of the VM's QEMU, read now by its agent."""
    hb = (client.call("GET", f"/v1/vms/{vm}").get("live") or {}).get("heartbeat")
    return Heartbeat.model_validate(hb) if hb else None


def heartbeats_from_now(client: Client, vm: str, timeout_s: float = 120
                        ) -> list[Heartbeat]:
    """The distinct heartbeats the VM prints from now on, the first one printed after
    this call began, until a full memory pass that began after that first one completed
    (or timeout_s passed: the caller's judgement then says what is missing)."""
    seen = current_heartbeat(client, vm)
    after: list[Heartbeat] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not full_pass_after(after):
        time.sleep(0.5)
        hb = current_heartbeat(client, vm)
        if hb is not None and hb != seen:
            after.append(hb)
            seen = hb
    return after
