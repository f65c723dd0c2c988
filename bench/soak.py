"""Soak: many live migrations of a few VMs among three hosts, some broken on purpose,
then a census that does not trust the store.

Brings up its own 3-host lab (prefix "fk", 198.18.218.0/24, control plane on port
8718) with the agents' lab-only fault hooks on (ferry/agent/faults.py). Boots 4 probe
VMs, each with a raw disk on the shared datastore that its probe writes and verifies,
and runs --migrations migrations, each of a random VM to a random other host. A share of
them (--fault-share) gets a random fault of the matrix (the cells of
tests/integration/test_faults.py): the fault is armed on the source's or destination's
agent, a killed agent is started again once the fault fired, and the migration is
followed to its end. A VM that ends up running nowhere is counted (`expected_lost` when
the fault killed its only complete copy, as the matrix says, else `lost`), removed and
replaced by a fresh one. A watcher (tests/integration/watcher.py) samples every QEMU's
vCPU time throughout and counts any guest that executed on two hosts (`double`).

The census at the end looks at the machine, not at the store: QEMU processes per host
(ferry.lab.cluster.processes_of), each probe's heartbeats read from the serial log files
in the hosts' run directories, and the image files in the datastores. Every VM must run
exactly once (its serial log advancing on one host only), its probe intact since it
booted (ferry.domain.probe.judge_intact: same boot, no memory or disk error, a full
memory pass after the census began), no QEMU of no VM or a second, paused copy
(`stray`), every VM's image present and no image of no VM (`data_loss` counts missing
images and probes that found their disk changed), and the store must agree with what
runs where (`store_mismatch`, printed above the last line). The last line:

    migrations=<n> faults=<n> lost=<n> expected_lost=<n> double=<n> stray=<n>
    data_loss=<n> integrity_errors=<n>

Usage (root): .venv/bin/python bench/soak.py [--migrations 200] [--fault-share 0.2]
    [--seed N] [--lab-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import _terminate, preflight, problem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.integration.watcher

from ferry.agent.faults import FaultAction, FaultStage, fired_faults
from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.probe import Heartbeat, full_pass_after, heartbeats, judge_intact
from ferry.hypervisor.argv import RunPaths
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from ferry.pki import ControlPki
from ferry.pki.layout import client_context
from tests.integration.watcher import Watcher

VMS = 4
DIRTY_MIB_S = 5
DISK_DIR = "soak"  # on the shared datastore
FREEZE_S = 45.0
SETTLE_S = 120.0


@dataclass(frozen=True)
class Fault:
    stage: FaultStage
    action: FaultAction
    on_source: bool
    options: tuple[tuple[str, Any], ...] = ()
    pass_count: int = 1
    expected_lost: bool = False  # the fault kills the guest's only complete copy

    @property
    def name(self) -> str:
        return f"{self.stage}/{'src' if self.on_source else 'dst'}/{self.action}"


K, A, F = FaultAction.KILL_QEMU, FaultAction.KILL_AGENT, FaultAction.FREEZE
SLOW = (("max_bandwidth_bytes_s", 16 << 20),)
POST = (("max_bandwidth_bytes_s", 4 << 20), ("allow_throttle", False),
        ("allow_postcopy", True), ("postcopy_recovery_window_s", 90))
FAULTS = [
    *(Fault(FaultStage.PREPARE_INCOMING, a, False) for a in (K, A, F)),
    *(Fault(FaultStage.INCOMING_POLL, a, False, SLOW, 2) for a in (K, A, F)),
    Fault(FaultStage.START_OUTGOING, K, True, expected_lost=True),
    Fault(FaultStage.START_OUTGOING, A, True),
    Fault(FaultStage.START_OUTGOING, F, True),
    Fault(FaultStage.PRECOPY_PASS, K, True, SLOW, 2, expected_lost=True),
    Fault(FaultStage.PRECOPY_PASS, A, True, SLOW, 2),
    Fault(FaultStage.PRECOPY_PASS, F, True, SLOW, 2),
    *(Fault(FaultStage.SOURCE_COMPLETED, a, True) for a in (K, A, F)),
    Fault(FaultStage.RESUME, K, False),
    Fault(FaultStage.RESUME, A, False),
    Fault(FaultStage.RESUME, F, False),
    Fault(FaultStage.RESUMED, K, False, expected_lost=True),
    Fault(FaultStage.RESUMED, A, False),
    Fault(FaultStage.POSTCOPY, K, True, POST, expected_lost=True),
    Fault(FaultStage.POSTCOPY, A, True, POST),
    Fault(FaultStage.POSTCOPY, F, True, POST),
    Fault(FaultStage.RESUME, K, False, POST, expected_lost=True),
]


@dataclass
class Vm:
    name: str
    boot: Heartbeat  # its first heartbeat: the census judges everything since


@dataclass
class Tally:
    migrations: int = 0
    faults: int = 0
    lost: int = 0
    expected_lost: int = 0
    store_mismatch: int = 0  # the store says the VM is not running, yet it executes
    outcomes: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


# --- the lab ------------------------------------------------------------------------
@contextlib.contextmanager
def soak_lab(lab_dir: Path | None) -> Iterator[LabConfig]:
    """bench/common.py's bench_lab, with the agents' fault hooks on."""
    signal.signal(signal.SIGTERM, _terminate)
    directory = lab_dir or Path(tempfile.mkdtemp(prefix="ferry-soak-"))
    config = LabConfig.default(directory, 3, prefix="fk", subnet_octet=218,
                               control_port=8718, fault_hooks=True)
    try:
        cluster.down(config)  # leftovers of an earlier run in the same directory
        if (directory / "lab.json").exists():
            shutil.rmtree(directory)  # an earlier soak's lab: its store would clash
        cluster.up(config)
        yield config
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        print("tearing the lab down", flush=True)
        cluster.down(config)
        print(f"logs kept in {config.logs_dir}", flush=True)


def agent(lab: LabConfig, host: str, method: str, path: str,
          body: dict[str, Any] | None = None) -> Any:
    """The host's agent, called with the control plane's certificate."""
    pki = ControlPki(lab.pki_dir)
    with httpx.Client(base_url=lab.agent_url(host), trust_env=False, timeout=10.0,
                      verify=client_context(pki.ca_cert, pki.cert, pki.key)) as http:
        resp = http.request(method, path, json=body)
    resp.raise_for_status()
    return resp.json() if resp.content else None


def connected(client: Client) -> bool:
    try:
        return all(h["state"] == "connected" for h in client.call("GET", "/v1/hosts"))
    except Exception:
        return False


def wait_for(predicate: Any, timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    print(f"  timed out after {timeout_s:.0f} s waiting for {what}", flush=True)
    return False


def agent_alive(lab: LabConfig, host: str) -> bool:
    return cluster.status(lab).agent_pids.get(host) is not None


# --- what runs where (from /proc, not the store) -----------------------------------
def qemus(lab: LabConfig) -> dict[str, list[str]]:
    """VM name -> the hosts on which a QEMU process of it exists."""
    found: dict[str, list[str]] = {}
    for pid, argv0 in cluster.processes_of(lab.directory):
        if not argv0.endswith("qemu-system-x86_64"):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        name = cmd.split("guest=", 1)[1].split(",", 1)[0] if "guest=" in cmd else "?"
        for host in lab.hosts:
            if f"{lab.host_dir(host.name)}/" in cmd:
                found.setdefault(name, []).append(host.name)
    return found


def serial_beats(lab: LabConfig, host: str, vm: str) -> list[Heartbeat]:
    log = RunPaths(lab.host_dir(host) / "run" / "vms" / vm).serial_log
    try:
        return heartbeats(log.read_text(errors="replace").splitlines())
    except OSError:
        return []


def executing_hosts(lab: LabConfig, vm: str, watch_s: float = 3.0) -> list[str]:
    """The hosts on which the VM's probe prints new heartbeats within watch_s."""
    hosts = qemus(lab).get(vm, [])
    first = {h: len(serial_beats(lab, h, vm)) for h in hosts}
    time.sleep(watch_s)
    return [h for h in hosts if len(serial_beats(lab, h, vm)) > first[h]]


