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
watchdog covering sanlock itself; no kernel watchdog is used here (none in the lab's
sandbox), so a hung watchdog is not covered.
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

STATE_FILE = "watchdog.json"
LOCK_FILE = "watchdog.lock"
LOG_FILE = "watchdog.log"
POLL_S = 0.2


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


def run(run_dir: Path, poll_s: float = POLL_S) -> None:
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
    while True:
        try:
            state = WatchState.parse((run_dir / STATE_FILE).read_text())
        except OSError:
            state = None
        if must_kill(state, time.monotonic()):
            killed = fire(run_dir)
            if killed:
                assert state is not None
                with open(run_dir / LOG_FILE, "a") as log:
                    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} leases not renewed "
                              f"for {time.monotonic() - state.renewed_at:.1f} s: killed "
                              f"{', '.join(killed)}\n")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ferry-watchdog", description="Kill this host's QEMU processes when the "
        "agent stops renewing their HA leases (started by ferry-agent).")
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="the agent's run directory")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    run(args.run_dir)


if __name__ == "__main__":
    main()
