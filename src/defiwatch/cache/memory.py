"""The in-process hot cache: the newest `Latest` of every series in a dict.

The embedded deployment's production backend, not a test double; it keeps the guarantees of
`defiwatch.cache.base` (checked by tests/cache/test_contract.py). All methods run on one event
loop and `put_latest` never awaits, so each batch is applied without interleaving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from defiwatch.cache.metrics import PutRecorder
from defiwatch.domain import Latest, SeriesKey

__all__ = ["MemoryHotCache"]

log = structlog.get_logger(__name__)

_BACKEND = "memory"


class MemoryHotCache:
    """The hot cache in process memory. Entries are never evicted: one per known series."""

    def __init__(self) -> None:
        self._latest: dict[SeriesKey, Latest] = {}
        self._metrics = PutRecorder(_BACKEND)
        self._filled = False  # this process's memory: empty, and unfilled, at start

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
        self._metrics.record(len(items) - stale, stale, started)

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

    async def filled(self) -> bool:
        return self._filled

    async def mark_filled(self) -> None:
        self._filled = True

    async def ping(self) -> None:
        """Always reachable: it is this process."""

    async def close(self) -> None:
        """Nothing to release."""
