"""Writing and reading points."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.domain import Point, SeriesKey
from defiwatch.store.schema import points

__all__ = ["insert_points", "load_history"]


async def insert_points(conn: AsyncConnection, batch: Sequence[Point]) -> list[bool]:
    """Insert points, skipping any (series, ts) already stored; True per input that was new.

    A repeat inside the batch counts as a duplicate of its first occurrence. The capture trigger
    writes change_log rows for the new ones in this same transaction.
    """
    first: dict[tuple[str, str, str, int], int] = {}
    for i, p in enumerate(batch):
        first.setdefault((p.metric, p.subject, p.chain, p.ts), i)
    if not first:
        return []
    rows = [
        {"metric": p.metric, "subject": p.subject, "chain": p.chain, "ts": p.ts,
         "value": p.value, "source": p.source}
        for i, p in enumerate(batch)
        if first[(p.metric, p.subject, p.chain, p.ts)] == i
    ]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(points)
        .on_conflict_do_nothing(index_elements=["metric", "subject", "chain", "ts"])
        .returning(points.c.metric, points.c.subject, points.c.chain, points.c.ts)
    )
    returned = (await conn.execute(stmt, rows)).all()
    if len(returned) == len(rows) and len(rows) == len(batch):
        return [True] * len(batch)  # the common case: all new, no set to build
    inserted = {tuple(r) for r in returned}
    return [
        first[(p.metric, p.subject, p.chain, p.ts)] == i
        and (p.metric, p.subject, p.chain, p.ts) in inserted
        for i, p in enumerate(batch)
    ]


async def load_history(
    conn: AsyncConnection, series: SeriesKey, *, before: int, seconds: int
) -> list[tuple[int, float]]:
    """Points of `series` with ts in [before - seconds, before), oldest first."""
    stmt = (
        select(points.c.ts, points.c.value)
        .where(
            and_(
                points.c.metric == series.metric,
                points.c.subject == series.subject,
                points.c.chain == series.chain,
                points.c.ts >= before - seconds,
                points.c.ts < before,
            )
        )
        .order_by(points.c.ts)
    )
    return [(int(ts), float(v)) for ts, v in (await conn.execute(stmt)).all()]
