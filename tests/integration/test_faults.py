"""The fault matrix (issue 9): a migration broken at each stage by each fault, with the
outcome each cell must have written next to it.

Faults are injected by the agent's lab-only fault hook (ferry/agent/faults.py) at the
named stage, not by sleeps: the test arms a one-shot fault on the source's or the
destination's agent, starts the migration, waits until the agent logged the fault as
fired, restarts an agent the fault killed, follows the migration to its end and checks:

- SOURCE / DEST: the VM runs exactly once, there (every other QEMU of it gone), as the
  same probe run as before the migration, and a full memory pass after it found nothing
  (helpers.assert_intact with the heartbeat taken before);
- EITHER: the same, on whichever host the migration's end names;
- LOST: only where the guest's memory is truly gone (its only complete copy killed): the
  migration FAILED with a reason, the VM is `crashed` (not `unknown`: the engine knows),
  and no copy of it runs anywhere.

The watcher (conftest.py) fails any cell in which the guest executed on two hosts.

CI runs the cells marked `ci` (at least one per stage and one per fault kind; about
4 minutes); `make test-faults` (FERRY_FAULTS=all, -m faults) runs them all. Where a
silent agent leaves the engine unable to confirm the VM's place, the engine reports it
`unknown` and the reconciler (control/reconcile.py) settles it once the agents report
again; the cell waits for that (bounded) and judges the settled outcome.
Link cuts and control-plane restarts are in test_migration_failures.py and
test_convergence.py (the test breaks the lab itself once a phase is reached).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from ferry.agent.faults import FaultAction, FaultStage
from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from tests.integration.helpers import (
    agent_answers,
    agent_call,
    arm_fault,
    assert_intact,
    boot_probe,
    disarm_faults,
    fired_since,
    follow,
    hosts_connected,
    next_mac,
    qemu_hosts,
    remove_vm,
    restart_dead_agent,
    wait_until,
)

FULL = os.environ.get("FERRY_FAULTS") == "all"
FREEZE_S = 45.0  # past the control plane's 30 s agent timeout and 30 s confirm waits
DIRTY_MIB_S = 10


class Role(StrEnum):
    SOURCE = "src"
    TARGET = "dst"


class Outcome(StrEnum):
    SOURCE = "intact on source"
    DEST = "intact on destination"
    EITHER = "intact on source or destination"
    LOST = "lost (reported)"


class Flow(StrEnum):
    """How the migration is run, so that the stage is reached."""

    PLAIN = "plain"  # cluster defaults, unlimited bandwidth: pre-copy converges
    SLOW = "slow"  # 16 MiB/s: several pre-copy passes
    POSTCOPY = "postcopy"  # 8 MiB/s against a 10 MiB/s dirtier: post-copy at pass 2


FLOW_OPTIONS: dict[Flow, dict[str, Any]] = {
    Flow.PLAIN: {},
    Flow.SLOW: {"max_bandwidth_bytes_s": 16 << 20},
    Flow.POSTCOPY: {"max_bandwidth_bytes_s": 8 << 20, "allow_throttle": False,
                    "allow_postcopy": True, "postcopy_recovery_window_s": 90},
}

@dataclass(frozen=True)
class Cell:
    stage: FaultStage
    action: FaultAction
    on: Role
    outcome: Outcome
    flow: Flow = Flow.PLAIN
    pass_count: int = 1
    ci: bool = False

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.on}-{self.action}"


K, A, F = FaultAction.KILL_QEMU, FaultAction.KILL_AGENT, FaultAction.FREEZE
S, D = Role.SOURCE, Role.TARGET
CELLS = [
    # PREPARING_TARGET: the destination's paused QEMU listens, the agent has not answered
    Cell(FaultStage.PREPARE_INCOMING, K, D, Outcome.SOURCE, ci=True),
    Cell(FaultStage.PREPARE_INCOMING, A, D, Outcome.SOURCE),
    # (the prepare call waits up to 600 s: a frozen destination only delays it)
    Cell(FaultStage.PREPARE_INCOMING, F, D, Outcome.EITHER),
    # PRECOPY, seen from the destination (asked about the receiving VM)
    Cell(FaultStage.INCOMING_POLL, K, D, Outcome.SOURCE, Flow.SLOW, pass_count=2),
    Cell(FaultStage.INCOMING_POLL, A, D, Outcome.SOURCE, Flow.SLOW, pass_count=2),
    Cell(FaultStage.INCOMING_POLL, F, D, Outcome.SOURCE, Flow.SLOW, pass_count=2, ci=True),
    # PRECOPY entered: the source is about to `migrate`
    Cell(FaultStage.START_OUTGOING, K, S, Outcome.LOST),  # only copy
    # (the engine leaves it unknown; the reconciler resolves it once the agent is back)
    Cell(FaultStage.START_OUTGOING, A, S, Outcome.SOURCE, ci=True),
    Cell(FaultStage.START_OUTGOING, F, S, Outcome.EITHER),
    # PRECOPY, later passes
    Cell(FaultStage.PRECOPY_PASS, K, S, Outcome.LOST, Flow.SLOW, pass_count=2, ci=True),
    Cell(FaultStage.PRECOPY_PASS, A, S, Outcome.SOURCE, Flow.SLOW, pass_count=2),
    Cell(FaultStage.PRECOPY_PASS, F, S, Outcome.SOURCE, Flow.SLOW, pass_count=2),
    # SWITCHOVER: the source reports the stream completed (the destination holds it all)
    Cell(FaultStage.SOURCE_COMPLETED, K, S, Outcome.DEST, ci=True),
    # (the agent silent, the destination holding the whole stream proves the source
    # stopped: switched without it; the reaper stops the stale copy when it is back)
    Cell(FaultStage.SOURCE_COMPLETED, A, S, Outcome.DEST),
    Cell(FaultStage.SOURCE_COMPLETED, F, S, Outcome.DEST),
    # SWITCHOVER, the switch recorded: the destination before `cont`...
    # (its agent says it exited without `cont`: REVERT, the paused source resumed)
    Cell(FaultStage.RESUME, K, D, Outcome.SOURCE),
    Cell(FaultStage.RESUME, A, D, Outcome.DEST, ci=True),
    # (its agent silent: waited for up to RESUME_WINDOW_S, 120 s; then `cont` goes through)
    Cell(FaultStage.RESUME, F, D, Outcome.DEST),
    # ... and after it (the guest ran there): its death takes the only current copy
    # (LOST with the reason, recorded crashed on the target; the older source stopped)
    Cell(FaultStage.RESUMED, K, D, Outcome.LOST),
    Cell(FaultStage.RESUMED, A, D, Outcome.DEST),
    # POSTCOPY: memory split between the hosts
    Cell(FaultStage.POSTCOPY, K, S, Outcome.LOST, Flow.POSTCOPY),  # reported at once
    Cell(FaultStage.POSTCOPY, A, S, Outcome.DEST, Flow.POSTCOPY, ci=True),
    Cell(FaultStage.POSTCOPY, F, S, Outcome.DEST, Flow.POSTCOPY),
    # (post-copy, the destination killed before `cont`: the source holds the whole guest
    # but pauses the post-copy, which QEMU 7.2 cannot end: lost, saying why)
    Cell(FaultStage.RESUME, K, D, Outcome.LOST, Flow.POSTCOPY, ci=True),
]


def _param(cell: Cell) -> Any:
    marks: list[Any] = [pytest.mark.faults]
    if not cell.ci:
        marks += [pytest.mark.faults_full,
                  pytest.mark.skipif(not FULL, reason="full fault matrix: make test-faults")]
    return pytest.param(cell, id=f"{cell.id}-{cell.flow}", marks=marks)


class Pool:
    """One probe VM shared by the cells while it stays intact; a new one after a cell
    that lost it (or failed)."""

    def __init__(self, lab: LabConfig) -> None:
        self.lab = lab
        self.client = lab_client(lab, timeout_s=120)
        self.count = 0
        self.vm: str | None = None
        self.host = "host1"

    def get(self) -> tuple[str, str]:
        if self.vm is None:
            self.count += 1
            name, host = f"flt{self.count}", "host1"
            settled(self.client, self.lab)
            boot_probe(self.client, self.lab, name, host, dirty=DIRTY_MIB_S)
            self.vm, self.host = name, host
        return self.vm, self.host

    def discard(self) -> None:
        """Remove the VM whatever state it is in (its QEMUs killed if need be)."""
        vm, self.vm = self.vm, None
        if vm is None:
            return
        with contextlib.suppress(AssertionError):
            settled(self.client, self.lab)
        with contextlib.suppress(Exception):
            remove_vm(self.client, vm)
        for pid, argv0 in cluster.processes_of(self.lab.directory):
            with contextlib.suppress(OSError):
                if "qemu" in argv0 and f"guest={vm},".encode() in Path(
                        f"/proc/{pid}/cmdline").read_bytes():
                    cluster.kill_pid(pid, grace_s=1.0)
        with contextlib.suppress(Exception):
            self.client.call("DELETE", f"/v1/vms/{vm}")


def recorded(client: Client, vm: str, state: str, host: str | None = None) -> None:
    """Wait (bounded) until the inventory records `vm` in `state` (on `host`): the
    engine's own outcome, or the reconciler's once the agents report again."""
    def ok() -> bool:
        view = client.call("GET", f"/v1/vms/{vm}")
        return bool(view["state"] == state and (host is None or view["host"] == host))
    wait_until(ok, 30, f"{vm} recorded {state}" + (f" on {host}" if host else ""))


def settled(client: Client, lab: LabConfig) -> None:
    """Every agent answers (a dead one's host counts as connected for a few seconds)
    and every host is connected."""
    for host in lab.hosts:
        wait_until(lambda h=host.name: agent_answers(lab, h), 120, f"{host.name}'s agent")
    wait_until(lambda: hosts_connected(client), 120, "every host connected")


@pytest.fixture(scope="module")
def pool(lab: LabConfig) -> Iterator[Pool]:
    found = Pool(lab)
    yield found
    found.discard()


def _next_host(lab: LabConfig, host: str) -> str:
    names = [h.name for h in lab.hosts]
    return names[(names.index(host) + 1) % len(names)]


def _wait_fired_or_ended(client: Client, lab: LabConfig, host: str, vm: str,
                         migration_id: str, since: float) -> bool:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if fired_since(lab, host, vm, since):
            return True
        with contextlib.suppress(Exception):
            rec = client.call("GET", f"/v1/migrations/{migration_id}")
            if rec["phase"] in ("completed", "failed"):
                return bool(fired_since(lab, host, vm, since))
        time.sleep(0.1)
    return False


def _no_copy_runs(lab: LabConfig, vm: str) -> bool:
    for host in qemu_hosts(lab, vm):
        with contextlib.suppress(Exception):
            if agent_call(lab, host, "GET", f"/v1/vms/{vm}")["state"] == "running":
                return False
    return True


@pytest.mark.parametrize("cell", [_param(c) for c in CELLS])
def test_fault_cell(cell: Cell, client: Client, lab: LabConfig, pool: Pool) -> None:
    vm, source = pool.get()
    target = _next_host(lab, source)
    faulty = source if cell.on is Role.SOURCE else target
    before = wait_heartbeat(client, vm)
    extra: dict[str, Any] = {"pass_count": cell.pass_count}
    if cell.action is FaultAction.FREEZE:
        extra["freeze_s"] = FREEZE_S
    since = time.time()
    arm_fault(lab, faulty, vm, cell.stage, cell.action, **extra)
    ok = False
    try:
        rec = client.call("POST", "/v1/migrations", {
            "vm": vm, "target": target, "options": FLOW_OPTIONS[cell.flow]})
        assert _wait_fired_or_ended(client, lab, faulty, vm, rec["id"], since), \
            f"the fault {cell.id} never fired"
        if cell.action is FaultAction.KILL_AGENT:
            restart_dead_agent(client, lab, faulty)
        done = follow(client, rec["id"])
        assert done["phase"] in ("completed", "failed"), done
        if cell.outcome is Outcome.LOST:
            assert done["phase"] == "failed" and done["reason"], done
            # the engine, or the reconciler a few seconds later, records it crashed
            recorded(client, vm, "crashed")
            assert _no_copy_runs(lab, vm)
        else:
            host = {Outcome.SOURCE: source, Outcome.DEST: target}.get(
                cell.outcome, target if done["phase"] == "completed" else source)
            assert done["phase"] == ("completed" if host == target else "failed"), done
            if (cell.stage, cell.action) == (FaultStage.SOURCE_COMPLETED, K):
                # The source's agent held the RAM its dead QEMU sent: the destination
                # was still checked (TCG can lose a write) before it ran.
                check = done.get("memory_check") or {}
                assert check.get("chunks") and check.get("skipped") is None, done
            settled(client, lab)
            wait_until(lambda: qemu_hosts(lab, vm) == [host], 90, f"{vm} only on {host}")
            recorded(client, vm, "running", host)
            assert_intact(client, vm, host, lab, before)
            pool.host = host
            ok = True
    finally:
        for h in (source, target):
            disarm_faults(lab, h)
        if not ok:
            pool.discard()


# --- the relocation mirror (Storage vMotion on one host) ------------------------------
@dataclass(frozen=True)
class MoveCell:
    stage: FaultStage
    action: FaultAction
    outcome: Outcome  # SOURCE: on the old image; DEST: on the new one; EITHER; LOST
    ci: bool = False

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.action}"


MOVE_CELLS = [
    MoveCell(FaultStage.MIRROR_READY, A, Outcome.SOURCE, ci=True),
    MoveCell(FaultStage.MIRROR_READY, F, Outcome.SOURCE),
    MoveCell(FaultStage.PIVOT, A, Outcome.SOURCE),
    MoveCell(FaultStage.PIVOT, F, Outcome.EITHER),
    # (its only QEMU died at the pivot: `unknown` at once, both images kept, then
    # `crashed` by the reconciler once the agent reports no QEMU)
    MoveCell(FaultStage.PIVOT, K, Outcome.LOST),
]


def _move_param(cell: MoveCell) -> Any:
    marks: list[Any] = [pytest.mark.faults]
    if not cell.ci:
        marks += [pytest.mark.faults_full,
                  pytest.mark.skipif(not FULL, reason="full fault matrix: make test-faults")]
    return pytest.param(cell, id=cell.id, marks=marks)


def _datastore_dir(lab: LabConfig, name: str) -> Path:
    if name == "shared":
        return lab.shared_datastore
    return lab.local_datastore(name.removeprefix("local-"))


@pytest.mark.parametrize("cell", [_move_param(c) for c in MOVE_CELLS])
def test_relocation_fault_cell(cell: MoveCell, client: Client, lab: LabConfig) -> None:
    """A disk moved from `shared` to host1's local datastore while the probe writes it,
    broken at the mirror's stage. Intact means the probe (memory and disk) is intact and
    the store names the image QEMU really uses, on the expected side."""
    vm, host = f"fmv-{cell.stage.value[:6]}-{cell.action.value.replace('_', '')}", "host1"
    rel = f"{vm}/root.raw"
    image = lab.shared_datastore / rel
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "64M"], check=True)
    spec = probe_spec(lab, vm, 192, 16, 0, mac=next_mac())
    spec["kernel"]["append"] += " ferry.disk=/dev/vda ferry.disk_mib=24 ferry.disk_mib_s=2"
    spec["disks"] = [{"name": "root", "datastore": "shared", "path": rel, "format": "raw"}]
    extra: dict[str, Any] = {}
    if cell.action is FaultAction.FREEZE:
        extra["freeze_s"] = FREEZE_S
    try:
        client.call("POST", "/v1/vms", {"spec": spec, "host": host})
        before = wait_heartbeat(client, vm, timeout_s=120)
        since = time.time()
        arm_fault(lab, host, vm, cell.stage, cell.action, **extra)
        rec = client.call("POST", "/v1/relocations", {"vm": vm, "datastore": "local-host1"})
        wait_until(lambda: fired_since(lab, host, vm, since) or client.call(
            "GET", f"/v1/relocations/{rec['id']}")["phase"] in ("completed", "failed"),
            300, "the fault to fire")
        assert fired_since(lab, host, vm, since), f"the fault {cell.id} never fired"
        if cell.action is FaultAction.KILL_AGENT:
            restart_dead_agent(client, lab, host)
        done: dict[str, Any] = {}
        for event in client.events(f"/v1/relocations/{rec['id']}/events"):
            done = event
        assert done["phase"] in ("completed", "failed"), done
        settled(client, lab)
        if cell.outcome is Outcome.LOST:
            recorded(client, vm, "crashed")
            assert _no_copy_runs(lab, vm)
            return
        recorded(client, vm, "running", host)
        assert_intact(client, vm, host, lab, before)
        disk = client.call("GET", f"/v1/vms/{vm}")["spec"]["disks"][0]
        live = client.call("GET", f"/v1/vms/{vm}/disk-files")["root"]
        assert live == str(_datastore_dir(lab, disk["datastore"]) / disk["path"]), (disk, live)
        want = {Outcome.SOURCE: "shared", Outcome.DEST: "local-host1"}.get(cell.outcome)
        assert want is None or disk["datastore"] == want, (done, disk)
        assert (done["phase"] == "completed") == (disk["datastore"] == "local-host1"), done
    finally:
        disarm_faults(lab, host)
        with contextlib.suppress(Exception):
            settled(client, lab)
            remove_vm(client, vm)
        for pid, argv0 in cluster.processes_of(lab.directory):
            with contextlib.suppress(OSError):
                if "qemu" in argv0 and f"guest={vm},".encode() in Path(
                        f"/proc/{pid}/cmdline").read_bytes():
                    cluster.kill_pid(pid, grace_s=1.0)
        shutil.rmtree(image.parent, ignore_errors=True)
        shutil.rmtree(lab.local_datastore(host) / vm, ignore_errors=True)


# --- DISK_COPY: a migration without shared storage --------------------------------------
COPY_CELLS = [
    MoveCell(FaultStage.DISK_MIRRORS, K, Outcome.LOST),  # only QEMU
    MoveCell(FaultStage.DISK_MIRRORS, A, Outcome.SOURCE),
    # (images the rollback cannot delete at once are deleted when the agent reports)
    MoveCell(FaultStage.DISK_MIRRORS, F, Outcome.SOURCE, ci=True),
]


@pytest.mark.parametrize("cell", [_move_param(c) for c in COPY_CELLS])
def test_disk_copy_fault_cell(cell: MoveCell, client: Client, lab: LabConfig) -> None:
    """A VM whose disk is on host1's local datastore migrated to host2 with the disk
    copied to host2's (DISK_COPY), broken when the source is asked to start the
    mirrors. Intact on the source means on its old image, on the destination on the
    copy; either way the store names the image QEMU uses."""
    vm = f"fdc-{cell.stage.value[:4]}-{cell.action.value.replace('_', '')}"
    source, target = "host1", "host2"
    rel = f"{vm}/root.raw"
    image = lab.local_datastore(source) / rel
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "64M"], check=True)
    spec = probe_spec(lab, vm, 192, 16, 0, mac=next_mac())
    spec["kernel"]["append"] += " ferry.disk=/dev/vda ferry.disk_mib=24 ferry.disk_mib_s=2"
    spec["disks"] = [{"name": "root", "datastore": f"local-{source}", "path": rel,
                      "format": "raw"}]
    extra: dict[str, Any] = {}
    if cell.action is FaultAction.FREEZE:
        extra["freeze_s"] = FREEZE_S
    try:
        client.call("POST", "/v1/vms", {"spec": spec, "host": source})
        before = wait_heartbeat(client, vm, timeout_s=180)
        since = time.time()
        arm_fault(lab, source, vm, cell.stage, cell.action, **extra)
        rec = client.call("POST", "/v1/migrations", {
            "vm": vm, "target": target, "datastore": f"local-{target}"})
        assert _wait_fired_or_ended(client, lab, source, vm, rec["id"], since), \
            f"the fault {cell.id} never fired"
        if cell.action is FaultAction.KILL_AGENT:
            restart_dead_agent(client, lab, source)
        done = follow(client, rec["id"])
        assert done["phase"] in ("completed", "failed"), done
        settled(client, lab)
        if cell.outcome is Outcome.LOST:
            assert done["phase"] == "failed" and done["reason"], done
            # the engine, or the reconciler a few seconds later, records it crashed
            recorded(client, vm, "crashed")
            assert _no_copy_runs(lab, vm)
            return
        host = {Outcome.SOURCE: source, Outcome.DEST: target}.get(
            cell.outcome, target if done["phase"] == "completed" else source)
        assert done["phase"] == ("completed" if host == target else "failed"), done
        wait_until(lambda: qemu_hosts(lab, vm) == [host], 90, f"{vm} only on {host}")
        assert_intact(client, vm, host, lab, before)
        disk = client.call("GET", f"/v1/vms/{vm}")["spec"]["disks"][0]
        live = client.call("GET", f"/v1/vms/{vm}/disk-files")["root"]
        assert disk["datastore"] == f"local-{host}", (done, disk)
        assert live == str(_datastore_dir(lab, disk["datastore"]) / disk["path"]), (disk, live)
        other = lab.local_datastore(target if host == source else source) / rel
        # a rollback that could not delete it at once does when the agent reports again
        wait_until(lambda: not other.exists(), 30, f"{other} deleted")
    finally:
        for h in (source, target):
            disarm_faults(lab, h)
        with contextlib.suppress(Exception):
            settled(client, lab)
            remove_vm(client, vm)
        for pid, argv0 in cluster.processes_of(lab.directory):
            with contextlib.suppress(OSError):
                if "qemu" in argv0 and f"guest={vm},".encode() in Path(
                        f"/proc/{pid}/cmdline").read_bytes():
                    cluster.kill_pid(pid, grace_s=1.0)
        for h in (source, target):
            shutil.rmtree(lab.local_datastore(h) / vm, ignore_errors=True)
