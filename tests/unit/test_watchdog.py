"""The host's watchdog (ferry/agent/watchdog.py), as a real process against stand-in
QEMU processes (sleepers whose command line names the VM as QEMU's does)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.agent.watchdog import WatchState, host_qemus, must_kill, write_state


def test_it_fires_only_when_armed_and_not_renewed_for_long_enough() -> None:
    assert not must_kill(None, 100.0)
    assert not must_kill(WatchState(renewed_at=96.0, kill_after_s=4.5, armed=True), 100.0)
    assert must_kill(WatchState(renewed_at=95.0, kill_after_s=4.5, armed=True), 100.0)
    assert not must_kill(WatchState(renewed_at=0.0, kill_after_s=4.5, armed=False), 100.0)
    assert WatchState.parse("{half") is None and WatchState.parse('{"armed": 1}') is None
    state = WatchState(renewed_at=1.5, kill_after_s=4.5, armed=True)
    assert WatchState.parse(state.to_json()) == state


def sleeper(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def vm_dir(run_dir: Path, vm: str, pid: int) -> Path:
    d = run_dir / "vms" / vm
    d.mkdir(parents=True)
    (d / "qemu.pid").write_text(str(pid))
    return d


def wait_locked(path: Path, pid: int, timeout_s: float) -> None:
    """Until the watchdog `pid` holds the lock on `path` (it writes its pid there)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip() == str(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"watchdog {pid} did not take {path} within {timeout_s} s")


def wait_exit(p: subprocess.Popen[bytes], timeout_s: float) -> bool:
    try:
        p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_stale_armed_state_kills_the_hosts_guests_and_nothing_else(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    run_dir = tmp_path / "run"
    guest = sleeper("-name", "guest=vm1,", str(run_dir / "vms" / "vm1"))
    stranger = sleeper("not a qemu")  # its pid in a pidfile must not get it killed
    procs += [guest, stranger]
    vm_dir(run_dir, "vm1", guest.pid)
    vm_dir(run_dir, "vm2", stranger.pid)
    assert host_qemus(run_dir) == [("vm1", guest.pid)]
    write_state(run_dir, WatchState(renewed_at=time.monotonic(), kill_after_s=60.0,
                                    armed=True))
    dog = subprocess.Popen([sys.executable, "-m", "ferry.agent.watchdog",
                            "--run-dir", str(run_dir)])
    procs.append(dog)
    wait_locked(run_dir / "watchdog.lock", dog.pid, 30.0)
    # A second watchdog of the same run directory leaves at once.
    second = subprocess.run([sys.executable, "-m", "ferry.agent.watchdog", "--run-dir",
                             str(run_dir)], timeout=30)
    assert second.returncode == 0
    assert (run_dir / "watchdog.lock").read_text().strip() == str(dog.pid)
    assert not wait_exit(guest, 1.0)  # renewed just now: nothing happens
    write_state(run_dir, WatchState(renewed_at=time.monotonic() - 10, kill_after_s=60.0,
                                    armed=False))
    assert not wait_exit(guest, 1.0)  # not armed (HA off): nothing happens
    write_state(run_dir, WatchState(renewed_at=time.monotonic() - 10, kill_after_s=4.5,
                                    armed=True))
    assert wait_exit(guest, 30.0)  # the agent stopped renewing: the guest is killed
    assert stranger.poll() is None
    assert "killed vm1" in (run_dir / "watchdog.log").read_text()
