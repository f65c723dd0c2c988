"""A typed layer over qemu.qmp: the QMP commands Ferry uses, with typed results.

Every call is bounded by a timeout; a QMP error, a timeout or a lost connection
becomes a MonitorError naming the command (CommandFailed with QMP's error class,
MonitorTimeout, MonitorGone), with the original as its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from ferry.domain.migration import Progress, SourceStatus
from ferry.hypervisor.errors import CommandFailed, MonitorError, MonitorGone, MonitorTimeout

COMMAND_TIMEOUT_S = 10.0
# While an incoming stream loads: how often its state is asked again should no MIGRATION
# event come (QEMU sets the runstate before it says `completed`; this only bounds a miss).
INCOMING_RECHECK_S = 0.05


class Monitor:
    """One QMP connection to one QEMU process."""

    def __init__(self, name: str, socket_path: Path) -> None:
        self._name = name
        self._socket = socket_path
        self._client = QMPClient(name)
        self.migration_events = EventListener(("MIGRATION", "MIGRATION_PASS"))
        self.job_events = EventListener(("JOB_STATUS_CHANGE",))
        self._client.register_listener(self.migration_events)
        self._client.register_listener(self.job_events)
        # `cont` commands sent through this monitor, counted before each is sent: what
        # was read of a paused guest is still current while this has not changed.
        self.conts = 0

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect, retrying while QEMU creates its socket, for at most timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await asyncio.wait_for(self._client.connect(str(self._socket)), 2.0)
                return
            except (QMPError, OSError, TimeoutError) as exc:
                if loop.time() >= deadline:
                    raise MonitorError(f"cannot connect to QMP of {self._name} at "
                                       f"{self._socket}: {exc}") from exc
                self._client = self._fresh_client()
                # QEMU makes its socket ~50 ms after exec: a short poll saves a
                # migration's destination most of a step (connects are cheap).
                await asyncio.sleep(0.01)

    def _fresh_client(self) -> QMPClient:
        client = QMPClient(self._name)
        client.register_listener(self.migration_events)
        client.register_listener(self.job_events)
        return client

    async def close(self) -> None:
        # disconnect() re-raises whatever ended the reader (EOFError after quit, ...).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5.0)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        try:
            return await asyncio.wait_for(
                self._client.execute(command, dict(arguments) if arguments else None),
                timeout_s)
        except ExecuteError as exc:
            raise CommandFailed(f"QMP {command} on {self._name} failed: {exc}",
                                exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise MonitorTimeout(f"QMP {command} on {self._name}: no answer within "
                                 f"{timeout_s:.0f} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise MonitorGone(f"QMP {command} on {self._name} failed: the connection is "
                              f"lost ({exc!r})") from exc

    # --- VM state -------------------------------------------------------------
    async def runstate(self) -> str:
        reply = await self.execute("query-status")
        return str(reply["status"])

    async def runstate_loaded(self, wait_s: float) -> str:
        """The runstate, once an incoming stream has stopped loading (`inmigrate`) or
        wait_s passed, whichever first: asked again at each MIGRATION event, so a
        migration's switchover learns of the loaded destination at once, not at its
        next poll. The listener is registered before the first ask: no event is missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        with self._client.listener(("MIGRATION",)) as events:
            while True:
                state = await self.runstate()
                left = deadline - loop.time()
                if state != "inmigrate" or left <= 0:
                    return state
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(events.get(), min(left, INCOMING_RECHECK_S))

    async def cont(self) -> None:
        self.conts += 1
        await self.execute("cont")

    async def quit(self) -> None:
        # QEMU closes the socket as it exits; the reply may never arrive.
        with contextlib.suppress(MonitorError):
            await self.execute("quit", timeout_s=3.0)

    async def powerdown(self) -> None:
        await self.execute("system_powerdown")

    # --- host facts ------------------------------------------------------------
    async def usable_cpu_models(self) -> list[str]:
        defs = await self.execute("query-cpu-definitions")
        return sorted(d["name"] for d in defs if not d.get("unavailable-features"))

    async def machines(self) -> tuple[list[str], dict[str, str]]:
        names: list[str] = []
        aliases: dict[str, str] = {}
        for m in await self.execute("query-machines"):
            names.append(m["name"])
            if "alias" in m:
                aliases[m["alias"]] = m["name"]
        return sorted(names), aliases

    # --- migration -------------------------------------------------------------
    async def set_migration_capabilities(self, caps: Mapping[str, bool]) -> None:
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in caps.items()]})

    async def set_migration_parameters(self, params: Mapping[str, object]) -> None:
        if params:
            await self.execute("migrate-set-parameters", params)

    async def migrate(self, uri: str, resume: bool = False) -> None:
        """Start the outgoing stream; with `resume`, reconnect a paused post-copy."""
        await self.execute("migrate", {"uri": uri, "resume": True} if resume else {"uri": uri})

    async def migrate_recover(self, uri: str) -> None:
        """Destination of a paused post-copy: listen on `uri` for the source to resume."""
        await self.execute("migrate-recover", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        await self.execute("migrate-incoming", {"uri": uri})

    async def listen_incoming(self, address: str, port: int = 0) -> str:
        """Listen for the incoming stream on `address`, on `port` (0: one the kernel
        picks), and return the `tcp:` URI with the port QEMU reports (query-migrate's
        socket-address)."""
        await self.migrate_incoming(f"tcp:{address}:{port}")
        reply = await self.execute("query-migrate")
        for sock in reply.get("socket-address", []):
            if sock.get("type") == "inet" and str(sock.get("port", "0")) != "0":
                return f"tcp:{address}:{int(sock['port'])}"
        raise MonitorError(f"QEMU of {self._name} listens for the incoming migration but "
                           f"does not say on which port ({reply})")

    async def migrate_cancel(self) -> None:
        await self.execute("migrate_cancel")

    async def query_migrate(self) -> Progress:
        return progress_from_reply(await self.execute("query-migrate"))

    async def completed_stats(self, progress: Progress, within_s: float = 1.0) -> Progress:
        """A completed migration's stats once QEMU filled in total-time and downtime: it
        says 'completed' a moment before (the guest is paused on both hosts meanwhile:
        asked again every 2 ms, for at most `within_s`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while progress.elapsed_ms == 0 and loop.time() < deadline:
            await asyncio.sleep(0.002)
            progress = await self.query_migrate()
        return progress


def progress_from_reply(reply: Mapping[str, Any]) -> Progress:
    """query-migrate's loosely shaped reply as a typed Progress."""
    ram: Mapping[str, Any] = reply.get("ram", {})
    return Progress(
        status=SourceStatus(reply.get("status", "none")),
        qemu_status=str(reply.get("status", "none")),
        elapsed_ms=int(reply.get("total-time", 0)),
        dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
        remaining_bytes=int(ram.get("remaining", 0)),
        transferred_bytes=int(ram.get("transferred", 0)),
        total_bytes=int(ram.get("total", 0)),
        dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
        page_size=int(ram.get("page-size", 4096)) or 4096,
        mbps=float(ram.get("mbps", 0.0)),
        expected_downtime_ms=reply.get("expected-downtime"),
        downtime_ms=reply.get("downtime"),
        setup_time_ms=reply.get("setup-time"),
        error=reply.get("error-desc"),
        throttle_pct=int(reply.get("cpu-throttle-percentage", 0)),
        postcopy_requests=int(ram.get("postcopy-requests", 0)),
    )