# --- VMs ---------------------------------------------------------------------------
def image_of(lab: LabConfig, vm: str) -> Path:
    return lab.shared_datastore / DISK_DIR / vm / "root.raw"


def boot(client: Client, lab: LabConfig, number: int, host: str) -> Vm:
    name = f"soak{number}"
    image = image_of(lab, name)
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "32M"], check=True)
    spec = probe_spec(lab, name, 192, 48, DIRTY_MIB_S,
                      mac=f"52:54:00:5a:{number >> 8 & 0xFF:02x}:{number & 0xFF:02x}")
    spec["kernel"]["append"] += " ferry.disk=/dev/vda ferry.disk_mib=16 ferry.disk_mib_s=1"
    spec["disks"] = [{"name": "root", "datastore": "shared",
                      "path": f"{DISK_DIR}/{name}/root.raw", "format": "raw"}]
    client.call("POST", "/v1/vms", {"spec": spec, "host": host})
    return Vm(name=name, boot=Heartbeat.model_validate(
        wait_heartbeat(client, name, timeout_s=120)))


def discard(client: Client, lab: LabConfig, vm: str) -> None:
    """Remove a VM that runs nowhere: its record, any QEMU left of it, its image."""
    with contextlib.suppress(Exception):
        client.call("POST", f"/v1/vms/{vm}/stop", force=True)
    for pid, _ in cluster.processes_of(lab.directory):
        with contextlib.suppress(OSError):
            if f"guest={vm},".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                cluster.kill_pid(pid, grace_s=1.0)
    with contextlib.suppress(Exception):
        client.call("DELETE", f"/v1/vms/{vm}")
    shutil.rmtree(image_of(lab, vm).parent, ignore_errors=True)


