"""The host's watchdog: stop this host's guests when its agent stops renewing leases.

With HA on, a VM runs only while its host holds the VM's lease (ferry/agent/leases.py).
An agent that hangs (a deadlock, SIGSTOP) or dies stops renewing, but its QEMU processes
go on running the guests; once the leases expire another host restarts them: two
copies. The agent's own fencing needs a working agent. So a separate small process
(this one, started by the agent, surviving it) reads a state file the agent writes after
every renewal round that proved its leases, and SIGKILLs every QEMU of the host's run
directory once the agent has not renewed for `kill_after_s`: after the agent itself would
have paused them (fence_s), before any other host may take the leases (expire_s). It is
armed only while the agent says so: HA enabled and at least one lease held.

sanlock does the same to the processes holding its leases, with wdmd and the kernel
watchdog covering sanlock itself. Here the kernel watchdog is optional (agent config
`kernel_watchdog`; see kernel_watchdog.py): fed every round, it resets the host when this
process stops or a QEMU it killed does not die. The lab never sets it (its hosts share
one kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.agent.kernel_watchdog import DEFAULT_TIMEOUT_S, KernelWatchdog

STATE_FILE = "watchdog.json"
LOCK_FILE = "watchdog.lock"
LOG_FILE = "watchdog.log"
POLL_S = 0.2
SURVIVE_S = 1.0  # a SIGKILLed QEMU still there after this is stuck in the kernel


@dataclass(frozen=True)
class WatchState:
    """What the agent last wrote: when it last proved its leases (time.monotonic(),
    one clock for every process of the machine), how long the watchdog may wait after
    that, and whether it is armed at all."""

    renewed_at: float
    kill_after_s: float
    armed: bool

    def to_json(self) -> str:
        return json.dumps({"renewed_at": self.renewed_at, "kill_after_s": self.kill_after_s,
                           "armed": self.armed})

    @classmethod
    def parse(cls, text: str) -> WatchState | None:
        try:
            data = json.loads(text)
            return cls(float(data["renewed_at"]), float(data["kill_after_s"]),
                       bool(data["armed"]))
        except (ValueError, KeyError, TypeError):
            return None


def must_kill(state: WatchState | None, now: float) -> bool:
    """Whether the host's guests must die now: armed, and not renewed for too long."""
    return state is not None and state.armed and now - state.renewed_at > state.kill_after_s


def write_state(run_dir: Path, state: WatchState) -> None:
    """Atomically (the watchdog never reads half a file)."""
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, run_dir / STATE_FILE)


def host_qemus(run_dir: Path) -> list[tuple[str, int]]:
    """(VM, pid) of every QEMU this host's agent started: each VM directory's pidfile,
    checked against the process's command line (a pid reused by another process is
    never killed)."""
    found = []
    for pidfile in sorted((run_dir / "vms").glob("*/qemu.pid")):
        vm = pidfile.parent.name
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"guest={vm},".encode() in cmdline and str(pidfile.parent).encode() in cmdline:
            found.append((vm, pid))
    return found


def fire(run_dir: Path) -> list[str]:
    """SIGKILL every QEMU of the host; returns the VMs killed."""
    killed = []
    for vm, pid in host_qemus(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(vm)
    return killed


def _log(run_dir: Path, line: str) -> None:
    with open(run_dir / LOG_FILE, "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


@dataclass
class Watch:
    """One host's watch, a round at a time (`tick`): kill the guests when the agent's
    leases are stale, and keep the kernel watchdog (if any) fed only while nothing is
    wrong that a kill could not fix."""

    run_dir: Path
    device: KernelWatchdog | None = None
    survived_since: float | None = None  # a killed QEMU still there since then

    def tick(self, now: float) -> None:
        try:
            state = WatchState.parse((self.run_dir / STATE_FILE).read_text())
        except OSError:
            state = None
        if must_kill(state, now):
            killed = fire(self.run_dir)
            if killed:
                assert state is not None
                _log(self.run_dir, f"leases not renewed for {now - state.renewed_at:.1f} s: "
                     f"killed {', '.join(killed)}")
            left = host_qemus(self.run_dir)
            if not left:
                self.survived_since = None
            elif self.survived_since is None:
                self.survived_since = now
            elif now - self.survived_since > SURVIVE_S and self.device is not None \
                    and not self.device.silenced:  # said and done once
                _log(self.run_dir, f"{', '.join(vm for vm, _ in left)} survived SIGKILL "
                     "for 1 s: no longer feeding the kernel watchdog (the host resets)")
                self.device.stop_feeding()
        else:
            self.survived_since = None
        if self.device is not None and not self.device.silenced:
            self.device.pet()


def run(run_dir: Path, poll_s: float = POLL_S, device: KernelWatchdog | None = None
        ) -> None:
    """Watch until killed. One watchdog per run directory: a second one (an agent that
    restarted while the first still runs) leaves at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    lock.truncate(0)  # whose it is, for an operator (and the tests)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    if device is not None:
        _log(run_dir, device.open())

        def stop(_signum: int, _frame: object) -> None:
            device.disarm()  # a stop on purpose: the host must not reset
            raise SystemExit(0)
        signal.signal(signal.SIGTERM, stop)
    watch = Watch(run_dir, device)
    while True:
        watch.tick(time.monotonic())
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ferry-watchdog", description="Kill this host's QEMU processes when the "
        "agent stops renewing their HA leases (started by ferry-agent).")
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="the agent's run directory")
    parser.add_argument("--kernel-watchdog", type=Path, default=None,
                        help="a watchdog device (/dev/watchdog) to feed while all is well: "
                        "the host resets if this process stops or a killed QEMU survives")
    parser.add_argument("--kernel-timeout", type=int, default=DEFAULT_TIMEOUT_S,
                        help=f"the device's timeout in seconds (default {DEFAULT_TIMEOUT_S})")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    device = (KernelWatchdog(args.kernel_watchdog, args.kernel_timeout)
              if args.kernel_watchdog is not None else None)
    run(args.run_dir, device=device)


if __name__ == "__main__":
    main()
