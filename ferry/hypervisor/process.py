"""Start, watch and stop one QEMU process.

QEMU runs in its own session so that an agent restart does not take the guests
with it; a restarted agent adopts them again from their pidfiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from enum import StrEnum
from pathlib import Path

from ferry.hypervisor.argv import RunPaths
from ferry.hypervisor.errors import QemuStartError
from ferry.hypervisor.monitor import Monitor


class ProcessState(StrEnum):
    NEW = "new"
    RUNNING = "running"
    EXITED = "exited"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


class QemuProcess:
    def __init__(self, name: str, argv: list[str], paths: RunPaths) -> None:
        self.name = name
        self.argv = argv
        self.paths = paths
        self.pid: int | None = None
        self.returncode: int | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def state(self) -> ProcessState:
        if self.pid is None:
            return ProcessState.NEW
        if self._child is not None:
            return ProcessState.RUNNING if self._child.returncode is None else ProcessState.EXITED
        return ProcessState.RUNNING if pid_alive(self.pid) else ProcessState.EXITED

    async def start(self, connect_timeout_s: float = 15.0) -> Monitor:
        """Launch QEMU and return a connected monitor; QemuStartError if it dies."""
        if self.pid is not None:
            raise QemuStartError(f"QEMU for {self.name} was already started")
        self.paths.directory.mkdir(parents=True, exist_ok=True)
        for stale in (self.paths.qmp_socket, self.paths.pidfile, self.paths.serial_log):
            stale.unlink(missing_ok=True)
        with open(self.paths.qemu_log, "ab") as log:  # noqa: ASYNC230 (tiny, local)
            try:
                self._child = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True)
            except OSError as exc:
                raise QemuStartError(f"cannot run {self.argv[0]}: {exc}",
                                     "install qemu-system-x86 on this host") from exc
        self.pid = self._child.pid
        self._reaper = asyncio.create_task(self._reap())
        monitor = Monitor(self.name, self.paths.qmp_socket)
        connect = asyncio.create_task(monitor.connect(connect_timeout_s))
        done, _ = await asyncio.wait({connect, self._reaper}, return_when=asyncio.FIRST_COMPLETED)
        if connect not in done:
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise QemuStartError(f"QEMU for {self.name} exited at start "
                                 f"(code {self.returncode}): {self.log_tail()}")
        try:
            connect.result()
        except Exception as exc:
            await self.kill()
            raise QemuStartError(f"QEMU for {self.name} did not answer on QMP: {exc}; "
                                 f"{self.log_tail()}") from exc
        return monitor

    @classmethod
    async def adopt(cls, name: str, paths: RunPaths) -> tuple[QemuProcess, Monitor] | None:
        """Take over a QEMU left running by a previous agent, if it is still alive."""
        pid = read_pid(paths.pidfile)
        if pid is None or not pid_alive(pid):
            return None
        proc = cls(name, [], paths)
        proc.pid = pid
        monitor = Monitor(name, paths.qmp_socket)
        try:
            await monitor.connect(3.0)
        except Exception:
            return None
        return proc, monitor

    async def _reap(self) -> None:
        assert self._child is not None
        self.returncode = await self._child.wait()

    async def wait(self, timeout_s: float) -> bool:
        """True once the process has exited; False if still running after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.state is ProcessState.RUNNING:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def kill(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after grace_s; returns once the process is gone."""
        if self.pid is None or self.state is not ProcessState.RUNNING:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not await self.wait(grace_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self.wait(5.0)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.paths.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no QEMU log)"
        return " | ".join(text[-lines:]) or "(QEMU printed nothing)"
