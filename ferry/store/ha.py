"""The store's part for HA: the cluster's HA settings and each VM's restart priority."""

from __future__ import annotations

import json

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.ha import HaSettings, Priority
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
            row = await s.get(SettingRow, key)
            if row is None:
                s.add(SettingRow(key=key, value_json=value))
            else:
                row.value_json = value

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
        # Read-modify-write of one row: priorities change rarely and by hand.
        current = await self.priorities()
        current[vm] = priority
        await self._put(_PRIORITIES, json.dumps({k: v.value for k, v in sorted(current.items())}))

    async def forget(self, vm: str) -> None:
        """A deleted VM's priority goes with it (a new VM of that name starts medium)."""
        current = await self.priorities()
        if current.pop(vm, None) is not None:
            await self._put(_PRIORITIES, json.dumps({k: v.value for k, v in current.items()}))
