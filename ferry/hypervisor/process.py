"""Start, watch and stop one QEMU process.

QEMU runs in its own session so that an agent restart does not take the guests
with it; a restarted agent adopts them again from their pidfiles. An adopted process is
held by a pidfd (opened only after its command line proved it is this VM's QEMU), so a
PID reused by another process is never signalled, and its exit is an event, not polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
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


def _is_qemu_of(pid: int, name: str, paths: RunPaths) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return (f"guest={name},".encode() in cmdline
            and str(paths.qmp_socket).encode() in cmdline)


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
        self._pidfd: int | None = None  # an adopted process (not our child)

    @property
    def state(self) -> ProcessState:
        if self.pid is None:
            return ProcessState.NEW
        if self._child is not None:
            return ProcessState.RUNNING if self._child.returncode is None else ProcessState.EXITED
        if self._pidfd is not None:
            # A pidfd turns readable once its process has exited.
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            return ProcessState.EXITED if readable else ProcessState.RUNNING
        return ProcessState.EXITED

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
        """Take over a QEMU left running by a previous agent, if it is still alive and
        still this VM's QEMU (its PID may have been reused by anything since)."""
        pid = read_pid(paths.pidfile)
        if pid is None or not pid_alive(pid):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        if not _is_qemu_of(pid, name, paths):  # checked after pidfd_open: no race
            os.close(pidfd)
            return None
        proc = cls(name, [], paths)
        proc.pid, proc._pidfd = pid, pidfd
        monitor = Monitor(name, paths.qmp_socket)
        try:
            await monitor.connect(3.0)
        except Exception:
            proc.close()
            return None
        return proc, monitor

    def close(self) -> None:
        """Release the pidfd of an adopted process (the process keeps running)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _reap(self) -> None:
        assert self._child is not None
        self.returncode = await self._child.wait()

    async def wait(self, timeout_s: float) -> bool:
        """True once the process has exited; False if still running after timeout_s."""
        if self.state is not ProcessState.RUNNING:
            return True
        if self._reaper is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reaper), timeout_s)
        elif self._pidfd is not None:
            loop = asyncio.get_running_loop()
            exited = asyncio.Event()
            loop.add_reader(self._pidfd, exited.set)
            try:
                await asyncio.wait_for(exited.wait(), timeout_s)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self._pidfd)
        return self.state is not ProcessState.RUNNING

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._child is not None:
                self._child.send_signal(sig)  # our child: its PID cannot be reused yet
            elif self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)

    async def kill(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after grace_s; returns once the process is gone."""
        if self.pid is None or self.state is not ProcessState.RUNNING:
            return
        self._signal(signal.SIGTERM)
        if not await self.wait(grace_s):
            self._signal(signal.SIGKILL)
            await self.wait(5.0)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.paths.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no QEMU log)"
        return " | ".join(text[-lines:]) or "(QEMU printed nothing)"
