"""The host's watchdog (ferry/agent/watchdog.py), as a real process against stand-in
QEMU processes (sleepers whose command line names the VM as QEMU's does)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.agent import watchdog
from ferry.agent.kernel_watchdog import KernelWatchdog
from ferry.agent.watchdog import Watch, WatchState, host_qemus, must_kill, write_state


def test_it_fires_only_when_armed_and_not_renewed_for_long_enough() -> None:
    assert not must_kill(None, 100.0)
    assert not must_kill(WatchState(renewed_at=96.0, kill_after_s=4.5, armed=True), 100.0)
    assert must_kill(WatchState(renewed_at=95.0, kill_after_s=4.5, armed=True), 100.0)
    assert not must_kill(WatchState(renewed_at=0.0, kill_after_s=4.5, armed=False), 100.0)
    assert WatchState.parse("{half") is None and WatchState.parse('{"armed": 1}') is None
    state = WatchState(renewed_at=1.5, kill_after_s=4.5, armed=True)
    assert WatchState.parse(state.to_json()) == state


def sleeper(*argv: str) -> subprocess.Popen[bytes]:
    """A process with `argv` on its command line, once it has exec'd (before that, the
    child's /proc cmdline is still the test's own)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if b"time.sleep(120)" in Path(f"/proc/{p.pid}/cmdline").read_bytes():
                return p
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"process {p.pid} did not start")


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


def test_the_kernel_watchdog_is_fed_until_a_killed_qemu_survives(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A regular file stands for the device (the real one would reset this machine): it
    gets a byte every round while all is well, and none once a QEMU the watchdog had to
    kill is still there after SURVIVE_S (here: SIGKILL made to miss)."""
    run_dir = tmp_path / "run"
    guest = sleeper("-name", "guest=vm1,", str(run_dir / "vms" / "vm1"))
    procs.append(guest)
    vm_dir(run_dir, "vm1", guest.pid)
    device_file = tmp_path / "watchdog"
    device_file.write_bytes(b"")
    device = KernelWatchdog(device_file, timeout_s=4)
    assert "timeout is unknown" in device.open()  # a file takes no ioctl
    watch = Watch(run_dir, device)
    now = time.monotonic()
    write_state(run_dir, WatchState(renewed_at=now, kill_after_s=4.5, armed=True))
    for i in range(3):
        watch.tick(now + i * 0.2)
    assert device_file.read_bytes() == b"\0" * 3  # fed: all is well
    monkeypatch.setattr(watchdog, "fire", lambda _: ["vm1"])  # the kill does not take
    for i in range(8):  # stale: kill (missed) every round for 1.4 s
        watch.tick(now + 10 + i * 0.2)
    fed = device_file.read_bytes()
    assert device.silenced and fed.count(b"\0") < 3 + 8
    assert (run_dir / "watchdog.log").read_text().count("survived SIGKILL") == 1
    watch.tick(now + 20)
    assert device_file.read_bytes() == fed  # silent for good: the kernel resets the host
    device.disarm()  # (only so that this test's file is closed)
    assert device_file.read_bytes().endswith(b"V")
    assert guest.poll() is None


def test_a_stop_on_purpose_disarms_the_kernel_watchdog(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    run_dir = tmp_path / "run"
    device_file = tmp_path / "watchdog"
    device_file.write_bytes(b"")
    dog = subprocess.Popen([sys.executable, "-m", "ferry.agent.watchdog", "--run-dir",
                            str(run_dir), "--kernel-watchdog", str(device_file)])
    procs.append(dog)
    wait_locked(run_dir / "watchdog.lock", dog.pid, 30.0)
    deadline = time.monotonic() + 30
    while device_file.read_bytes().count(b"\0") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert device_file.read_bytes().count(b"\0") >= 2  # fed while running
    dog.terminate()
    assert wait_exit(dog, 30.0)
    assert device_file.read_bytes().endswith(b"V")  # the magic close: no reset
