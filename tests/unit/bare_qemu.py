"""A real QEMU with no guest (-machine none) and a Monitor on it, for the monitor's tests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.hypervisor.monitor import Monitor

QEMU = shutil.which("qemu-system-x86_64")


@contextlib.asynccontextmanager
async def bare_qemu(sock: Path, *extra: str) -> AsyncIterator[Monitor]:
    """QEMU stopped before it starts (-S), its QMP at `sock`; killed on exit."""
    if QEMU is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make deps`")
    proc = await asyncio.create_subprocess_exec(
        QEMU, "-nodefaults", "-display", "none", "-machine", "none", "-S", "-qmp",
        f"unix:{sock},server=on,wait=off", *extra, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    mon = Monitor(sock.name, sock)
    try:
        await mon.connect(timeout_s=20.0)
        yield mon
    finally:
        await mon.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it quit by itself
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
