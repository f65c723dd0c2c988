"""The store's part for DRS: its settings and the placement rules."""

from __future__ import annotations

import json

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.drs import Rule
from ferry.domain.drs_config import DrsConfig
from ferry.domain.errors import Conflict, NotFound
from ferry.power import PowerConfig, parse_power_config
from ferry.store.engine import put_setting
from ferry.store.tables import RuleRow, SettingRow

_KEY = "drs"


class DrsStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def _get(self, key: str) -> str | None:
        async with self._session() as s:
            row = await s.get(SettingRow, key)
            return row.value_json if row else None

    async def _put(self, key: str, value: BaseModel) -> None:
        async with self._session.begin() as s:
            await put_setting(s, key, value.model_dump_json())

    async def config(self) -> DrsConfig:
        stored = await self._get(_KEY)
        return DrsConfig.model_validate_json(stored) if stored else DrsConfig()

    async def set_config(self, config: DrsConfig) -> DrsConfig:
        await self._put(_KEY, config)
        return config

    async def power(self, host: str) -> PowerConfig | None:
        stored = await self._get(f"power:{host}")
        return parse_power_config(json.loads(stored)) if stored else None

    async def set_power(self, host: str, config: PowerConfig) -> PowerConfig:
        await self._put(f"power:{host}", config)
        return config

    async def rules(self) -> list[Rule]:
        async with self._session() as s:
            rows = (await s.scalars(select(RuleRow).order_by(RuleRow.name))).all()
            return [Rule.model_validate_json(r.rule_json) for r in rows]

    async def add_rule(self, rule: Rule) -> Rule:
        exists = Conflict(f"a rule named {rule.name!r} already exists",
                          "pick another name, or remove it first")
        try:
            async with self._session.begin() as s:
                if await s.get(RuleRow, rule.name) is not None:
                    raise exists
                s.add(RuleRow(name=rule.name, rule_json=rule.model_dump_json()))
        except IntegrityError:  # added by another replica since the check
            raise exists from None
        return rule

    async def remove_rule(self, name: str) -> Rule:
        async with self._session.begin() as s:
            row = await s.get(RuleRow, name)
            if row is None:
                raise NotFound(f"no rule {name!r}", "see `ferry rule list`")
            rule = Rule.model_validate_json(row.rule_json)
            await s.delete(row)
            return rule
