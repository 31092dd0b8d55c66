"""What every source pushes into: the ingest service (service.py) implements `PointSink`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec

from defiwatch.domain import PointRejection, ProtocolMeta

__all__ = ["IngestResult", "PointSink"]


class IngestResult(msgspec.Struct):
    """Outcome of one batch: how many were stored, which indexes were duplicates of stored
    (series, ts) points, and which were rejected and why."""

    accepted: int = 0
    duplicates: list[int] = msgspec.field(default_factory=list)
    rejected: list[PointRejection] = msgspec.field(default_factory=list)


class PointSink(Protocol):
    async def ingest_points(
        self, raw: Sequence[Mapping[str, Any]], *, source: str
    ) -> IngestResult:
        """Validate, normalise and store points (`metric, subject, chain, ts, value`);
        idempotent per (series, ts): a point already stored is reported as a duplicate."""
        ...

    async def ingest_protocols(
        self, metas: Sequence[ProtocolMeta], *, ts: int, source: str
    ) -> int:
        """Upsert protocol metadata observed at `ts`; return how many changed (each change
        becomes a protocol_update event)."""
        ...
