"""QMP failures as typed errors (ferry/hypervisor/monitor.py), against a real QEMU with no
guest: a refused command keeps QMP's error class, a lost connection is MonitorGone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.hypervisor.errors import CommandFailed, MonitorError, MonitorGone
from ferry.hypervisor.monitor import Monitor
from tests.unit.bare_qemu import bare_qemu


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    async with bare_qemu(tmp_path / "qmp.sock") as mon:
        yield mon


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
