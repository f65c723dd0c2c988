"""Persistence (SQLAlchemy 2, async): a SQLite file by default, PostgreSQL by URL."""

from ferry.store.store import Store

__all__ = ["Store"]
