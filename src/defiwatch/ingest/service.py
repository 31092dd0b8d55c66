"""The ingest service: the one gate every source goes through (validate, normalise, store)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.domain import Point, PointRejection, ProtocolMeta, validate_point
from defiwatch.ingest.base import IngestResult
from defiwatch.store.points import insert_points
from defiwatch.store.protocols import upsert_protocols

__all__ = ["IngestService"]

log = structlog.get_logger(__name__)

POINTS = Counter("defiwatch_ingest_points_total", "Points offered to ingest, by outcome",
                 ["source", "outcome"])
BATCH_SECONDS = Histogram("defiwatch_ingest_batch_seconds", "Time to validate and commit a batch")

MAX_BATCH = 10_000  # points per ingest call; larger inputs are split by the caller


class IngestService:
    """Validates and stores points and protocol metadata, then wakes the processor.

    Args:
        engine: the database (source of truth).
        on_commit: called after each commit that stored something (in-process wake-up of the
            processor; on PostgreSQL a NOTIFY from the trigger wakes processors elsewhere).
        clock: epoch seconds, for the "not in the far future" check.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        on_commit: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self._clock = clock

    async def ingest_points(
        self, raw: Sequence[Mapping[str, Any]], *, source: str
    ) -> IngestResult:
        started = time.perf_counter()
        now = self._clock()
        valid: list[Point] = []
        positions: list[int] = []
        rejected: list[PointRejection] = []
        for i, item in enumerate(raw):
            checked = (
                validate_point(item, index=i, now=now, source=source)
                if isinstance(item, Mapping)
                else PointRejection(index=i, field="", reason="each point must be an object")
            )
            if isinstance(checked, Point):
                valid.append(checked)
                positions.append(i)
            else:
                rejected.append(checked)
        new: list[bool] = []
        for start in range(0, len(valid), MAX_BATCH):
            async with self._engine.begin() as conn:
                new.extend(await insert_points(conn, valid[start : start + MAX_BATCH]))
        duplicates = [positions[i] for i, is_new in enumerate(new) if not is_new]
        accepted = len(valid) - len(duplicates)
        if accepted:
            self._on_commit()
        POINTS.labels(source, "accepted").inc(accepted)
        POINTS.labels(source, "duplicate").inc(len(duplicates))
        POINTS.labels(source, "rejected").inc(len(rejected))
        BATCH_SECONDS.observe(time.perf_counter() - started)
        if rejected:
            log.info("ingest.rejected", source=source, count=len(rejected),
                     first_field=rejected[0].field, first_reason=rejected[0].reason)
        return IngestResult(accepted=accepted, duplicates=duplicates, rejected=rejected)

    async def ingest_protocols(
        self, metas: Sequence[ProtocolMeta], *, ts: int, source: str
    ) -> int:
        async with self._engine.begin() as conn:
            changes = await upsert_protocols(conn, metas, ts=ts, source=source)
        if changes:
            self._on_commit()
            log.info("ingest.protocols_changed", source=source, changed=len(changes))
        return len(changes)
