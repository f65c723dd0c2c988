"""Storage vMotion in the lab: live disk moves with the probe writing, conversions, a full
datastore, cancel, and migration without shared storage."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import probe_spec
from ferry.domain.errors import Incompatible
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    assert_intact,
    follow,
    next_mac,
    qemu_hosts,
    remove_vm,
    wait_until,
)

MIB = 1 << 20


def ds_path(lab: LabConfig, datastore: str) -> Path:
    if datastore == "shared":
        return lab.shared_datastore
    if datastore == "small":
        return lab.small_datastore
    return lab.local_datastore(datastore.removeprefix("local-"))


def boot_disk_probe(client: Client, lab: LabConfig, name: str, host: str, datastore: str,
                    fmt: str = "qcow2", size_mib: int = 96, disk_mib: int = 32,
                    rate: int = 2) -> dict[str, Any]:
    """A probe VM whose disk `root` lives on `datastore`; returns its first full-pass beat."""
    rel = f"{name}/root.{fmt}"
    image = ds_path(lab, datastore) / rel
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), f"{size_mib}M"],
                   check=True)
    spec = probe_spec(lab, name, 192, 16, 0, mac=next_mac())
    spec["kernel"]["append"] += (f" ferry.disk=/dev/vda ferry.disk_mib={disk_mib} "
                                 f"ferry.disk_mib_s={rate}")
    spec["disks"] = [{"name": "root", "datastore": datastore, "path": rel, "format": fmt}]
    client.call("POST", "/v1/vms", {"spec": spec, "host": host})
    return wait_disk_pass(client, name, after=0)


def wait_disk_pass(client: Client, vm: str, after: int, timeout_s: float = 120
                   ) -> dict[str, Any]:
    """The first heartbeat reporting more than `after` full verify passes of the disk."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hb = (client.call("GET", f"/v1/vms/{vm}").get("live") or {}).get("heartbeat")
        if hb and hb["disk_passes"] > after:
            assert hb["disk_errors"] == 0 and hb["mem_errors"] == 0, hb
            return dict(hb)
        time.sleep(0.5)
    raise AssertionError(f"{vm}: no full disk verify pass past {after} in {timeout_s} s")


def live_disk_file(client: Client, vm: str) -> str:
    """Which file QEMU itself says the disk `root` uses (query-block, via the agent)."""
    return str(client.call("GET", f"/v1/vms/{vm}/disk-files")["root"])


def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def relocate(client: Client, vm: str, **body: Any) -> dict[str, Any]:
    rec = client.call("POST", "/v1/relocations", {"vm": vm, **body})
    return follow_relocation(client, rec["id"])


def assert_disk_intact(client: Client, lab: LabConfig, vm: str, host: str,
                       before: dict[str, Any]) -> None:
    assert_intact(client, vm, host, lab, before)
    # a full verify pass that began after the move, clean
    wait_disk_pass(client, vm, after=before["disk_passes"] + 1)


def test_relocate_qcow2_to_thick_raw_while_writing(client: Client, lab: LabConfig) -> None:
    before = boot_disk_probe(client, lab, "sv1", "host1", "shared", rate=4)
    old = lab.shared_datastore / "sv1" / "root.qcow2"
    try:
        rec = relocate(client, "sv1", datastore="local-host1", format="raw",
                       provisioning="thick")
        assert rec["phase"] == "completed", rec["reason"]
        new = lab.local_datastore("host1") / "sv1" / "root.raw"
        assert live_disk_file(client, "sv1") == str(new)
        view = client.call("GET", "/v1/vms/sv1")
        assert view["spec"]["disks"][0] == {"name": "root", "datastore": "local-host1",
                                            "path": "sv1/root.raw", "format": "raw",
                                            "provisioning": "thick", "cache": "none"}
        info = image_info(new)
        assert info["format"] == "raw" and info["actual-size"] >= info["virtual-size"]
        assert not old.exists()
        assert_disk_intact(client, lab, "sv1", "host1", before)
    finally:
        remove_vm(client, "sv1")


