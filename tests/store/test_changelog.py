"""The PostgreSQL change_log cursor: no row is ever skipped, and transactions in other databases
do not hold events back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.store import create_engine, upgrade
from defiwatch.store.changelog import Cursor, read_changes

PG = dict(host="127.0.0.1", port=5432, user="postgres")
INSERT = ("INSERT INTO points (metric, subject, chain, ts, value, source) "
          "VALUES ('tvl', $1, '-', $2, 1.0, 'test')")


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(postgres_url)
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


async def subjects(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return [r.subject for r in await read_changes(conn, Cursor(), 100)]


async def test_a_transaction_in_another_database_does_not_hold_rows_back(
    engine: AsyncEngine, postgres_url: str
) -> None:
    other = await asyncpg.connect(database="test", **PG)  # conftest's admin database
    try:
        tx = other.transaction()
        await tx.start()
        await other.fetchval("SELECT pg_current_xact_id()")  # holds an xid, older than ours
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO points (metric, subject, chain, ts, value, source)"
                                     " VALUES ('tvl', 'after', '-', 1700000000, 1.0, 'test')"))
        assert await subjects(engine) == ["after"]
        await tx.rollback()
    finally:
        await other.close()


async def test_an_older_open_transaction_here_holds_later_rows_until_it_commits(
    engine: AsyncEngine, postgres_url: str
) -> None:
    """The case a plain id cursor gets wrong: id 1 commits after id 2."""
    database = postgres_url.rsplit("/", 1)[1]
    slow = await asyncpg.connect(database=database, **PG)
    fast = await asyncpg.connect(database=database, **PG)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute(INSERT, "first", 1_700_000_000)  # gets the lower id and txid
        await fast.execute(INSERT, "second", 1_700_000_001)  # commits at once
        assert await subjects(engine) == []  # "second" waits behind the open transaction
        await tx.commit()
        assert await subjects(engine) == ["first", "second"]
    finally:
        await slow.close()
        await fast.close()
