"""The migrations build exactly the schema the code queries (store/schema.py), on both databases."""

from __future__ import annotations

import warnings
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.exc import SAWarning

from defiwatch.store import create_engine, upgrade
from defiwatch.store.schema import metadata


def _diff(conn: Connection) -> list[Any]:
    # change_log.txid is xid8 (the commit-order cursor), a type SQLAlchemy does not reflect.
    warnings.filterwarnings("ignore", "Did not recognize type 'xid8'", SAWarning)
    context = MigrationContext.configure(conn, opts={"compare_type": False})
    return [d for d in compare_metadata(context, metadata) if not _expected(d)]


def _expected(difference: Any) -> bool:
    """alembic's own table, and PostgreSQL's change_log.txid with its index (added by 0001 on
    PostgreSQL only, outside the portable schema)."""
    if not isinstance(difference, tuple):
        return False
    kind, *rest = difference
    if kind == "remove_table":
        return bool(rest[0].name == "alembic_version")
    if kind == "remove_index":
        return bool(rest[0].name == "ix_change_log_txid_id")
    if kind == "remove_column":
        return bool(rest[1] == "change_log" and rest[2].name == "txid")
    return False


async def _differences(url: str) -> list[Any]:
    await upgrade(url)
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff)
    finally:
        await engine.dispose()


async def test_sqlite_migrations_match_schema(sqlite_url: str) -> None:
    assert await _differences(sqlite_url) == []


async def test_postgres_migrations_match_schema(postgres_url: str) -> None:
    assert await _differences(postgres_url) == []