def test_relocate_raw_to_thin_qcow2_keeping_the_source(client: Client, lab: LabConfig
                                                       ) -> None:
    before = boot_disk_probe(client, lab, "sv2", "host2", "shared", fmt="raw", size_mib=128)
    old = lab.shared_datastore / "sv2" / "root.raw"
    try:
        rec = relocate(client, "sv2", datastore="local-host2", format="qcow2",
                       provisioning="thin", keep_source=True)
        assert rec["phase"] == "completed", rec["reason"]
        new = lab.local_datastore("host2") / "sv2" / "root.qcow2"
        assert live_disk_file(client, "sv2") == str(new)
        info = image_info(new)
        assert info["format"] == "qcow2" and info["actual-size"] < info["virtual-size"]
        assert old.exists()  # kept, as asked
        assert_disk_intact(client, lab, "sv2", "host2", before)
    finally:
        remove_vm(client, "sv2")
        old.unlink(missing_ok=True)


def test_full_datastore_refused_or_failing_mid_copy_leaves_the_vm_alone(
        client: Client, lab: LabConfig) -> None:
    before = boot_disk_probe(client, lab, "sv3", "host3", "shared", fmt="raw",
                             size_mib=128, disk_mib=48, rate=2)
    source = lab.shared_datastore / "sv3" / "root.raw"
    filler = lab.small_datastore / "filler"
    try:
        # thick needs the whole 128 MiB: refused before anything is created
        with pytest.raises(Incompatible, match="MiB free"):
            client.call("POST", "/v1/relocations", {"vm": "sv3", "datastore": "small",
                                                    "provisioning": "thick"})
        assert not (lab.small_datastore / "sv3").exists() or \
            not any((lab.small_datastore / "sv3").iterdir())
        # thin fits at the check (48 MiB written); the datastore fills up during the copy
        rec = client.call("POST", "/v1/relocations", {
            "vm": "sv3", "datastore": "small", "bandwidth_bytes_s": 4 * MIB})

        def fill() -> None:
            time.sleep(2)
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=40"],
                           capture_output=True)
        filling = threading.Thread(target=fill)
        filling.start()
        done = follow_relocation(client, rec["id"])
        filling.join()
        assert done["phase"] == "failed", done
        assert not (lab.small_datastore / "sv3" / "root.raw").exists()
        assert live_disk_file(client, "sv3") == str(source)
        assert client.call("GET", "/v1/vms/sv3")["spec"]["disks"][0]["datastore"] == "shared"
        assert_disk_intact(client, lab, "sv3", "host3", before)
    finally:
        filler.unlink(missing_ok=True)
        remove_vm(client, "sv3")


def follow_relocation(client: Client, relocation_id: str) -> dict[str, Any]:
    done: dict[str, Any] = {}
    for event in client.events(f"/v1/relocations/{relocation_id}/events"):
        done = event
    return done


def test_cancel_relocation(client: Client, lab: LabConfig) -> None:
    before = boot_disk_probe(client, lab, "sv4", "host1", "shared", disk_mib=48)
    try:
        rec = client.call("POST", "/v1/relocations", {
            "vm": "sv4", "datastore": "local-host1", "bandwidth_bytes_s": 2 * MIB})
        wait_until(lambda: client.call("GET", f"/v1/relocations/{rec['id']}")["phase"]
                   == "copying", 30, "copy under way")
        client.call("POST", f"/v1/relocations/{rec['id']}/cancel")
        done = follow_relocation(client, rec["id"])
        assert done["phase"] == "failed" and "cancelled" in done["reason"]
        assert not (lab.local_datastore("host1") / "sv4" / "root.qcow2").exists()
        assert live_disk_file(client, "sv4").endswith("shared/sv4/root.qcow2")
        assert_disk_intact(client, lab, "sv4", "host1", before)
    finally:
        remove_vm(client, "sv4")


