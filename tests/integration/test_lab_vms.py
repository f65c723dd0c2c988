"""The foundation in a real lab: hosts register, probe VMs boot, bad input is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.errors import Conflict, Incompatible, InvalidInput, NoCapacity, NotFound
from ferry.lab.config import LabConfig
from tests.integration.helpers import boot_probe, next_mac, qemu_hosts, remove_vm


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry.cli.main", *args],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def test_hosts_register_with_declared_capacity(client: Client, lab: LabConfig) -> None:
    hosts = client.call("GET", "/v1/hosts")
    assert [h["name"] for h in hosts] == ["host1", "host2", "host3"]
    for h in hosts:
        assert h["state"] == "connected"
        assert h["facts"]["accel"] == "tcg"
        assert (h["facts"]["cpus"], h["facts"]["memory_mib"]) == (4, 2048)
        assert "Nehalem" in h["facts"]["cpu_models"]
        names = {d["name"] for d in h["facts"]["datastores"]}
        assert names == {"shared", "small", f"local-{h['name']}"}
    out = ferry("host", "list")
    assert out.returncode == 0 and "host3" in out.stdout and "2048" in out.stdout


def test_probe_vm_boots_and_heartbeats_through_the_agent(client: Client,
                                                         lab: LabConfig) -> None:
    first = boot_probe(client, lab, "life1", "host2", dirty=10)
    try:
        assert qemu_hosts(lab, "life1") == ["host2"]
        later = wait_heartbeat(client, "life1", after_seq=first["seq"] + 1)
        assert later["pages_written"] > first["pages_written"]
        assert later["mem_errors"] == 0
        view = client.call("GET", "/v1/vms/life1")
        assert view["spec"]["machine"] == "pc-i440fx-7.2"  # alias pinned at create
        assert view["live"]["state"] == "running"
        out = ferry("vm", "show", "life1")
        assert out.returncode == 0 and "seq=" in out.stdout
        client.call("POST", "/v1/vms/life1/stop", force=True)
        assert qemu_hosts(lab, "life1") == []
        assert client.call("GET", "/v1/vms/life1")["state"] == "defined"
        client.call("POST", "/v1/vms/life1/start")
        wait_heartbeat(client, "life1")
    finally:
        remove_vm(client, "life1")
    with pytest.raises(NotFound):
        client.call("GET", "/v1/vms/life1")


def count_vms(client: Client) -> int:
    return len(client.call("GET", "/v1/vms"))


def test_bad_input_is_refused_and_creates_nothing(client: Client, lab: LabConfig) -> None:
    before = count_vms(client)
    good = probe_spec(lab, "bad1", 192, 64, 0, mac=next_mac())
    with pytest.raises(NotFound, match="no host 'host9'"):
        client.call("POST", "/v1/vms", {"spec": good, "host": "host9"})
    with pytest.raises(NoCapacity, match="largest host has 2048 MiB"):
        client.call("POST", "/v1/vms", {"spec": {**good, "memory_mib": 4096}})
    with pytest.raises(InvalidInput, match="escapes its datastore"):
        client.call("POST", "/v1/vms", {"spec": {**good, "disks": [
            {"name": "root", "datastore": "shared", "path": "../../etc/passwd"}]}})
    with pytest.raises(InvalidInput, match="MAC address"):
        client.call("POST", "/v1/vms", {"spec": {**good, "nics": [
            {"name": "nic0", "network": "vmnet", "mac": "nonsense"}]}})
    with pytest.raises(Incompatible, match="does not see datastore local-host1"):
        client.call("POST", "/v1/vms", {"host": "host2", "spec": {**good, "disks": [
            {"name": "root", "datastore": "local-host1", "path": "x.qcow2"}]}})
    with pytest.raises(InvalidInput, match="not inside a datastore"):
        client.call("POST", "/v1/vms", {"host": "host1", "spec": {
            **good, "kernel": {"kernel": "/nonexistent/vmlinuz"}}})
    with pytest.raises(InvalidInput, match="cannot read boot file"):
        client.call("POST", "/v1/vms", {"host": "host1", "spec": {
            **good, "kernel": {"kernel": str(lab.images_dir / "missing-vmlinuz")}}})
    assert count_vms(client) == before
    # the CLI: exit code != 0, the problem and the fix on stderr
    out = ferry("vm", "create", "bad2", "--probe", "--memory", "lots")
    assert out.returncode != 0 and "size 'lots'" in out.stderr and "fix:" in out.stderr
    out = ferry("vm", "create", "Bad_Name", "--probe")
    assert out.returncode != 0 and "name" in out.stderr
    out = ferry("vm", "show", "ghost")
    assert out.returncode == 1 and "no VM 'ghost'" in out.stderr
    assert count_vms(client) == before


def test_duplicate_name_is_refused(client: Client, lab: LabConfig) -> None:
    boot_probe(client, lab, "dup1", "host1")
    try:
        with pytest.raises(Conflict, match="already exists"):
            client.call("POST", "/v1/vms", {"spec": probe_spec(lab, "dup1", 192, 64, 0,
                                                               mac=next_mac())})
        assert qemu_hosts(lab, "dup1") == ["host1"]
    finally:
        remove_vm(client, "dup1")
