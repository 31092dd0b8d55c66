"""Rebuild the hot cache from the database: the newest point of every series.

The processor fills the cache as it goes, so a cache that lost its data (Redis restarted without
it, a FLUSHALL) or an embedded process that just started would answer `/v1/latest` with nothing
for series that are quiet, until each changes again. The database is the source of truth: a
refill puts the newest stored point of every series, with the same windowed changes the
processor computes (`SeriesState.reference`: the newest point in [ts - 1.5 W, ts - W]).

When to refill: the cache keeps a `filled` marker that goes with its data, checked every
`check_s`; a missing marker means a refill. Refilling races nothing: the cache keeps the newest
`ts` per series, so a live put from the processor is never overwritten by an older stored point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy import Select, and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.cache import HotCache
from defiwatch.domain import Latest
from defiwatch.domain.changes import WINDOWS, pct_change
from defiwatch.query.index import window_references
from defiwatch.store.schema import points

__all__ = ["CacheFiller", "newest_points"]

log = structlog.get_logger(__name__)

REFILLS = Counter("defiwatch_processor_cache_refills_total",
                  "Hot cache rebuilds from the database, by why", ["reason"])

_PAGE = 1_000  # series per cache write


def newest_points() -> Select[Any]:
    """The newest point of every series: metric, subject, chain, ts, value, then its reference
    value per window in the order of `WINDOWS` (None: no point in the window's range).

    One statement for both databases: the newest ts per series from a GROUP BY, then the value
    and each reference (query/index.py's `window_references`) as index lookups on
    (metric, subject, chain, ts).
    """
    newest = (
        select(points.c.metric, points.c.subject, points.c.chain,
               func.max(points.c.ts).label("ts"))
        .group_by(points.c.metric, points.c.subject, points.c.chain)
        .subquery("newest")
    )
    refs = window_references(newest.c.subject, newest.c.ts, metric=newest.c.metric,
                             chain=newest.c.chain)
    return (
        select(newest.c.metric, newest.c.subject, newest.c.chain, newest.c.ts, points.c.value,
               *refs)
        .join_from(newest, points, and_(points.c.metric == newest.c.metric,
                                        points.c.subject == newest.c.subject,
                                        points.c.chain == newest.c.chain,
                                        points.c.ts == newest.c.ts))
    )


class CacheFiller:
    """Keeps the hot cache complete for series stored in the database (see module docstring).

    Args:
        engine: the database (points).
        cache: the hot cache to rebuild.
        check_s: seconds between checks of the cache's `filled` marker
            (`DEFIWATCH_PROCESSOR_CACHE_CHECK_S`).
        clock: monotonic seconds.
    """

    def __init__(self, engine: AsyncEngine, cache: HotCache, *, check_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._cache = cache
        self._check_s = check_s
        self._clock = clock
        self._next_check: float | None = None  # None: not checked yet (refill at start)

    async def check(self) -> int | None:
        """Refill if due: at the first call, and at later ones every `check_s` if the marker
        is gone. Returns the series written, or None if no refill was due.

        Raises:
            BackendUnavailable: the cache could not be reached.
            sqlalchemy.exc.SQLAlchemyError, OSError: the database could not be reached.
        """
        now = self._clock()
        if self._next_check is not None and now < self._next_check:
            return None
        at_start = self._next_check is None
        if not at_start and await self._cache.filled():
            self._next_check = now + self._check_s
            return None
        reason = "start" if at_start else "cache_reset"
        count = await self.refill()
        self._next_check = self._clock() + self._check_s
        REFILLS.labels(reason).inc()
        log.info("cache.refilled", reason=reason, series=count)
        return count

    async def refill(self) -> int:
        """Write the newest stored point of every series, then set the marker; return how many
        series were written. (Marked after writing: a refill cut short is done again.)"""
        count = 0
        batch: list[Latest] = []
        async with self._engine.connect() as conn:
            result = await conn.stream(newest_points())
            async for metric, subject, chain, ts, value, *refs in result:
                changes = {name: None if ref is None else pct_change(value, ref)
                           for name, ref in zip(WINDOWS, refs, strict=True)}
                batch.append(Latest(metric, subject, chain, int(ts), float(value), **changes))
                if len(batch) >= _PAGE:
                    await self._cache.put_latest(batch)
                    count, batch = count + len(batch), []
        await self._cache.put_latest(batch)
        await self._cache.mark_filled()
        return count + len(batch)
