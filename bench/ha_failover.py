"""HA failover: kill a host, time until its protected VMs run again elsewhere; kill the
control plane's leader during a live migration, time until the standby leads.

Brings up its own lab (prefix "fo", 198.18.224.0/24; FERRY_BENCH_* override them): 3
hosts and two control-plane replicas, cp1 and cp2 (ports 8724 and 8725), on the lab's
private PostgreSQL server. Enables HA and boots 6 protected probe VMs (192 MiB) placed by
DRS. A watcher (tests/integration/watcher.py) samples every QEMU of the lab through both
parts and reports every VM it saw executing on two hosts at once (a copy that ran after
another copy had run counts too): the `double` columns, `double_runs` in the last line.

Host kills (`--runs`): kills the host holding most of the 6 (its link down, its agent,
watchdog and QEMUs SIGKILLed), then measures from that moment:

- detect_s: until the control plane's event declaring the host dead;
- fenced_s: until its event that the dead host was powered off through its power driver
  and read back off (HA power fencing; the lab's driver: no process of the host left),
  after which the restarts take the leases at once; "-" when it was not fenced;
- failover_s: until the control plane's VM list shows the last of the host's VMs running
  on another host (state running, host not the dead one): the restart is recorded, which
  the leader does once the target agent has taken the VM's lease and its QEMU runs there;
- guest_s: until the last of them prints probe heartbeats from a new boot, as the agents
  report them (every second). guest_s - failover_s is the guest's boot to its first
  heartbeat (TCG, several guests booting at once on a small machine) plus up to a second
  of reporting: the guest's boot is in guest_s, not in failover_s.

then brings the host back (link up, agent restarted, every host connected) and goes on.

Leader kills (`--takeover-runs`): one of the 6 probe VMs (a different one each run, each
booted before the run) is migrated live to the host running fewest of them, its source
host's link shaped to `--shape-mbit` so pre-copy lasts; once the migration is in phase
precopy the leading replica is SIGKILLed. Measured:

- takeover_s: from the kill until the other replica, asked GET /v1/cluster/leader, says it
  leads: the dead leader's term (10 s from its last renewal, every 2 s) plus the 1 s skew
  allowance, then the standby's next claim (every 2 s): 9 to 13 s by design;
- then: the migration's phase as recorded when the standby led; stream_after_s: how
  long after that QEMU's stream ended (QEMU's own migration time counted from the
  precopy phase's start): positive, the guest was still being copied, running on its
  source, when the new leader took over; negative, QEMU had finished while no replica
  led and the guest waited, paused, for the new leader to resume it on the target;
- the migration's outcome (the link is unshaped once the standby leads, the new leader
  resumes the migration), mig_s (request to its end), and whether the guest is intact:
  on the target, the same boot as before the migration, counters never back, a full
  memory pass after it, no integrity error (ferry.domain.probe.judge_intact, as the
  tests judge it).

The killed replica is started again (it joins as the standby) before the next run, so
the runs kill cp1 and cp2 in turn.

A run fails (`failed=`, both parts) when a host's VM does not run again within 180 s, a
migration does not complete, its guest is not intact, or the run broke otherwise.

Last line: detect_s=<median> failover_max_s=<max of failover_s> double_runs=<n>
takeover_s=<max> failed=<n>.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.integration.watcher

from bench.common import fmt, median, problem, remove_vm, run_in_lab
from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec, wait_heartbeat
from ferry.domain.errors import FerryError, HostUnavailable
from ferry.domain.migration import Phase
from ferry.domain.probe import Heartbeat, judge_intact
from ferry.lab import cluster, net
from ferry.lab.config import LabConfig
from ferry.lab.watch import heartbeats_from_now
from tests.integration.watcher import Watcher

VMS = 6
REPLICAS = 2
WAIT_S = 180.0  # for a dead host's VMs to run again
TAKEOVER_WAIT_S = 90.0  # for the standby to lead
MIGRATION_WAIT_S = 300.0  # for the resumed migration to end
T = TypeVar("T")


@dataclass
class Run:
    """One host kill."""

    victim: str
    moved: int = 0
    detect_s: float | None = None
    fenced_s: float | None = None  # the control plane's "host fenced" event (powered off)
    failover_s: float | None = None  # the last VM recorded running on another host
    guest_s: float | None = None  # the last VM's first heartbeat of a new boot
    double: int = 0
    error: str = ""
    order: list[str] = field(default_factory=list)


@dataclass
class Takeover:
    """One leader kill during a migration."""

    killed: str = "?"  # the replica killed
    vm: str = ""
    source: str = ""
    target: str = ""
    takeover_s: float | None = None
    phase_at_takeover: str = ""  # the migration's phase when the standby led
    # QEMU's stream ended this long after the standby led (QEMU's own elapsed time from
    # the precopy phase's start): > 0, pre-copy was still copying when it took over.
    stream_after_s: float | None = None
    outcome: str = "-"  # the migration's final phase
    migration_s: float | None = None  # request to its end
    intact: bool | None = None
    double: int = 0
    error: str = ""


# --- small loops ------------------------------------------------------------------
def until(probe: Callable[[], T | None], timeout_s: float, what: str,
          period_s: float = 0.2) -> T:
    """Call `probe` until it returns something other than None; a control plane that
    cannot be reached (a replica just killed, its connection reset) counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(HostUnavailable):
            if (got := probe()) is not None:
                return got
        if time.monotonic() > deadline:
            raise FerryError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(period_s)