def test_copy_that_cannot_keep_up_with_the_guest_gives_up_cleanly(
        client: Client, lab: LabConfig) -> None:
    # 1 MiB/s of copy against 4 MiB/s of random guest writes: the copy never gets in
    # sync, so it must end FAILED after its progress timeout with the VM untouched.
    before = boot_disk_probe(client, lab, "sv6", "host2", "shared", disk_mib=32, rate=4)
    try:
        rec = relocate(client, "sv6", datastore="local-host2", bandwidth_bytes_s=MIB,
                       progress_timeout_s=8)
        assert rec["phase"] == "failed", rec
        assert "has not gained on the guest's writes for 8 s" in rec["reason"]
        assert not (lab.local_datastore("host2") / "sv6" / "root.qcow2").exists()
        assert live_disk_file(client, "sv6").endswith("shared/sv6/root.qcow2")
        assert_disk_intact(client, lab, "sv6", "host2", before)
    finally:
        remove_vm(client, "sv6")


def test_migration_without_shared_storage(client: Client, lab: LabConfig) -> None:
    before = boot_disk_probe(client, lab, "sv5", "host1", "local-host1", rate=4)
    old = lab.local_datastore("host1") / "sv5" / "root.qcow2"
    try:
        with pytest.raises(Incompatible, match="does not see datastore local-host1"):
            client.call("POST", "/v1/migrations", {"vm": "sv5", "target": "host2"})
        rec = client.call("POST", "/v1/migrations", {"vm": "sv5", "target": "host2",
                                                    "datastore": "local-host2"})
        rec = follow(client, rec["id"])
        assert rec["phase"] == "completed", rec["reason"]
        assert rec["disk_total_bytes"] > 0
        new = lab.local_datastore("host2") / "sv5" / "root.qcow2"
        assert live_disk_file(client, "sv5") == str(new)
        assert qemu_hosts(lab, "sv5") == ["host2"]
        assert not old.exists()
        assert_disk_intact(client, lab, "sv5", "host2", before)
        # back in cleartext: the NBD server and the stream listen on ports that admit
        # the source host only (agent/stream_filter.py), and both still work
        rec = client.call("POST", "/v1/migrations", {
            "vm": "sv5", "target": "host1", "datastore": "local-host1",
            "options": {"encryption": "disabled"}})
        rec = follow(client, rec["id"])
        assert rec["phase"] == "completed", rec["reason"]
        assert rec["encrypted"] is False
        assert qemu_hosts(lab, "sv5") == ["host1"]
        assert_disk_intact(client, lab, "sv5", "host1", before)
    finally:
        remove_vm(client, "sv5")


def test_migrating_onto_the_datastore_the_disk_already_uses(client: Client, lab: LabConfig
                                                            ) -> None:
    """Issue 9 defect 1: `--datastore shared` for a disk on shared is a memory-only move;
    it used to fail and its rollback deleted the running VM's disk."""
    before = boot_disk_probe(client, lab, "sv7", "host1", "shared", rate=2)
    image = lab.shared_datastore / "sv7" / "root.qcow2"
    try:
        check = client.call("POST", "/v1/migrations/check",
                            {"vm": "sv7", "target": "host2", "datastore": "shared"})
        assert check["ok"], check
        rec = client.call("POST", "/v1/migrations",
                          {"vm": "sv7", "target": "host2", "datastore": "shared"})
        rec = follow(client, rec["id"])
        assert rec["phase"] == "completed", rec["reason"]
        assert rec["target_disks"] == [] and rec["created_images"] == []
        assert image.exists() and live_disk_file(client, "sv7") == str(image)
        assert_disk_intact(client, lab, "sv7", "host2", before)
    finally:
        remove_vm(client, "sv7")


def test_checking_refuses_a_target_image_that_exists(client: Client, lab: LabConfig) -> None:
    before = boot_disk_probe(client, lab, "sv8", "host1", "local-host1", rate=2)
    theirs = lab.local_datastore("host2") / "sv8" / "root.qcow2"
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(b"not Ferry's")
    try:
        with pytest.raises(Incompatible, match=re.escape(
                "local-host2:sv8/root.qcow2 on host host2 already exists")):
            client.call("POST", "/v1/migrations",
                        {"vm": "sv8", "target": "host2", "datastore": "local-host2"})
        assert theirs.read_bytes() == b"not Ferry's"
        assert (lab.local_datastore("host1") / "sv8" / "root.qcow2").exists()
        assert_intact(client, "sv8", "host1", lab, before)
    finally:
        remove_vm(client, "sv8")
        theirs.unlink(missing_ok=True)
