"""Hot cache metrics, shared by every backend (labelled `backend`)."""

from __future__ import annotations

import time

import structlog
from prometheus_client import Counter, Histogram

__all__ = ["CACHE_PUT_SECONDS", "CACHE_STALE", "CACHE_WRITTEN", "PutRecorder"]

log = structlog.get_logger(__name__)

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


class PutRecorder:
    """Accounts one put_latest call of one backend: written, stale, latency."""

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._written = CACHE_WRITTEN.labels(backend=backend)
        self._stale = CACHE_STALE.labels(backend=backend)
        self._latency = CACHE_PUT_SECONDS.labels(backend=backend)

    def record(self, written: int, stale: int, started: float) -> None:
        """`started` is the `time.perf_counter()` taken when the call began."""
        if stale:
            self._stale.inc(stale)
            log.debug("cache.put.stale", backend=self._backend, stale=stale)
        self._written.inc(written)
        self._latency.observe(time.perf_counter() - started)
