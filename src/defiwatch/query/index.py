"""The query read model: `query_latest` and `query_snapshot`, kept in step with change_log.

Why a read model: the `protocols` dataset and the DefiLlama-compatible snapshot routes need,
per protocol, the newest total TVL, its 1h/24h/7d changes and its token's market cap. Computed
from `points` on every request that is ~5 index probes per protocol (60 ms for 4,000 protocols
on PostgreSQL, measured); from these tables it is one scan of a few thousand rows.

Why on demand, not on ingest: nothing on the ingest path gets slower, and the tables are
exactly as fresh as a reader needs. The query service probes change_log on each request
(freshness.py); when change_log moved past `query_refresh.watermark`, `refresh()` applies the
new rows before the query reads. Refreshes are serialised across processes by first updating
the `query_refresh` row (a row lock on PostgreSQL, the write lock on SQLite), then reading the
watermark, so two API processes never interleave an older recompute over a newer one.

Windowed changes follow domain/changes.py exactly: the reference for a window W is the newest
point in [ts - 1.5 W, ts - W], and the change is `pct_change(value, reference)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Histogram
from sqlalchemy import ColumnElement, Select, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from defiwatch.domain import NO_CHAIN
from defiwatch.domain.changes import WINDOWS, pct_change
from defiwatch.query.freshness import ChangeRow, capture, changes_since
from defiwatch.store.db import chunks
from defiwatch.store.schema import points, protocols, query_latest, query_refresh, query_snapshot

__all__ = ["REFRESH_SECONDS", "ReadModel", "RefreshReport", "chain_observations",
           "window_references"]

log = structlog.get_logger(__name__)

REFRESH_SECONDS = Histogram(
    "defiwatch_query_index_refresh_seconds",
    "Time to bring the query read model up to date, by mode (full rebuild or incremental)",
    ["mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_INDEX = "index"
_COIN_PREFIX = "coingecko:"


@dataclass(frozen=True, slots=True)
class RefreshReport:
    mode: str  # "full", "incremental" or "none"
    changes: int  # change_log rows applied
    protocols: int  # snapshot rows recomputed
    seconds: float


class ReadModel:
    """Maintains the read model tables from change_log (see module docstring).

    Args:
        engine: the database.
        max_incremental: beyond this many new change_log rows a full rebuild is cheaper.
        chunk: slugs per recompute statement (bounded IN lists).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_incremental: int = 50_000,
        chunk: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._max_incremental = max_incremental
        self._chunk = chunk
        self._clock = clock
        # One refresh at a time per process; across processes the query_refresh row lock.
        self._lock = asyncio.Lock()

    async def refresh(self) -> RefreshReport:
        """Apply every change_log row committed since the last refresh (or rebuild)."""
        async with self._lock:
            started = time.perf_counter()
            async with self._engine.begin() as conn:
                mode, changes, slugs = await self._refresh(conn)
            seconds = time.perf_counter() - started
            REFRESH_SECONDS.labels(mode).observe(seconds)
            if mode == "full":
                log.info("query.index_rebuilt", protocols=slugs, seconds=round(seconds, 3))
            elif mode == "incremental":
                log.debug("query.index_refreshed", changes=changes, protocols=slugs,
                          seconds=round(seconds, 4))
            return RefreshReport(mode, changes, slugs, seconds)

    async def _refresh(self, conn: AsyncConnection) -> tuple[str, int, int]:
        now = self._clock()
        # The first statement writes: it takes the row lock (PostgreSQL) or the database write
        # lock (SQLite) before anything is read, so concurrent refreshes run one after another
        # and each reads the watermark its predecessor committed.
        locked = await conn.execute(
            update(query_refresh).where(query_refresh.c.name == _INDEX).values(locked_at=now))
        if locked.rowcount == 0:
            await conn.execute(insert(query_refresh).values(
                name=_INDEX, watermark=None, locked_at=now, refreshed_at=0.0))
        old = (await conn.execute(select(query_refresh.c.watermark).where(
            query_refresh.c.name == _INDEX))).scalar_one()
        new = await capture(conn)
        if old == new:
            return "none", 0, 0
        mode, changes, slugs = "full", 0, 0
        if old is not None:
            rows, gap = await changes_since(conn, old, limit=self._max_incremental + 1)
            if not gap and len(rows) <= self._max_incremental:
                mode, changes = "incremental", len(rows)
                slugs = await self._apply(conn, rows)
        if mode == "full":
            slugs = await self._rebuild(conn)
        await conn.execute(update(query_refresh).where(query_refresh.c.name == _INDEX).values(
            watermark=new, refreshed_at=now))
        return mode, changes, slugs

    async def _rebuild(self, conn: AsyncConnection) -> int:
        await conn.execute(delete(query_latest))
        await conn.execute(delete(query_snapshot))
        if conn.dialect.name == "postgresql":
            # All-descending order matches a backward scan of the (metric, subject, chain, ts)
            # unique index, so DISTINCT ON streams instead of sorting every point.
            await conn.execute(text(
                "INSERT INTO query_latest (metric, subject, chain, ts, value) "
                "SELECT DISTINCT ON (metric, subject, chain) metric, subject, chain, ts, value "
                "FROM points ORDER BY metric DESC, subject DESC, chain DESC, ts DESC"))
        else:
            # SQLite documents that a bare column next to max() comes from the row holding the
            # maximum, which is exactly the newest point's value.
            await conn.execute(text(
                "INSERT INTO query_latest (metric, subject, chain, ts, value) "
                "SELECT metric, subject, chain, max(ts), value FROM points "
                "GROUP BY metric, subject, chain"))
        if conn.dialect.name == "postgresql":
            # The table was filled in this transaction: without statistics the planner
            # scanned all of it once per chunk below (80 s for 57,000 protocols, measured).
            await conn.execute(text("ANALYZE query_latest"))
        slugs = set((await conn.execute(select(protocols.c.slug))).scalars())
        slugs |= set((await conn.execute(select(query_latest.c.subject).where(
            query_latest.c.metric == "tvl", query_latest.c.chain == NO_CHAIN))).scalars())
        await self._recompute(conn, sorted(slugs), everything=True)
        return len(slugs)

    async def _apply(self, conn: AsyncConnection, rows: Sequence[ChangeRow]) -> int:
        newest: dict[tuple[str, str, str], tuple[int, float]] = {}
        slugs: set[str] = set()
        coins: set[str] = set()
        for r in rows:
            if r.kind == "protocol":
                slugs.add(r.subject)
                continue
            if r.value is None:
                continue
            key = (r.metric, r.subject, r.chain)
            if key not in newest or r.ts > newest[key][0]:
                newest[key] = (int(r.ts), float(r.value))
            if r.metric == "tvl" and r.chain == NO_CHAIN:
                slugs.add(r.subject)
            elif r.metric == "mcap" and r.subject.startswith(_COIN_PREFIX):
                coins.add(r.subject.removeprefix(_COIN_PREFIX))
        if newest:
            values = [{"metric": m, "subject": s, "chain": c, "ts": ts, "value": v}
                      for (m, s, c), (ts, v) in sorted(newest.items())]
            for i in range(0, len(values), 1_000):
                await conn.execute(_upsert_latest(conn.dialect.name), values[i : i + 1_000])
        for part in chunks(sorted(coins), self._chunk):
            slugs |= set((await conn.execute(select(protocols.c.slug).where(
                protocols.c.gecko_id.in_(part)))).scalars())
        await self._recompute(conn, sorted(slugs))
        return len(slugs)

    async def _recompute(self, conn: AsyncConnection, slugs: Sequence[str], *,
                         everything: bool = False) -> None:
        """Recompute the snapshot rows of `slugs` (`everything`: they are all protocols, so
        read each table once instead of in bounded IN lists)."""
        dialect = conn.dialect.name
        parts: Iterable[Sequence[str] | None] = [None] if everything else chunks(
            slugs, self._chunk)
        for part in parts:
            tvl = {r.subject: r for r in await conn.execute(_tvl_with_references(part))}
            gecko_q = select(protocols.c.slug, protocols.c.gecko_id).where(
                protocols.c.gecko_id.is_not(None))
            if part is not None:
                gecko_q = gecko_q.where(protocols.c.slug.in_(part))
            gecko = dict((await conn.execute(gecko_q)).tuples().all())
            mcap_q = select(query_latest.c.subject, query_latest.c.ts, query_latest.c.value).where(
                query_latest.c.metric == "mcap", query_latest.c.chain == NO_CHAIN)
            coin_ids = sorted({_COIN_PREFIX + g for g in gecko.values() if g})
            if part is not None:
                mcap_q = mcap_q.where(query_latest.c.subject.in_(coin_ids))
            mcap: dict[str, tuple[int, float]] = {}
            if coin_ids:
                mcap = {s: (int(ts), float(v)) for s, ts, v in await conn.execute(mcap_q)}
            rows: list[dict[str, Any]] = []
            for slug in part if part is not None else slugs:
                t = tvl.get(slug)
                m = mcap.get(_COIN_PREFIX + gecko[slug]) if gecko.get(slug) else None
                row: dict[str, Any] = {
                    "slug": slug, "tvl": None, "tvl_ts": None, "change_1h": None,
                    "change_24h": None, "change_7d": None,
                    "mcap": m[1] if m else None, "mcap_ts": m[0] if m else None,
                }
                if t is not None:
                    row.update(tvl=float(t.value), tvl_ts=int(t.ts))
                    for name in WINDOWS:
                        ref = getattr(t, f"ref_{name}")
                        row[name] = None if ref is None else pct_change(float(t.value), float(ref))
                rows.append(row)
            for i in range(0, len(rows), 5_000):
                await conn.execute(_upsert_snapshot(dialect), rows[i : i + 5_000])




