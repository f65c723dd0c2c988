"""What the integration tests do again and again: probe VMs, migrations, process checks."""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import httpx

from ferry.agent.faults import FaultRecord, fired_faults
from ferry.cli.client import Client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.errors import NotFound
from ferry.domain.probe import Heartbeat, judge_intact
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from ferry.lab.watch import heartbeats_from_now
from ferry.pki import ControlPki
from ferry.pki.layout import client_context

_macs = itertools.count(0x10)


def next_mac() -> str:
    n = next(_macs)
    return f"52:54:00:7e:{n >> 8:02x}:{n & 0xFF:02x}"


def boot_probe(client: Client, lab: LabConfig, name: str, host: str, dirty: int = 0,
               memory: int = 192, probe_mib: int = 64) -> dict[str, Any]:
    """Create a probe VM on `host` and return its first heartbeat."""
    spec = probe_spec(lab, name, memory, probe_mib, dirty, mac=next_mac())
    client.call("POST", "/v1/vms", {"spec": spec, "host": host})
    return wait_heartbeat(client, name, timeout_s=120)


def remove_vm(client: Client, name: str) -> None:
    try:
        client.call("POST", f"/v1/vms/{name}/stop", force=True)
        client.call("DELETE", f"/v1/vms/{name}")
    except NotFound:
        pass


def qemu_hosts(lab: LabConfig, vm: str) -> list[str]:
    """The lab hosts on which a QEMU process for `vm` exists right now."""
    found = []
    for pid, _ in cluster.processes_of(lab.directory):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmd[0].endswith(b"qemu-system-x86_64") or f"guest={vm},".encode() not in \
                b" ".join(cmd):
            continue
        for host in lab.hosts:
            if str(lab.host_dir(host.name)).encode() + b"/" in b" ".join(cmd):
                found.append(host.name)
    return sorted(found)


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def follow(client: Client, migration_id: str) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for event in client.events(f"/v1/migrations/{migration_id}/events"):
        rec = event
    return rec


def wait_phase(client: Client, migration_id: str, phase: str, timeout_s: float = 60
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec: dict[str, Any] = client.call("GET", f"/v1/migrations/{migration_id}")
        if rec["phase"] == phase:
            return rec
        assert rec["phase"] not in ("completed", "failed"), rec
        time.sleep(0.1)
    raise AssertionError(f"migration {migration_id} never reached {phase}")


def assert_intact(client: Client, vm: str, host: str, lab: LabConfig,
                  before: dict[str, Any]) -> dict[str, Any]:
    """The VM runs once, on `host`, as the same probe run as the heartbeat `before`
    (taken before the migration or fault), and a full memory pass that began after this
    call found no error (see ferry.domain.probe.judge_intact). Returns the last beat."""
    view = client.call("GET", f"/v1/vms/{vm}")
    assert view["host"] == host and view["state"] == "running", view
    # A migration can report completed while the source's paused QEMU is still exiting;
    # that QEMU never executing again is the watcher's job (conftest.py), its going away
    # is checked here.
    wait_until(lambda: qemu_hosts(lab, vm) == [host], 30, f"{vm}'s QEMU on {host} only")
    after = heartbeats_from_now(client, vm)
    problems = judge_intact(Heartbeat.model_validate(before), after)
    assert not problems, (vm, problems, before, after[-3:])
    assert qemu_hosts(lab, vm) == [host]
    return after[-1].model_dump()


def slow_options(bandwidth_mib_s: int = 4) -> dict[str, int]:
    """Stream options that keep pre-copy going for many seconds (time to break things)."""
    return {"max_bandwidth_bytes_s": bandwidth_mib_s << 20}


# --- the fault hook (ferry/agent/faults.py; the test lab has fault_hooks on) ----------
def agent_call(lab: LabConfig, host: str, method: str, path: str,
               body: dict[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
    """Call a host's agent directly with the control plane's certificate (as only the
    control plane may); raises on an HTTP error."""
    pki = ControlPki(lab.pki_dir)
    with httpx.Client(base_url=lab.agent_url(host), trust_env=False, timeout=timeout_s,
                      verify=client_context(pki.ca_cert, pki.cert, pki.key)) as http:
        resp = http.request(method, path, json=body)
    resp.raise_for_status()
    return resp.json() if resp.content else None


def arm_fault(lab: LabConfig, host: str, vm: str, stage: str, action: str,
              **extra: Any) -> None:
    """Arm a one-shot fault on `host`'s agent for `vm` (see FaultRequest)."""
    agent_call(lab, host, "POST", "/v1/faults",
               {"vm": vm, "stage": stage, "action": action, **extra})


def disarm_faults(lab: LabConfig, host: str) -> None:
    with contextlib.suppress(Exception):  # an agent that is down holds no armed fault
        agent_call(lab, host, "DELETE", "/v1/faults")


def fired_since(lab: LabConfig, host: str, vm: str, since: float) -> list[FaultRecord]:
    """The faults `host`'s agent logged as fired for `vm` after `since` (time.time())."""
    log = lab.host_dir(host) / "run" / "faults.log"
    return [r for r in fired_faults(log) if r.request.vm == vm
            and r.fired_at is not None and r.fired_at >= since]


def agent_pid(lab: LabConfig, host: str) -> int | None:
    try:
        pid = int((lab.directory / "run" / f"agent-{host}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() and not _zombie(pid) else None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def hosts_connected(client: Client) -> bool:
    try:
        return all(h["state"] == "connected" for h in client.call("GET", "/v1/hosts"))
    except Exception:
        return False


def restart_dead_agent(client: Client, lab: LabConfig, host: str) -> None:
    """Start `host`'s agent again once it is gone (it adopts its QEMUs), and wait until
    every host is connected."""
    wait_until(lambda: agent_pid(lab, host) is None, 30, f"{host}'s agent gone")
    cluster.start_agent(lab, host)
    wait_until(lambda: agent_answers(lab, host), 90, f"{host}'s agent back")
    # a dead agent's host still counts as connected for a few seconds: ask the agents
    wait_until(lambda: hosts_connected(client), 90, "every host connected")


def agent_answers(lab: LabConfig, host: str) -> bool:
    try:
        agent_call(lab, host, "GET", "/v1/facts", timeout_s=3.0)
    except Exception:
        return False
    return True
