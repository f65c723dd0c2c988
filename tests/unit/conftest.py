"""The store's backends for the tests that take `db_url`: each such test runs once on a
SQLite file and once on a fresh database of a private PostgreSQL server, started the
first time a test needs it and stopped at the end of the session (ferry/lab/postgres.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ferry.lab.postgres import BIN, PostgresServer, private_server
from ferry.store.engine import sqlite_url

BACKENDS = ("sqlite", "postgresql")
_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if not (BIN / "initdb").exists():
        message = (f"no PostgreSQL server in {BIN}: install Debian's `postgresql` "
                   "(scripts/install-deps.sh does)")
        # As root `make test` installs it: its absence there is a broken machine, not a
        # reason to quietly test one backend.
        if os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message)
    # A SIGTERM (a CI timeout) is an interrupt (tests/conftest.py): the server is
    # stopped on the way out as after Ctrl-C.
    with private_server() as server:
        yield server


async def _admin(server: PostgresServer, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: autocommit.
    engine = create_async_engine(server.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL of an empty database on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(str(tmp_path / "ferry.db"))
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"ferry_test_{os.getpid()}_{next(_databases)}"
    await _admin(server, f'CREATE DATABASE "{name}"')
    yield server.url(name)
    # FORCE: a test that failed may have left a connection open.
    await _admin(server, f'DROP DATABASE "{name}" WITH (FORCE)')
