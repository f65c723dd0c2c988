"""Persistence (SQLAlchemy 2, async): SQLite by default, any SQLAlchemy URL by option."""

from ferry.store.store import Store

__all__ = ["Store"]
