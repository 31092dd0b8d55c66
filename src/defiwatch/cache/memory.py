"""The in-process hot cache: the newest `Latest` of every series in a dict.

The embedded deployment's production backend, not a test double; it keeps the guarantees of
`defiwatch.cache.base` (checked by tests/cache/test_contract.py). All methods run on one event
loop and `put_latest` never awaits, so each batch is applied without interleaving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog
from prometheus_client import Counter, Histogram

from defiwatch.domain import Latest, SeriesKey

__all__ = ["CACHE_PUT_SECONDS", "CACHE_STALE", "CACHE_WRITTEN", "MemoryHotCache"]

log = structlog.get_logger(__name__)

# Prometheus metrics are process-global: each is defined once here and shared by every cache
# backend (cache/redis.py imports them), told apart by the `backend` label.
CACHE_WRITTEN = Counter(
    "defiwatch_cache_entries_written",
    "Hot cache entries stored by put_latest (new series or a ts at least as new).",
    ["backend"],
)
CACHE_STALE = Counter(
    "defiwatch_cache_entries_stale",
    "Hot cache entries put_latest ignored because the cache already held a newer ts.",
    ["backend"],
)
CACHE_PUT_SECONDS = Histogram(
    "defiwatch_cache_put_seconds",
    "Time to apply one put_latest batch, in seconds.",
    ["backend"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

_BACKEND = "memory"


class MemoryHotCache:
    """The hot cache in process memory. Entries are never evicted: one per known series."""

    def __init__(self) -> None:
        self._latest: dict[SeriesKey, Latest] = {}
        self._written = CACHE_WRITTEN.labels(backend=_BACKEND)
        self._stale = CACHE_STALE.labels(backend=_BACKEND)
        self._latency = CACHE_PUT_SECONDS.labels(backend=_BACKEND)

    async def put_latest(self, items: Sequence[Latest]) -> None:
        """Store each item unless its series already holds a newer `ts`.

        An equal `ts` overwrites: it is the same observation, possibly with windowed changes
        recomputed from more history, and replays of it are harmless.
        """
        started = time.perf_counter()
        stale = 0
        for item in items:
            series = item.series
            current = self._latest.get(series)
            if current is not None and current.ts > item.ts:
                stale += 1
                continue
            self._latest[series] = item
        if stale:
            self._stale.inc(stale)
            log.debug("cache.put.stale", backend=_BACKEND, stale=stale)
        self._written.inc(len(items) - stale)
        self._latency.observe(time.perf_counter() - started)

    async def get_latest(
        self,
        metric: str | None = None,
        subject: str | None = None,
        chain: str | None = None,
        limit: int = 1000,
    ) -> list[Latest]:
        """Entries matching every given filter (None = any), ordered by series key, at most
        `limit`."""
        if limit <= 0:
            return []
        if metric is not None and subject is not None and chain is not None:
            hit = self._latest.get(SeriesKey(metric, subject, chain))
            return [] if hit is None else [hit]
        matches = [
            (series, latest)
            for series, latest in self._latest.items()
            if (metric is None or series.metric == metric)
            and (subject is None or series.subject == subject)
            and (chain is None or series.chain == chain)
        ]
        matches.sort(key=lambda pair: pair[0])
        return [latest for _, latest in matches[:limit]]

    async def ping(self) -> None:
        """Always reachable: it is this process."""

    async def close(self) -> None:
        """Nothing to release."""
