"""The store's part for HA: the cluster's HA settings and each VM's restart priority."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.ha import HaSettings, Priority
from ferry.store.engine import insert_missing, put_setting
from ferry.store.tables import SettingRow

_SETTINGS = "ha"
_PRIORITIES = "ha_priorities"  # one JSON object {vm: priority}; absent VMs are medium


class HaStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def _get(self, key: str) -> str | None:
        async with self._session() as s:
            row = await s.get(SettingRow, key)
            return row.value_json if row else None

    async def _put(self, key: str, value: str) -> None:
        async with self._session.begin() as s:
            await put_setting(s, key, value)

    async def _change_priorities(self, change: Callable[[dict[str, str]], None]) -> None:
        """Read-modify-write of the one priorities row in one transaction, the row
        locked: two replicas (or requests) changing two VMs' priorities keep both."""
        async with self._session.begin() as s:
            await insert_missing(s, SettingRow, key=_PRIORITIES, value_json="{}")
            row = await s.get(SettingRow, _PRIORITIES, with_for_update=True)
            assert row is not None
            current: dict[str, str] = json.loads(row.value_json)
            change(current)
            row.value_json = json.dumps(dict(sorted(current.items())))

    async def settings(self) -> HaSettings:
        text = await self._get(_SETTINGS)
        return HaSettings.model_validate_json(text) if text else HaSettings()

    async def set_settings(self, settings: HaSettings) -> HaSettings:
        await self._put(_SETTINGS, settings.model_dump_json())
        return settings

    async def priorities(self) -> dict[str, Priority]:
        text = await self._get(_PRIORITIES)
        return {vm: Priority(p) for vm, p in json.loads(text).items()} if text else {}

    async def set_priority(self, vm: str, priority: Priority) -> None:
        await self._change_priorities(lambda current: current.update({vm: priority.value}))

    async def forget(self, vm: str) -> None:
        """A deleted VM's priority goes with it (a new VM of that name starts medium)."""
        def drop(current: dict[str, str]) -> None:
            current.pop(vm, None)
        await self._change_priorities(drop)
