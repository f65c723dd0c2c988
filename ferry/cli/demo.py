"""`ferry lab demo`: a 3-host lab, a probe VM on host1, live-migrated host1 → host2 → host3."""

from __future__ import annotations

import time
from typing import Any

from ferry.cli.client import Client, lab_client
from ferry.cli.output import console, heartbeat_text, mib, table
from ferry.domain.errors import FerryError, NotFound
from ferry.domain.migration import Phase
from ferry.lab import cluster
from ferry.lab.config import NETWORK, LabConfig
from ferry.lab.watch import watched_migration

DEMO_VM = "demo1"


def wait_heartbeat(client: Client, vm: str, after_seq: int = 0, timeout_s: float = 90.0
                   ) -> dict[str, Any]:
    """The VM's latest probe heartbeat once its counter passes after_seq."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = client.call("GET", f"/v1/vms/{vm}").get("live") or {}
        hb = live.get("heartbeat")
        if hb and hb["seq"] > after_seq:
            return dict(hb)
        time.sleep(0.5)
    raise FerryError(f"VM {vm} printed no probe heartbeat past {after_seq} within "
                     f"{timeout_s:.0f} s", f"see `ferry vm serial {vm}`")


def probe_spec(config: LabConfig, name: str, memory_mib: int, probe_mib: int,
               dirty_mib_s: int, mac: str = "52:54:00:de:00:01", ip: str | None = None,
               network: str = NETWORK) -> dict[str, Any]:
    """A probe VM on the lab's VM network; with `ip` it has that address there and
    answers UDP and TCP echo on port 7 (guest/echod.c)."""
    address = f" ip={ip}/{config.vm_subnet.prefixlen}" if ip else ""
    return {
        "name": name, "memory_mib": memory_mib, "vcpus": 1, "cpu_model": "Nehalem",
        "kernel": {"kernel": str(config.images_dir / "vmlinuz"),
                   "initrd": str(config.images_dir / "initrd.img"),
                   "append": f"console=ttyS0 quiet panic=-1 ferry.probe_mib={probe_mib} "
                             f"ferry.dirty_mib_s={dirty_mib_s}{address}"},
        "nics": [{"name": "nic0", "network": network, "mac": mac}],
    }


def run_demo(config: LabConfig) -> None:
    began = time.monotonic()
    st = cluster.up(config)
    if not cluster.install_guest_image(config):
        raise FerryError(f"no guest image in {cluster.GUEST_DIR}", "run `make guest`")
    console.print(f"lab up in {time.monotonic() - began:.1f} s")
    if st.new_admin_token:
        console.print(f"admin token (kept 0600 in {config.admin_token_file}, where the CLI "
                      "finds it):")
        console.print(st.new_admin_token, markup=False, highlight=False)
    client = lab_client(config, timeout_s=120)
    try:
        client.call("POST", f"/v1/vms/{DEMO_VM}/stop", force=True)
        client.call("DELETE", f"/v1/vms/{DEMO_VM}")
    except NotFound:
        pass
    hosts = client.call("GET", "/v1/hosts")
    table("Cluster", ["host", "state", "address", "accel", "CPUs", "MiB", "QEMU"],
          [[h["name"], h["state"], h["facts"]["address"], h["facts"]["accel"],
            h["facts"]["cpus"], h["facts"]["memory_mib"], h["facts"]["qemu_version"]]
           for h in hosts])
    t0 = time.monotonic()
    client.call("POST", "/v1/vms", {"spec": probe_spec(config, DEMO_VM, 256, 128, 20,
                                                       ip=config.vm_ip(0)),
                                    "host": "host1"})
    hb = wait_heartbeat(client, DEMO_VM)
    console.print(f"VM {DEMO_VM} booted on host1, first probe heartbeat after "
                  f"{time.monotonic() - t0:.1f} s; it answers echo at {config.vm_ip(0)} on "
                  f"the lab's VM network, where the client machine ({config.client_ns}) "
                  "watches each migration")
    vms = client.call("GET", "/v1/vms")
    table("VMs", ["VM", "host", "state", "MiB", "CPU model", "machine", "heartbeat"],
          [[v["spec"]["name"], v["host"], v["state"], v["spec"]["memory_mib"],
            v["spec"]["cpu_model"], v["spec"]["machine"], heartbeat_text(hb)] for v in vms])
    rows = []
    for target in ("host2", "host3"):
        before = wait_heartbeat(client, DEMO_VM)
        rec, seen = watched_migration(client, config, DEMO_VM, target)
        if rec["phase"] != Phase.COMPLETED:
            raise FerryError(f"migration to {target} failed: {rec['reason']}")
        after = wait_heartbeat(client, DEMO_VM, after_seq=before["seq"] + 1)
        # The migration's own time, as `ferry migration show` gives it (the watch
        # around it also waits for the echo client to start and settle).
        times = rec["phase_times"]
        took = times[Phase.COMPLETED] - times[Phase.PENDING]
        rows.append([f"{rec['source']} → {target}", f"{took:.2f}", rec["downtime_ms"],
                     f"{seen.max_gap_ms:.0f}",
                     "intact" if not seen.tcp_broken else "BROKEN",
                     len(rec["iterations"]), mib(rec["transferred_bytes"]), before["seq"],
                     after["seq"], after["mem_errors"] + after["disk_errors"]])
    table("Live migrations of demo1 (probe: 128 MiB checked, rewriting 20 MiB/s)",
          ["hop", "migration s", "downtime ms (QEMU)", "client gap ms", "TCP", "passes",
           "MiB sent", "heartbeat before", "heartbeat after", "integrity errors"], rows)
    console.print("the lab keeps running: try `ferry vm list`; `ferry lab down` removes it")
