"""Async engine and session factory for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.dml import Insert


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # A writer waits up to 30 s for another (the service's worker and an operator's command share the
    # file; at 5 s a command failed with "database is locked" on a loaded machine, once in four suite runs).
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}


def async_url(database_url: str) -> URL:
    """The URL with an async driver: `postgresql://…` as most tools write it means asyncpg here."""
    url = make_url(database_url)
    return url.set(drivername=ASYNC_DRIVERS.get(url.drivername, url.drivername))


def create_engine(database_url: str) -> AsyncEngine:
    """An engine for the URL; SQLite gets foreign keys, WAL and a busy timeout, and its folder."""
    url = async_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def insert_or_ignore(session: AsyncSession, table: Any, conflict_columns: list[str]) -> Insert:
    """INSERT … ON CONFLICT (conflict_columns) DO NOTHING, in the session's dialect (PostgreSQL or SQLite)."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing(index_elements=conflict_columns)
