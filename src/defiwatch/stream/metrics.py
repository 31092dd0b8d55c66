"""Stream metrics, shared by every backend (labelled `backend`)."""

from __future__ import annotations

import time

import structlog
from prometheus_client import Counter, Histogram

__all__ = ["STREAM_DEDUPLICATED", "STREAM_PUBLISHED", "STREAM_PUBLISH_SECONDS", "PublishRecorder"]

log = structlog.get_logger(__name__)

STREAM_PUBLISHED = Counter(
    "defiwatch_stream_events_published",
    "Events appended to the event stream.",
    ["backend"],
)
STREAM_DEDUPLICATED = Counter(
    "defiwatch_stream_events_deduplicated",
    "Events dropped by publish because their series already had an event with ts >= theirs "
    "(crash replays, out-of-order producers).",
    ["backend"],
)
STREAM_PUBLISH_SECONDS = Histogram(
    "defiwatch_stream_publish_seconds",
    "Time to publish one batch (dedup and append), in seconds.",
    ["backend"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


class PublishRecorder:
    """Accounts one publish call of one backend: appended, deduplicated, latency."""

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._published = STREAM_PUBLISHED.labels(backend=backend)
        self._deduplicated = STREAM_DEDUPLICATED.labels(backend=backend)
        self._latency = STREAM_PUBLISH_SECONDS.labels(backend=backend)

    def record(self, offered: int, appended: int, started: float) -> None:
        """`started` is the `time.perf_counter()` taken when the call began."""
        skipped = offered - appended
        if skipped:
            self._deduplicated.inc(skipped)
            log.debug("stream.publish.deduplicated", backend=self._backend, skipped=skipped)
        self._published.inc(appended)
        self._latency.observe(time.perf_counter() - started)
