"""The store's part for VM networks: one row per cluster network."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.errors import Conflict, NotFound
from ferry.domain.networks import NetworkSpec
from ferry.store.tables import NetworkRow


class VniTaken(Conflict):
    """Another network got the VNI between the check and the insert."""


class NetworkStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def add(self, spec: NetworkSpec) -> NetworkSpec:
        try:
            async with self._session.begin() as s:
                if await s.get(NetworkRow, spec.name) is not None:
                    raise Conflict(f"network {spec.name} already exists",
                                   "pick another name, or delete it first")
                s.add(NetworkRow(name=spec.name, vni=spec.vni,
                                 spec_json=spec.model_dump_json()))
        except IntegrityError:  # the VNI, raced by another create
            raise VniTaken(f"VNI {spec.vni} is already used by another network",
                           "give another --vni, or leave it out to get a free one") from None
        return spec

    async def all(self) -> list[NetworkSpec]:
        async with self._session() as s:
            rows = (await s.scalars(select(NetworkRow).order_by(NetworkRow.name))).all()
            return [NetworkSpec.model_validate_json(r.spec_json) for r in rows]

    async def get(self, name: str) -> NetworkSpec:
        async with self._session() as s:
            row = await s.get(NetworkRow, name)
            if row is None:
                raise NotFound(f"no network {name!r}", "see `ferry network list`")
            return NetworkSpec.model_validate_json(row.spec_json)

    async def delete(self, name: str) -> None:
        async with self._session.begin() as s:
            row = await s.get(NetworkRow, name)
            if row is None:
                raise NotFound(f"no network {name!r}", "see `ferry network list`")
            await s.delete(row)