# --- one migration -----------------------------------------------------------------
def migrate(client: Client, lab: LabConfig, vm: str, source: str, target: str,
            fault: Fault | None, tally: Tally) -> bool:
    """Run one migration (with its fault); True if the VM still runs somewhere."""
    options: dict[str, Any] = dict(fault.options) if fault else {}
    faulty = (source if fault.on_source else target) if fault else source
    since = time.time()
    if fault is not None:
        body: dict[str, Any] = {"vm": vm, "stage": fault.stage, "action": fault.action,
                                "pass_count": fault.pass_count}
        if fault.action is FaultAction.FREEZE:
            body["freeze_s"] = FREEZE_S
        agent(lab, faulty, "POST", "/v1/faults", body)
    rec = client.call("POST", "/v1/migrations",
                      {"vm": vm, "target": target, "options": options})
    log = lab.host_dir(faulty) / "run" / "faults.log"

    def fired() -> bool:
        return any(r.request.vm == vm and (r.fired_at or 0) >= since
                   for r in fired_faults(log))

    def ended() -> bool:
        with contextlib.suppress(Exception):
            return client.call("GET", f"/v1/migrations/{rec['id']}")["phase"] in (
                "completed", "failed")
        return False

    wait_for(lambda: ended() or (fault is not None and fired()), 600, "the migration")
    if fault is not None and fault.action is FaultAction.KILL_AGENT and fired():
        wait_for(lambda: not agent_alive(lab, faulty), 30, f"{faulty}'s agent gone")
        cluster.start_agent(lab, faulty)
    wait_for(ended, 900, "the migration's end")
    wait_for(lambda: connected(client), SETTLE_S, "every host connected")
    for host in (source, target):
        with contextlib.suppress(Exception):
            agent(lab, host, "DELETE", "/v1/faults")
    done = client.call("GET", f"/v1/migrations/{rec['id']}")
    view = client.call("GET", f"/v1/vms/{vm}")
    fault_name = fault.name if fault else "none"
    if fault is not None and not fired():
        fault_name += " (never reached)"
    outcome = f"{done['phase']}/{view['state']}"
    tally.outcomes[f"{fault_name} -> {outcome}"] += 1
    if view["state"] == "running":
        # leftovers go once the agents report them (the reaper); wait for that
        wait_for(lambda: qemus(lab).get(vm) == [client.call("GET", f"/v1/vms/{vm}")["host"]],
                 SETTLE_S, f"{vm} on one host only")
        return True
    executing = executing_hosts(lab, vm)
    if executing:
        tally.store_mismatch += 1
        tally.notes.append(f"{vm}: {fault_name} -> {outcome}, yet it executes on "
                           f"{', '.join(executing)}: {done.get('reason')}")
    elif fault is not None and fault.expected_lost and fired():
        tally.expected_lost += 1
    else:
        tally.lost += 1
        tally.notes.append(f"{vm}: {fault_name} -> {outcome}: {done.get('reason')}")
    return False


# --- the census --------------------------------------------------------------------
@dataclass
class Census:
    double: int = 0
    stray: int = 0
    data_loss: int = 0
    integrity_errors: int = 0
    lost: int = 0
    store_mismatch: int = 0
    notes: list[str] = field(default_factory=list)


