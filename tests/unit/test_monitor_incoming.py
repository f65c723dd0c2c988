"""Monitor.runstate_loaded against two real QEMUs with no guest (-machine none): it
answers once the incoming stream is loaded, and at its deadline while nothing comes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tests.unit.bare_qemu import bare_qemu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_answers_once_the_stream_is_loaded_and_at_the_deadline_before(
        tmp_path: Path) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    async with bare_qemu(tmp_path / "src.sock") as src, \
            bare_qemu(tmp_path / "dst.sock", "-incoming", "defer") as dst:
        await dst.execute("migrate-incoming", {"uri": uri})
        # Nothing sent yet: the wait ends at its deadline, still loading.
        assert await dst.runstate_loaded(0.2) == "inmigrate"
        waiting = asyncio.create_task(dst.runstate_loaded(60.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await src.execute("migrate", {"uri": uri})
        # Answered by the stream's end, not the 60 s deadline (that would say inmigrate).
        state = await asyncio.wait_for(waiting, 30.0)
        assert state != "inmigrate"
        assert state == await dst.runstate()
