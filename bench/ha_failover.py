"""HA failover: kill a host, time until every protected VM of it runs again elsewhere.

Brings up its own 3-host lab (prefix "fo", 198.18.224.0/24, control plane on port 8724;
FERRY_BENCH_* override them), enables HA, boots 6 protected probe VMs placed by DRS, then
`--runs` times: kills the host holding most of them (its link, its agent and all its
QEMUs, SIGKILL), measures

- detect_s: from the kill to the control plane's event declaring the host dead;
- started_s: from the kill until the control plane recorded the last of its VMs started
  on another host (its QEMU launched, lease taken);
- failover_s: from the kill until the last of its VMs prints probe heartbeats from a new
  boot on another host, as the agents report them (every second; the guest's boot to
  its first heartbeat is part of it);

brings the host back (agent restarted, link restored) and goes on. A watcher
(tests/integration/watcher.py) samples every QEMU throughout and counts VMs ever seen
executing on two hosts at once. The control plane's own takeover (a standby leader) is
not built yet: takeover_s is n/a.

Last line: detect_s=<median> failover_max_s=<max> double_runs=<n> takeover_s=n/a
failed=<n>.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.integration.watcher

from bench.common import fmt, median, problem, remove_vm, run_in_lab
from ferry.cli.client import Client, lab_client
from ferry.cli.demo import probe_spec
from ferry.lab import cluster, net
from ferry.lab.config import LabConfig
from tests.integration.watcher import Watcher

VMS = 6
WAIT_S = 180.0


@dataclass
class Run:
    victim: str
    moved: int = 0
    detect_s: float | None = None
    started_s: float | None = None  # until the last restart was recorded (QEMU started)
    failover_s: float | None = None
    double: int = 0
    error: str = ""
    order: list[str] = field(default_factory=list)


def boot(client: Client, lab: LabConfig, name: str, mac: str) -> None:
    spec = probe_spec(lab, name, 192, 64, 2, mac=mac)
    client.call("POST", "/v1/vms", {"spec": spec})


def boot_id(client: Client, vm: str) -> str:
    return _boot(client.call("GET", f"/v1/vms/{vm}"))


def _boot(view: dict[str, Any]) -> str:
    hb = (view.get("live") or {}).get("heartbeat") or {}
    return str(hb.get("boot_id") or "")


def views(client: Client) -> dict[str, dict[str, Any]]:
    """Every VM as the control plane lists it: what the agents last reported (no call
    to an agent, so a dead host's does not slow the polling down)."""
    return {v["spec"]["name"]: v for v in client.call("GET", "/v1/vms")}


def kill_host(lab: LabConfig, host: str) -> None:
    net.set_link(lab, host, False)
    for pid, _ in cluster.processes_of(lab.host_dir(host)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def restore_host(client: Client, lab: LabConfig, host: str) -> None:
    net.set_link(lab, host, True)
    cluster.start_agent(lab, host)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if all(h["state"] == "connected" for h in client.call("GET", "/v1/hosts")):
                return
        time.sleep(0.5)
    raise RuntimeError(f"{host} did not rejoin")


def event_times(client: Client, action: str, objects: list[str], since: float
                ) -> list[float]:
    return [float(e["at"]) for e in client.call("GET", "/v1/events", limit=300)
            if e["kind"] == "ha" and e["action"] == action and e["object"] in objects
            and e["at"] >= since]


def one_run(client: Client, lab: LabConfig, names: list[str], watcher: Watcher) -> Run:
    vms = views(client)
    per_host = Counter(vms[n]["host"] for n in names)
    victim = per_host.most_common(1)[0][0]
    moving = [n for n in names if vms[n]["host"] == victim]
    boots = {n: _boot(vms[n]) for n in moving}
    run = Run(victim=victim, moved=len(moving))
    doubles_before = len(watcher.double_runs())
    killed_wall, killed = time.time(), time.monotonic()
    kill_host(lab, victim)
    pending = set(moving)
    deadline = killed + WAIT_S
    while pending and time.monotonic() < deadline:
        now = views(client)
        for n in sorted(pending):
            view = now[n]
            new = _boot(view)
            if view["host"] != victim and view["state"] == "running" and new \
                    and new != boots[n]:
                pending.discard(n)
                run.order.append(n)
                run.failover_s = time.monotonic() - killed
        time.sleep(0.2)
    if pending:
        run.error = f"not running again after {WAIT_S:.0f} s: {', '.join(sorted(pending))}"
    dead = event_times(client, "host dead", [victim], killed_wall)
    run.detect_s = min(dead) - killed_wall if dead else None
    started = event_times(client, "vm restarted", moving, killed_wall)
    run.started_s = max(started) - killed_wall if started else None
    restore_host(client, lab, victim)
    run.double = len(watcher.double_runs()) - doubles_before
    return run


def body(lab: LabConfig, runs: int) -> list[Run]:
    client = lab_client(lab, timeout_s=120)
    client.call("PATCH", "/v1/cluster/ha", {"enabled": True, "host_failures_to_tolerate": 1})
    names = [f"ha{i}" for i in range(VMS)]
    for i, n in enumerate(names):
        boot(client, lab, n, f"52:54:00:ab:00:{i + 16:02x}")
    for n in names:
        deadline = time.monotonic() + 120
        while not boot_id(client, n) and time.monotonic() < deadline:
            time.sleep(0.5)
    watcher = Watcher(lab.directory, {h.name: lab.host_dir(h.name) for h in lab.hosts})
    watcher.start()
    out: list[Run] = []
    try:
        for i in range(runs):
            try:
                run = one_run(client, lab, names, watcher)
            except Exception as exc:  # one broken run is reported, the others go on
                run = Run(victim="?", error=problem(exc))
            out.append(run)
            print(f"run {i + 1}: killed {run.victim}, {run.moved} VMs; detect "
                  f"{fmt(run.detect_s)} s, last VM running again after "
                  f"{fmt(run.failover_s)} s (order {', '.join(run.order)}); double runs "
                  f"{run.double}{'; ' + run.error if run.error else ''}", flush=True)
    finally:
        watcher.stop()
        for n in names:
            with contextlib.suppress(Exception):
                remove_vm(client, n)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--lab-dir", type=Path)
    args = p.parse_args()
    out = run_in_lab("bench/ha_failover.py", args.lab_dir, 3, prefix="fo", subnet_octet=224,
                     control_port=8724, banner=lambda _: f"{VMS} protected VMs, "
                     f"{args.runs} host kills",
                     body=lambda lab: body(lab, args.runs),
                     failed=lambda runs: any(r.error or r.double for r in runs))
    if isinstance(out, int):
        return out
    print(f"\n{'run':>3} {'host':>6} {'VMs':>4} {'detect_s':>9} {'started_s':>10} "
          f"{'failover_s':>11} {'double':>7}")
    for i, r in enumerate(out, 1):
        print(f"{i:>3} {r.victim:>6} {r.moved:>4} {fmt(r.detect_s):>9} "
              f"{fmt(r.started_s):>10} {fmt(r.failover_s):>11} {r.double:>7}")
    detect = [r.detect_s for r in out if r.detect_s is not None]
    failover = [r.failover_s for r in out if r.failover_s is not None]
    failed = sum(1 for r in out if r.error)
    print(f"detect_s={fmt(median(detect))} failover_max_s="
          f"{fmt(max(failover) if failover else None)} double_runs="
          f"{sum(r.double for r in out)} takeover_s=n/a failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
