"""The store's part for the leader lease: read the row, write it by compare-and-set.
Who may write what is decided in ferry/domain/leader.py."""

from __future__ import annotations

from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ferry.domain.errors import NotLeader
from ferry.domain.leader import LeaderLease
from ferry.store.engine import insert_missing
from ferry.store.tables import LeaderRow

LEASE = "control"


class LeaderStore:
    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def read(self) -> LeaderLease:
        """The lease row (an empty lease the first time: no leader yet)."""
        async with self._session.begin() as s:
            await insert_missing(s, LeaderRow, name=LEASE, holder="", expires_at=0.0,
                                 token=0, version=0)
        async with self._session() as s:
            row = await s.get(LeaderRow, LEASE)
            assert row is not None
            return LeaderLease(holder=row.holder, expires_at=row.expires_at,
                               token=row.token, version=row.version)

    async def write(self, read: LeaderLease, new: LeaderLease) -> bool:
        """Write `new` if the row is still as `read` (its version): True if it landed.
        Of replicas that read one version, one write lands."""
        async with self._session.begin() as s:
            result = await s.execute(
                update(LeaderRow)
                .where(LeaderRow.name == LEASE, LeaderRow.version == read.version)
                .values(holder=new.holder, expires_at=new.expires_at, token=new.token,
                        version=new.version))
            return getattr(result, "rowcount", 0) == 1


def in_term(token: int) -> ColumnElement[bool]:
    """A WHERE condition true only while the lease row's fencing token is `token`: a
    write carrying it lands in that leader's term and not after a newer term began."""
    return exists(select(LeaderRow.name).where(LeaderRow.name == LEASE,
                                               LeaderRow.token == token))


def fenced(token: int | None, current: int | None = None) -> NotLeader:
    """The refusal of a job write by a control plane whose term is over (or never was)."""
    now = f"; the lease is in term {current}" if current is not None else ""
    held = f"term {token}" if token is not None else "no term"
    return NotLeader(
        f"this control plane holds {held} of the leader lease and may no longer write "
        f"jobs{now}", "the leading replica drives the job; nothing was written")


async def current_token(s: AsyncSession) -> int | None:
    return (await s.scalars(select(LeaderRow.token).where(LeaderRow.name == LEASE))).first()
