"""Adopting a QEMU from its pidfile never takes over (or signals) a process that merely
got the same PID."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ferry.hypervisor.argv import RunPaths
from ferry.hypervisor.process import ProcessState, QemuProcess


async def test_a_reused_pid_is_not_adopted(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "web1")
    paths.directory.mkdir()
    stranger = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 (a test fixture)
    try:
        paths.pidfile.write_text(str(stranger.pid))  # the pidfile now names a stranger
        assert await QemuProcess.adopt("web1", paths) is None
        assert stranger.poll() is None  # untouched
    finally:
        stranger.kill()
        stranger.wait()


async def test_a_pidfd_sees_exit_without_polling(tmp_path: Path) -> None:
    import os

    paths = RunPaths(tmp_path / "web1")
    child = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 (a test fixture)
    proc = QemuProcess("web1", [], paths)
    proc.pid, proc._pidfd = child.pid, os.pidfd_open(child.pid)
    try:
        assert proc.state is ProcessState.RUNNING
        assert not await proc.wait(0.1)
        await proc.kill(grace_s=5.0)
        assert proc.state is ProcessState.EXITED
        assert child.wait(5) != 0
    finally:
        proc.close()
