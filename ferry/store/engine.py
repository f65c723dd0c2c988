"""The database behind the Store: which one a URL names, its engine, its schema, and the
few statements whose spelling differs between SQLite and PostgreSQL.

SQLite (one file, one control plane) is the default; PostgreSQL serves control planes on
several machines. Everything else in store/ is plain SQLAlchemy and runs on both. What
differs and why:

- SQLite serialises writers (one write transaction at a time, WAL so readers never
  wait); PostgreSQL runs them concurrently at READ COMMITTED, where a read-modify-write
  of a row can lose an update. Every such write therefore locks the row it read
  (`with_for_update`, which SQLite's compiler leaves out: it has no need of it).
- Inserting a row that may already exist is `ON CONFLICT DO NOTHING` in both, but each
  dialect has its own `insert()` that can say it.
- Event ids must become visible in order (a follower reads `id > last seen`): on
  PostgreSQL ids are handed out before commit, so writers of the log take a
  transaction-level advisory lock; on SQLite the write lock already orders them.
- Schema setup: two PostgreSQL control planes starting at once must not both create the
  tables; an advisory lock makes the second wait and then find them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from ferry.store.tables import Base, SettingRow, job_indexes

SQLITE_BUSY_TIMEOUT_MS = 5000
SCHEMA_ATTEMPTS = 5
# Keys of PostgreSQL advisory locks (one 64-bit space per database): any fixed numbers
# nobody else uses; these spell "ferry" and a purpose.
SCHEMA_LOCK = 0x6665727279_01
EVENTS_LOCK = 0x6665727279_02
DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
           "postgres": "postgresql+asyncpg"}


def sqlite_url(path: str) -> str:
    return f"sqlite+aiosqlite:///{path}"


def store_url(value: str) -> str:
    """The SQLAlchemy URL of a store given as a URL or a file path: a path is a SQLite
    file; `sqlite:` and `postgresql:` URLs get the async drivers Ferry uses (aiosqlite,
    asyncpg), so an operator can write the URL every PostgreSQL tool takes."""
    if "://" not in value:
        return sqlite_url(value)
    scheme, rest = value.split("://", 1)
    return f"{DRIVERS.get(scheme, scheme)}://{rest}"


def backend(url: str) -> str:
    """"sqlite" or "postgresql" (or another SQLAlchemy backend's name)."""
    return make_url(store_url(url)).get_backend_name()


def create_engine(url: str) -> AsyncEngine:
    url = store_url(url)
    if backend(url) not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported store {make_url(url).render_as_string()}: "
                         "Ferry's store is SQLite (a file path) or PostgreSQL "
                         "(postgresql://USER@HOST/DB)")
    if backend(url) == "sqlite":
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: a connection the server dropped (a restart, a failover) is replaced
    # before use instead of failing the request that drew it from the pool.
    return create_async_engine(url, pool_pre_ping=True)


async def prepare_schema(engine: AsyncEngine) -> None:
    """Create what is missing: tables, and the columns and indexes later versions added
    to tables an older database already has."""
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            async with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": SCHEMA_LOCK})
                await conn.run_sync(Base.metadata.create_all)
                await conn.run_sync(_add_late_columns)
            return
        except OperationalError:
            # SQLite runs DDL outside any transaction, so a process opening the same
            # new file at once can create a table between our check and our CREATE:
            # every step checks first, so doing it again finishes the job.
            if engine.dialect.name != "sqlite" or attempt == SCHEMA_ATTEMPTS:
                raise
            await asyncio.sleep(0.05 * attempt)


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    """WAL: readers never block the writer (event streams read while jobs write); a busy
    timeout: a writer waits for another's commit instead of failing at once."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _add_late_columns(conn: Connection) -> None:
    """A database made by an older Ferry gets the columns added since (SQLite files from
    before jobs had versions, hosts a standby flag, events a VM). The DDL is spelled
    so both backends take it (FALSE, IF NOT EXISTS)."""
    def columns(table: str) -> set[str]:
        return {c["name"] for c in inspect(conn).get_columns(table)}
    for table in ("migrations", "relocations"):
        if "version" not in columns(table):
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN version INTEGER "
                              "NOT NULL DEFAULT 0"))
    if "standby" not in columns("hosts"):
        conn.execute(text("ALTER TABLE hosts ADD COLUMN standby BOOLEAN NOT NULL "
                          "DEFAULT FALSE"))
    if "vm" not in columns("events"):
        conn.execute(text("ALTER TABLE events ADD COLUMN vm VARCHAR(64)"))
        conn.execute(text("CREATE INDEX IF NOT EXISTS ix_events_vm ON events (vm)"))
    # Indexes are made with their table only: one created later is added here.
    for index in job_indexes():
        index.create(conn, checkfirst=True)


# --- statements whose spelling differs ------------------------------------------------
def _dialect(session: AsyncSession) -> str:
    bind = session.bind
    assert bind is not None, "the Store's sessions are bound to its engine"
    return bind.dialect.name


def _insert(session: AsyncSession, row: type[Base]) -> Any:
    """The dialect's INSERT, which can say ON CONFLICT (both spell it alike)."""
    if _dialect(session) == "postgresql":
        return postgresql.insert(row)
    return sqlite.insert(row)


async def insert_missing(session: AsyncSession, row: type[Base], **values: Any) -> None:
    """Insert a row unless one with its primary key exists (then leave it as it is):
    what a read-modify-write starts with, so that the row is there to lock."""
    await session.execute(_insert(session, row).values(**values).on_conflict_do_nothing())


async def put_setting(session: AsyncSession, key: str, value_json: str) -> None:
    """Set a cluster setting, inserting or replacing its row in one statement (two
    replicas setting one key at once: the later write wins, neither fails)."""
    statement = _insert(session, SettingRow).values(key=key, value_json=value_json)
    await session.execute(statement.on_conflict_do_update(
        index_elements=[SettingRow.key], set_={"value_json": value_json}))


async def order_event_writers(session: AsyncSession) -> None:
    """Make this transaction's event insert commit before any later one gets its id."""
    if _dialect(session) == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                              {"key": EVENTS_LOCK})


__all__ = ["backend", "create_engine", "insert_missing", "order_event_writers",
           "prepare_schema", "put_setting", "sqlite_url", "store_url"]
