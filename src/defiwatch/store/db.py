"""Engine creation, tuned per database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = [
    "chunks", "create_engine", "dialect_insert", "is_postgres", "on_postgres", "raw_dsn",
    "read_retrying", "row_dict",
]

T = TypeVar("T")


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


def on_postgres(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


def dialect_insert(conn: AsyncConnection, table: Any) -> Any:
    """The dialect's INSERT, which both databases give on_conflict_do_nothing / _do_update."""
    return (postgresql if on_postgres(conn) else sqlite).insert(table)


def row_dict(row: Any) -> dict[str, Any]:
    """A result row as a plain dict. Column keys may be SQLAlchemy's quoted_name, a str
    subclass msgspec does not take as str."""
    return {str(k): v for k, v in row._mapping.items()}


def chunks(items: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """IN lists in pieces: SQLite allows 32,766 bound parameters, asyncpg 32,767."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def raw_dsn(url: str) -> str:
    """The URL without the SQLAlchemy driver suffix, for asyncpg's own LISTEN connection."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 10, pre_ping: bool = True) -> AsyncEngine:
    """An async engine; for SQLite the file's folder is created and WAL mode switched on.

    `pre_ping=False` is for per-request reads on hot paths (asyncpg's ping costs three round
    trips per checkout): run them through `read_retrying`, which retries once on a connection
    the server dropped."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size,
                               pool_pre_ping=pre_ping)


async def read_retrying(engine: AsyncEngine, read: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run a one-statement read in autocommit; a connection found dead (a database restart
    since it was pooled) is discarded and the read runs once more on a fresh one."""
    for attempt in (1, 2):
        try:
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await read(conn)
        except DBAPIError as exc:
            if not exc.connection_invalidated or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the processor and ingest write; NORMAL sync is durable across
    # process crashes (only an OS crash can lose the last commits), which is the embedded promise.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