def views(client: Client) -> dict[str, dict[str, Any]]:
    """Every VM as the control plane lists it: what the agents last reported (no call
    to an agent, so a dead host's does not slow the polling down)."""
    return {v["spec"]["name"]: v for v in client.call("GET", "/v1/vms")}


def _boot(view: dict[str, Any]) -> str:
    hb = (view.get("live") or {}).get("heartbeat") or {}
    return str(hb.get("boot_id") or "")


def boot(client: Client, lab: LabConfig, name: str, mac: str) -> None:
    spec = probe_spec(lab, name, 192, 64, 2, mac=mac)
    client.call("POST", "/v1/vms", {"spec": spec})


def all_connected(client: Client) -> bool | None:
    return all(h["state"] == "connected" for h in client.call("GET", "/v1/hosts")) or None


class Replicas:
    """The lab's control-plane replicas, each asked on its own (never moved to another)."""

    def __init__(self, lab: LabConfig) -> None:
        self.lab = lab
        token = lab.admin_token_file.read_text().strip()
        self.ids = [lab.replica_id(i) for i in range(lab.control_planes)]
        self.clients = [Client(url, 5.0, token=token, ca=lab.ca_file)
                        for url in lab.control_urls]

    def view(self, index: int) -> dict[str, Any] | None:
        """GET /v1/cluster/leader of the index-th replica; None if it does not answer."""
        with contextlib.suppress(FerryError):
            view: dict[str, Any] = self.clients[index].call("GET", "/v1/cluster/leader")
            return view
        return None

    def leader(self) -> int:
        """Which replica leads now, by its own word (waits while none does)."""
        def leading() -> int | None:
            return next((i for i in range(len(self.ids))
                         if (self.view(i) or {}).get("leading")), None)
        return until(leading, TAKEOVER_WAIT_S, "a leading replica")

    def leads(self, index: int) -> bool | None:
        return (self.view(index) or {}).get("leading") is True or None

    def stands_by(self, index: int) -> bool | None:
        """It answers, does not lead, and another replica holds the lease."""
        view = self.view(index)
        if view is None or view["leading"]:
            return None
        return view["holder"] not in ("", view["replica"]) or None

    def restart(self, index: int) -> None:
        """Start a killed replica again once its process is gone; it joins as the
        standby (the other one holds the lease by then)."""
        until(lambda: True if cluster.control_pid(self.lab, index) is None else None, 30,
              f"{self.ids[index]}'s process gone")
        cluster.start_control(self.lab, index)
        until(lambda: self.stands_by(index), 90, f"{self.ids[index]} standing by",
              period_s=0.5)