def census(client: Client, lab: LabConfig, vms: dict[str, Vm], watcher: Watcher) -> Census:
    c = Census()
    wait_for(lambda: connected(client), SETTLE_S, "every host connected")
    wait_for(lambda: all(m["phase"] in ("completed", "failed")
                         for m in client.call("GET", "/v1/migrations")),
             SETTLE_S, "no unfinished migration")
    wait_for(lambda: all(len(qemus(lab).get(v, [])) <= 1 for v in vms), SETTLE_S,
             "leftover copies reaped")
    running = qemus(lab)
    for name, hosts in sorted(running.items()):
        if name not in vms:
            c.stray += len(hosts)
            c.notes.append(f"stray QEMU of {name} on {', '.join(hosts)}")
    store = {v["spec"]["name"]: v for v in client.call("GET", "/v1/vms")}
    for name, vm in sorted(vms.items()):
        hosts = running.get(name, [])
        live = executing_hosts(lab, name)
        if not live:
            c.lost += 1
            c.notes.append(f"{name} runs nowhere (QEMU on {hosts or 'no host'})")
            continue
        if len(live) > 1:
            c.double += 1
            c.notes.append(f"{name} executes on {', '.join(live)}")
        c.stray += len(hosts) - len(live)
        host = live[0]
        seen = store.get(name)
        if seen is None or seen["host"] != host or seen["state"] != "running":
            c.store_mismatch += 1
            c.notes.append(f"store says {name} is {seen and seen['state']} on "
                           f"{seen and seen['host']}, it runs on {host}")
        after = _beats_until_full_pass(lab, host, name)
        problems = judge_intact(vm.boot, after)
        if problems:
            c.integrity_errors += 1
            c.notes.append(f"{name}: {'; '.join(problems)}")
        if after and after[-1].disk_errors:
            c.data_loss += 1
        if not image_of(lab, name).exists():
            c.data_loss += 1
            c.notes.append(f"{name}'s image {image_of(lab, name)} is gone")
    images = {p.parent.name for p in (lab.shared_datastore / DISK_DIR).glob("*/root.raw")}
    for extra in sorted(images - set(vms)):
        c.stray += 1
        c.notes.append(f"leftover image of {extra}")
    c.double += len(watcher.double_runs())
    c.notes += [str(d) for d in watcher.double_runs()]
    return c


def _beats_until_full_pass(lab: LabConfig, host: str, vm: str) -> list[Heartbeat]:
    start = len(serial_beats(lab, host, vm))
    deadline = time.monotonic() + 90
    after: list[Heartbeat] = []
    while time.monotonic() < deadline and not full_pass_after(after):
        time.sleep(0.5)
        after = serial_beats(lab, host, vm)[start:]
    return after


# --- main --------------------------------------------------------------------------
def run(lab: LabConfig, args: argparse.Namespace) -> tuple[Tally, Census]:
    rng = random.Random(args.seed)
    client = lab_client(lab, timeout_s=120)
    hosts = [h.name for h in lab.hosts]
    vms: dict[str, Vm] = {}
    count = 0

    def new_vm(host: str) -> None:
        nonlocal count
        count += 1
        vm = boot(client, lab, count, host)
        vms[vm.name] = vm

    for i in range(VMS):
        new_vm(hosts[i % len(hosts)])
    tally = Tally()
    watcher = Watcher(lab.directory, {h: lab.host_dir(h) for h in hosts}).start()
    try:
        for n in range(1, args.migrations + 1):
            name = rng.choice(sorted(vms))
            source = client.call("GET", f"/v1/vms/{name}")["host"]
            target = rng.choice([h for h in hosts if h != source])
            fault = rng.choice(FAULTS) if rng.random() < args.fault_share else None
            began = time.monotonic()
            try:
                alive = migrate(client, lab, name, source, target, fault, tally)
            except Exception as exc:
                alive = False
                tally.lost += 1
                tally.notes.append(f"{name}: migration {n} broke the soak: {problem(exc)}")
            tally.migrations += 1
            tally.faults += fault is not None
            print(f"{n:4d} {name} {source}->{target} fault={fault.name if fault else '-'} "
                  f"{'ok' if alive else 'NOT RUNNING'} ({time.monotonic() - began:.1f} s)",
                  flush=True)
            if not alive:
                discard(client, lab, name)
                del vms[name]
                new_vm(rng.choice(hosts))
        return tally, census(client, lab, vms, watcher)
    finally:
        watcher.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--migrations", type=int, default=200)
    p.add_argument("--fault-share", type=float, default=0.2,
                   help="share of migrations that get a random fault (default 0.2)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lab-dir", type=Path, help="lab directory (default: a fresh temp dir)")
    args = p.parse_args()
    if not 0 <= args.fault_share <= 1:
        p.error("--fault-share must be within 0 and 1")
    if args.migrations < 1:
        p.error("--migrations must be at least 1")
    if (code := preflight("soak.py")) is not None:
        return code
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    print(f"seed={args.seed}", flush=True)
    try:
        with soak_lab(args.lab_dir) as lab:
            tally, found = run(lab, args)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): no census", file=sys.stderr)
        return 130
    print("outcomes (fault -> migration phase / VM state):")
    for line, n in sorted(tally.outcomes.items()):
        print(f"  {n:4d}  {line}")
    for note in tally.notes + found.notes:
        print(f"  note: {note}")
    print(f"store_mismatch={tally.store_mismatch + found.store_mismatch}")
    print(f"migrations={tally.migrations} faults={tally.faults} "
          f"lost={tally.lost + found.lost} expected_lost={tally.expected_lost} "
          f"double={found.double} stray={found.stray} data_loss={found.data_loss} "
          f"integrity_errors={found.integrity_errors}", flush=True)
    bad = tally.lost + found.lost + found.double + found.stray + found.data_loss
    return 1 if bad + found.integrity_errors else 0


if __name__ == "__main__":
    sys.exit(main())
