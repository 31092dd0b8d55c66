"""Pure domain: series, points, events and change detection. No I/O, no clock (pass `now`)."""

from defiwatch.domain.changes import ChangeDetector, Decision, SeriesState, Thresholds
from defiwatch.domain.events import Event, EventType, Latest, ProtocolChange
from defiwatch.domain.points import Point, PointRejection, validate_point
from defiwatch.domain.protocols import ProtocolMeta, diff_protocol
from defiwatch.domain.series import (
    METRICS,
    NO_CHAIN,
    SeriesKey,
    normalize_chain,
    normalize_subject,
    split_chain_tvl_key,
)

__all__ = [
    "METRICS",
    "NO_CHAIN",
    "ChangeDetector",
    "Decision",
    "Event",
    "EventType",
    "Latest",
    "Point",
    "PointRejection",
    "ProtocolChange",
    "ProtocolMeta",
    "SeriesKey",
    "SeriesState",
    "Thresholds",
    "diff_protocol",
    "normalize_chain",
    "normalize_subject",
    "split_chain_tvl_key",
    "validate_point",
]