# --- host kills -------------------------------------------------------------------
def kill_host(lab: LabConfig, host: str) -> None:
    net.set_link(lab, host, False)
    for pid, _ in cluster.processes_of(lab.host_dir(host)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def restore_host(client: Client, lab: LabConfig, host: str) -> None:
    net.set_link(lab, host, True)
    cluster.start_agent(lab, host)
    until(lambda: all_connected(client), 120, f"{host} rejoining")


def event_times(client: Client, action: str, objects: list[str], since: float
                ) -> list[float]:
    return [float(e["at"]) for e in client.call("GET", "/v1/events", limit=300)
            if e["kind"] == "ha" and e["action"] == action and e["object"] in objects
            and e["at"] >= since]


def host_kill(client: Client, lab: LabConfig, names: list[str], watcher: Watcher) -> Run:
    vms = views(client)
    per_host = Counter(vms[n]["host"] for n in names)
    victim = per_host.most_common(1)[0][0]
    moving = [n for n in names if vms[n]["host"] == victim]
    boots = {n: _boot(vms[n]) for n in moving}
    run = Run(victim=victim, moved=len(moving))
    doubles_before = len(watcher.double_runs())
    killed_wall, killed = time.time(), time.monotonic()
    kill_host(lab, victim)
    not_running, not_booted = set(moving), set(moving)
    deadline = killed + WAIT_S
    while not_booted and time.monotonic() < deadline:
        with contextlib.suppress(HostUnavailable):
            now = views(client)
            at = time.monotonic() - killed
            for n in sorted(not_booted):
                view = now[n]
                if view["host"] == victim or view["state"] != "running":
                    continue
                if n in not_running:
                    not_running.discard(n)
                    run.failover_s = at
                new = _boot(view)
                if new and new != boots[n]:
                    not_booted.discard(n)
                    run.order.append(n)
                    run.guest_s = at
        time.sleep(0.2)
    if not_running:
        run.failover_s = None
        run.error = f"not running again after {WAIT_S:.0f} s: {', '.join(sorted(not_running))}"
    if not_booted:
        run.guest_s = None
        run.error = run.error or (f"no heartbeat of a new boot after {WAIT_S:.0f} s: "
                                  f"{', '.join(sorted(not_booted))}")
    dead = event_times(client, "host dead", [victim], killed_wall)
    run.detect_s = min(dead) - killed_wall if dead else None
    fenced = event_times(client, "host fenced", [victim], killed_wall)
    run.fenced_s = min(fenced) - killed_wall if fenced else None
    restore_host(client, lab, victim)
    run.double = len(watcher.double_runs()) - doubles_before
    return run


# --- leader kills -----------------------------------------------------------------
def migration(client: Client, migration_id: str) -> dict[str, Any]:
    rec: dict[str, Any] = client.call("GET", f"/v1/migrations/{migration_id}")
    return rec


def wait_phase(client: Client, migration_id: str, phase: Phase, timeout_s: float
               ) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        rec = migration(client, migration_id)
        if rec["phase"] != phase and Phase(rec["phase"]).terminal:
            raise FerryError(f"migration {rec['phase']} before {phase}: {rec.get('reason')}")
        return rec if rec["phase"] == phase else None
    return until(reached, timeout_s, f"phase {phase}", period_s=0.1)


def wait_ended(client: Client, migration_id: str, timeout_s: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        rec = migration(client, migration_id)
        return rec if Phase(rec["phase"]).terminal else None
    return until(ended, timeout_s, f"migration {migration_id} to end", period_s=0.5)


def takeover(client: Client, lab: LabConfig, replicas: Replicas, names: list[str],
             watcher: Watcher, number: int, shape_bits_s: int) -> Takeover:
    run = Takeover()
    until(lambda: all_connected(client), 120, "every host connected")
    vms = views(client)
    run.vm = names[number % len(names)]
    run.source = vms[run.vm]["host"]
    per_host = Counter(v["host"] for v in vms.values())
    run.target = min((h.name for h in lab.hosts if h.name != run.source),
                     key=lambda h: (per_host[h], h))
    leader = replicas.leader()
    standby = 1 - leader
    run.killed = replicas.ids[leader]
    until(lambda: replicas.stands_by(standby), 60, f"{replicas.ids[standby]} standing by")
    before = Heartbeat.model_validate(wait_heartbeat(client, run.vm, timeout_s=120))
    doubles_before = len(watcher.double_runs())
    killed_pid: int | None = None
    try:  # a broken run keeps what it measured; the killed replica comes back anyway
        net.shape(lab, run.source, shape_bits_s)
        try:
            began = time.monotonic()
            rec = client.call("POST", "/v1/migrations", {"vm": run.vm, "target": run.target})
            wait_phase(client, rec["id"], Phase.PRECOPY, 120)
            killed_pid = cluster.control_pid(lab, leader)
            if killed_pid is None:
                raise FerryError(f"replica {run.killed} leads but has no live process")
            os.kill(killed_pid, signal.SIGKILL)
            killed = time.monotonic()
            until(lambda: replicas.leads(standby), TAKEOVER_WAIT_S,
                  f"{replicas.ids[standby]} leading")
            run.takeover_s = time.monotonic() - killed
            took_wall = time.time()
            run.phase_at_takeover = until(lambda: migration(client, rec["id"]), 30,
                                          "the migration record")["phase"]
        finally:
            net.shape(lab, run.source, None)
        done = wait_ended(client, rec["id"], MIGRATION_WAIT_S)
        run.outcome = done["phase"]
        run.migration_s = time.monotonic() - began
        if done.get("total_ms") is not None and "precopy" in done["phase_times"]:
            run.stream_after_s = done["phase_times"]["precopy"] + done["total_ms"] / 1000 \
                - took_wall
        if run.outcome != Phase.COMPLETED:
            run.error = f"migration {run.outcome}: {done.get('reason')}"
        else:
            view = client.call("GET", f"/v1/vms/{run.vm}")
            problems = [] if (view["host"], view["state"]) == (run.target, "running") \
                else [f"recorded {view['state']} on {view['host']}, not running on "
                      f"{run.target}"]
            problems += judge_intact(before, heartbeats_from_now(client, run.vm))
            run.intact = not problems
            if problems:
                run.error = "guest not intact: " + "; ".join(problems)
    except Exception as exc:
        run.error = problem(exc)
    if killed_pid is not None:  # before the next run, also after a failed one
        try:
            replicas.restart(leader)
        except Exception as exc:
            run.error = "; ".join(filter(None, (run.error, f"restart: {problem(exc)}")))
    run.double = len(watcher.double_runs()) - doubles_before
    return run


# --- the benchmark ----------------------------------------------------------------
def body(lab: LabConfig, runs: int, takeovers: int, shape_bits_s: int
         ) -> list[Run | Takeover]:
    client = lab_client(lab, timeout_s=120)
    client.call("PATCH", "/v1/cluster/ha", {"enabled": True, "host_failures_to_tolerate": 1})
    names = [f"ha{i}" for i in range(VMS)]
    for i, n in enumerate(names):
        boot(client, lab, n, f"52:54:00:ab:00:{i + 16:02x}")
    for n in names:
        wait_heartbeat(client, n, timeout_s=120)
    watcher = Watcher(lab.directory, {h.name: lab.host_dir(h.name) for h in lab.hosts})
    watcher.start()
    replicas = Replicas(lab)
    out: list[Run | Takeover] = []
    try:
        for i in range(runs):
            try:
                run = host_kill(client, lab, names, watcher)
            except Exception as exc:  # one broken run is reported, the others go on
                run = Run(victim="?", error=problem(exc))
            out.append(run)
            print(f"host kill {i + 1}: killed {run.victim}, {run.moved} VMs; detect "
                  f"{fmt(run.detect_s)} s, fenced {fmt(run.fenced_s)} s, last VM running "
                  f"again after {fmt(run.failover_s)} s, its guest's heartbeat after "
                  f"{fmt(run.guest_s)} s (order {', '.join(run.order)}); double runs "
                  f"{run.double}{'; ' + run.error if run.error else ''}", flush=True)
        for i in range(takeovers):
            try:
                tk = takeover(client, lab, replicas, names, watcher, i, shape_bits_s)
            except Exception as exc:  # before it killed anything
                tk = Takeover(error=problem(exc))
            out.append(tk)
            print(f"leader kill {i + 1}: {tk.vm} {tk.source} -> {tk.target}, killed "
                  f"{tk.killed} in pre-copy; standby led after {fmt(tk.takeover_s)} s "
                  f"(migration then {tk.phase_at_takeover or '?'}, QEMU's stream ended "
                  f"{fmt(tk.stream_after_s)} s after that); migration "
                  f"{tk.outcome} after {fmt(tk.migration_s, 1)} s, intact "
                  f"{_yes(tk.intact)}; double runs {tk.double}"
                  f"{'; ' + tk.error if tk.error else ''}", flush=True)
    finally:
        watcher.stop()
        for n in names:
            with contextlib.suppress(Exception):
                remove_vm(client, n)
    for d in watcher.double_runs():
        print(f"watcher: {d}", flush=True)
    return out


def _max(values: list[float]) -> float | None:
    return max(values, default=None)


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "NO"


def _stat_rows(columns: list[tuple[list[float], int]]) -> None:
    """The median and max rows under a table: each column's values and width."""
    for label, pick in (("median", median), ("max", _max)):
        print(f"{label:<6} " + " ".join(f"{fmt(pick(values)):>{width}}"
                                        for values, width in columns))


def report(out: list[Run | Takeover]) -> int:
    kills = [r for r in out if isinstance(r, Run)]
    takes = [r for r in out if isinstance(r, Takeover)]
    print(f"\nhost kills\n{'run':>3} {'host':>6} {'VMs':>4} {'detect_s':>9} "
          f"{'fenced_s':>9} {'failover_s':>11} {'guest_s':>8} {'double':>7}  error")
    for i, r in enumerate(kills, 1):
        print(f"{i:>3} {r.victim:>6} {r.moved:>4} {fmt(r.detect_s):>9} "
              f"{fmt(r.fenced_s):>9} {fmt(r.failover_s):>11} {fmt(r.guest_s):>8} "
              f"{r.double:>7}  {r.error}")
    detect = [r.detect_s for r in kills if r.detect_s is not None]
    failover = [r.failover_s for r in kills if r.failover_s is not None]
    guest = [r.guest_s for r in kills if r.guest_s is not None]
    fenced = [r.fenced_s for r in kills if r.fenced_s is not None]
    _stat_rows([(detect, 19), (fenced, 9), (failover, 11), (guest, 8)])
    print(f"\nleader kills during a migration\n{'run':>3} {'killed':>7} {'takeover_s':>11} "
          f"{'then':>8} {'stream_after_s':>14} {'migration':>10} {'mig_s':>6} {'intact':>7} "
          f"{'double':>7}  error")
    for i, t in enumerate(takes, 1):
        print(f"{i:>3} {t.killed:>7} {fmt(t.takeover_s):>11} {t.phase_at_takeover or '-':>8} "
              f"{fmt(t.stream_after_s):>14} {t.outcome:>10} {fmt(t.migration_s, 1):>6} "
              f"{_yes(t.intact):>7} {t.double:>7}  {t.error}")
    took = [t.takeover_s for t in takes if t.takeover_s is not None]
    _stat_rows([(took, 15)])
    failed = sum(1 for r in out if r.error)
    print(f"detect_s={fmt(median(detect))} failover_max_s="
          f"{fmt(max(failover, default=None))} double_runs={sum(r.double for r in out)} "
          f"takeover_s={fmt(max(took, default=None))} failed={failed}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="host kills (default 5)")
    p.add_argument("--takeover-runs", type=int, default=5,
                   help="leader kills during a migration (default 5)")
    p.add_argument("--shape-mbit", type=int, default=30,
                   help="the migration source's link during a leader kill, Mbit/s "
                   "(default 30: pre-copy outlasts the takeover)")
    p.add_argument("--lab-dir", type=Path)
    args = p.parse_args()
    out = run_in_lab("bench/ha_failover.py", args.lab_dir, 3, prefix="fo", subnet_octet=224,
                     control_port=8724,
                     lab_options={"control_planes": REPLICAS, "db": "postgresql"},
                     banner=lambda _: f"{VMS} protected VMs, {REPLICAS} control-plane "
                     f"replicas; {args.runs} host kills, {args.takeover_runs} leader kills",
                     body=lambda lab: body(lab, args.runs, args.takeover_runs,
                                           args.shape_mbit * 1_000_000),
                     failed=lambda runs: any(r.error or r.double for r in runs))
    if isinstance(out, int):
        return out
    return report(out)


if __name__ == "__main__":
    raise SystemExit(main())
