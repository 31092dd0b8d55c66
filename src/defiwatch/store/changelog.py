"""Reading change_log from a persisted cursor, exactly once per row and in a safe order.

SQLite serialises writers, so ids are handed out in commit order and "id > cursor" is exact.

PostgreSQL hands out ids at insert time but transactions commit in any order: a reader could see
id 11 committed while id 10 is still in flight, move its cursor past 10 and never see it. So on
PostgreSQL the cursor follows the writing transaction id instead (`txid`, xid8): rows are read in
(txid, id) order, and only from transactions below a horizon: the oldest transaction still
running *that could write here*. Every transaction below it has finished, and any transaction
still to write gets a larger txid, so nothing can appear behind the cursor.

The horizon starts from the statement's snapshot (its in-progress list, or `xmax` when that is
empty) and leaves out transactions that `pg_stat_activity` shows running in another database: a
transaction is bound to one database and can never write this change_log. Anything it cannot
place (a backend whose `backend_xid` it may not see, a prepared transaction) stays in, which
costs latency, never data. Without this, any write transaction anywhere on the server held every
event back until it ended (measured by bench/ingest.py: a 3 s transaction in another database
gave a 2.9 s p99). A long transaction in this database still delays events until it ends
(docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.store.schema import change_log, processor_cursors

__all__ = ["ChangeRow", "Cursor", "insert_changes", "load_cursor", "read_changes", "save_cursor"]


class Cursor(NamedTuple):
    """Position after the last processed row: (txid, id) on PostgreSQL, (0, id) on SQLite."""

    txid: int = 0
    id: int = 0


class ChangeRow(NamedTuple):
    id: int
    txid: int
    kind: str
    metric: str
    subject: str
    chain: str
    ts: int
    value: float | None
    source: str
    detail: Any
    created_at: float


_COLUMNS = "id, kind, metric, subject, chain, ts, value, source, detail, created_at"

# `pg_current_snapshot()` is the statement's snapshot, the same one that decides which rows the
# SELECT sees; an xid8's low 32 bits are the `xid` that pg_stat_activity shows.
_PG_HORIZON = (
    "(SELECT COALESCE(min(x), pg_snapshot_xmax(pg_current_snapshot())) "
    " FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
    " WHERE CAST(CAST(x AS text) AS bigint) % 4294967296 NOT IN ("
    "   SELECT CAST(CAST(backend_xid AS text) AS bigint) FROM pg_stat_activity "
    "   WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()))"
)
_PG_READ = text(
    f"SELECT {_COLUMNS}, CAST(CAST(txid AS text) AS bigint) AS txid_num FROM change_log "
    "WHERE (txid, id) > (CAST(CAST(CAST(:txid AS bigint) AS text) AS xid8), :id) "
    f"AND txid < {_PG_HORIZON} "
    "ORDER BY txid, id LIMIT :limit"
)


async def read_changes(conn: AsyncConnection, cursor: Cursor, limit: int) -> list[ChangeRow]:
    """Up to `limit` rows after `cursor`, in the order they must be processed."""
    if conn.dialect.name == "postgresql":
        result = await conn.execute(_PG_READ, {"txid": cursor.txid, "id": cursor.id, "limit": limit})
        return [
            ChangeRow(r.id, r.txid_num, r.kind, r.metric, r.subject, r.chain, r.ts, r.value,
                      r.source, r.detail, r.created_at)
            for r in result
        ]
    stmt = select(change_log).where(change_log.c.id > cursor.id).order_by(change_log.c.id).limit(limit)
    return [
        ChangeRow(r.id, 0, r.kind, r.metric, r.subject, r.chain, r.ts, r.value, r.source,
                  r.detail, r.created_at)
        for r in await conn.execute(stmt)
    ]


async def insert_changes(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Write change_log rows that no trigger writes (protocol metadata changes)."""
    if rows:
        await conn.execute(change_log.insert(), [{"created_at": time.time(), **r} for r in rows])


async def load_cursor(conn: AsyncConnection, name: str) -> Cursor:
    row = (
        await conn.execute(
            select(processor_cursors.c.position, processor_cursors.c.position_id).where(
                processor_cursors.c.name == name
            )
        )
    ).first()
    return Cursor(int(row[0]), int(row[1])) if row else Cursor()


async def save_cursor(conn: AsyncConnection, name: str, cursor: Cursor) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    values = {"name": name, "position": cursor.txid, "position_id": cursor.id,
              "updated_at": time.time()}
    stmt = dialect.insert(processor_cursors).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"],
        set_={"position": stmt.excluded.position, "position_id": stmt.excluded.position_id,
              "updated_at": stmt.excluded.updated_at},
    )
    await conn.execute(stmt)
