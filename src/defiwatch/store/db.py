"""Engine creation, tuned per database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = [
    "DATABASE_ERRORS", "chunks", "create_engine", "database_unreachable", "dialect_insert",
    "is_postgres", "on_postgres", "raw_dsn", "read_retrying", "row_dict",
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


# What a request can raise when the database is down or dropping connections: the classes the
# API registers its 503 handler for (`database_unreachable` then decides from the details).
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.DBAPIError, sa_exc.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
)

# asyncpg's own "cannot talk to the server" errors: SQLSTATE class 08 (connection exception),
# 57P01-57P03 (admin or crash shutdown, cannot connect now: a restart), 53300 (too many clients).
_ASYNCPG_UNREACHABLE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached (so retrying later may work),
    rather than a bad statement or a bug.

    True for connection refused, reset or closed, timeouts (connect, pool checkout), a server
    shutting down or starting up, and any SQLAlchemy error whose connection was invalidated;
    the exception, its `orig` and its causes are all looked at, since SQLAlchemy and asyncpg
    wrap one another.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, (OSError, sa_exc.TimeoutError, *_ASYNCPG_UNREACHABLE)):
            return True  # OSError covers refused/reset connections and TimeoutError
        if isinstance(err, asyncpg.InterfaceError) and "connection" in str(err).lower():
            return True  # "connection is closed", "... was closed in the middle of operation"
        pending += [getattr(err, "orig", None), err.__cause__, err.__context__]
    return False


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the processor and ingest write; NORMAL sync is durable across
    # process crashes (only an OS crash can lose the last commits), which is the embedded promise.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