def chain_observations() -> Select[Any]:
    """Per protocol (`subject`), the newest time (`ts`) its per-chain TVL was observed.

    The chains of `query_latest` stamped with that time are the protocol's current breakdown,
    all from one observation, as in DefiLlama's /protocols; a chain last seen earlier was
    dropped by the source. One grouped scan of the read model's `tvl` rows.
    """
    ql = query_latest
    return (select(ql.c.subject, func.max(ql.c.ts).label("ts"))
            .where(ql.c.metric == "tvl", ql.c.chain != NO_CHAIN).group_by(ql.c.subject))


def window_references(subject: ColumnElement[Any], ts: ColumnElement[Any], *,
                      metric: ColumnElement[Any] | str = "tvl",
                      chain: ColumnElement[Any] | str = NO_CHAIN) -> list[ColumnElement[Any]]:
    """Columns `ref_change_1h`, `ref_change_24h`, `ref_change_7d`: the value of the series
    (by default the protocol total) that each window compares with at `ts` (domain/changes.py:
    newest point in [ts - 1.5 W, ts - W]); processor/fill.py passes any series."""
    refs: list[ColumnElement[Any]] = []
    for name, window in WINDOWS.items():
        r = points.alias(f"r_{name}")
        refs.append(
            select(r.c.value)
            .where(r.c.metric == metric, r.c.subject == subject, r.c.chain == chain,
                   r.c.ts.between(ts - window - window // 2, ts - window))
            .order_by(r.c.ts.desc())
            .limit(1)
            .scalar_subquery()
            .label(f"ref_{name}")
        )
    return refs


def _tvl_with_references(slugs: Sequence[str] | None) -> Select[Any]:
    latest = query_latest.alias("l")
    refs = window_references(latest.c.subject, latest.c.ts)
    stmt = select(latest.c.subject, latest.c.ts, latest.c.value, *refs).where(
        latest.c.metric == "tvl", latest.c.chain == NO_CHAIN)
    return stmt if slugs is None else stmt.where(latest.c.subject.in_(slugs))


def _upsert_latest(dialect: str) -> Any:
    d = postgresql if dialect == "postgresql" else sqlite
    stmt = d.insert(query_latest)
    return stmt.on_conflict_do_update(
        index_elements=["metric", "subject", "chain"],
        set_={"ts": stmt.excluded.ts, "value": stmt.excluded.value},
        where=stmt.excluded.ts >= query_latest.c.ts,
    )


def _upsert_snapshot(dialect: str) -> Any:
    d = postgresql if dialect == "postgresql" else sqlite
    stmt = d.insert(query_snapshot)
    cols = ("tvl", "tvl_ts", "change_1h", "change_24h", "change_7d", "mcap", "mcap_ts")
    return stmt.on_conflict_do_update(index_elements=["slug"],
                                      set_={c: stmt.excluded[c] for c in cols})
