"""QMP failures as typed errors (ferry/hypervisor/monitor.py), against a real QEMU with no
guest: a refused command keeps QMP's error class, a lost connection is MonitorGone."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.hypervisor.errors import CommandFailed, MonitorError, MonitorGone
from ferry.hypervisor.monitor import Monitor

QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    if QEMU is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make deps`")
    sock = tmp_path / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        QEMU, "-nodefaults", "-display", "none", "-machine", "none", "-S", "-qmp",
        f"unix:{sock},server=on,wait=off", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    mon = Monitor("test", sock)
    try:
        await mon.connect(timeout_s=20.0)
        yield mon
    finally:
        await mon.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it quit by itself
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_refused_command_keeps_qmps_error_class(monitor: Monitor) -> None:
    with pytest.raises(CommandFailed) as refused:
        await monitor.execute("no-such-command")
    assert refused.value.error_class == "CommandNotFound"
    with pytest.raises(CommandFailed) as missing:
        await monitor.execute("block-export-del", {"id": "nothing"})
    assert missing.value.error_class == "GenericError"
    assert "not found" in missing.value.desc.lower()
    assert await monitor.runstate() == "prelaunch"  # the monitor still works


async def test_a_lost_connection_is_not_a_refusal(monitor: Monitor) -> None:
    await monitor.quit()
    await asyncio.sleep(0.2)
    with pytest.raises(MonitorError) as lost:
        await monitor.execute("query-status")
    assert isinstance(lost.value, MonitorGone) and not isinstance(lost.value, CommandFailed)
