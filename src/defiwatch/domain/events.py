"""The one event shape used everywhere: stream, WebSocket frames and webhook `data`."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from defiwatch.domain.series import PRICE_METRICS, SeriesKey

__all__ = ["Event", "EventType", "Latest", "ProtocolChange", "event_type_for"]


class EventType(enum.StrEnum):
    TVL_CHANGE = "tvl_change"
    PRICE_CHANGE = "price_change"
    PROTOCOL_UPDATE = "protocol_update"


def event_type_for(metric: str) -> EventType:
    return EventType.PRICE_CHANGE if metric in PRICE_METRICS else EventType.TVL_CHANGE


class Event(msgspec.Struct, omit_defaults=False, gc=False):
    """A significant change of one series (or a protocol's metadata).

    `offset` is 0 until the stream assigns it; offsets increase by one per published event.
    `ts` is when the value was observed (epoch s); `emitted_at` when the processor emitted it
    (epoch s, float). Changes are percentages (1.5 means +1.5 %); None where no reference exists.
    """

    type: str
    metric: str
    subject: str
    chain: str
    value: float | None
    previous: float | None
    change_abs: float | None
    change_pct: float | None
    change_1h: float | None
    change_24h: float | None
    change_7d: float | None
    ts: int
    emitted_at: float
    source: str
    offset: int = 0
    detail: dict[str, Any] | None = None

    @property
    def series(self) -> SeriesKey:
        return SeriesKey(self.metric, self.subject, self.chain)


class ProtocolChange(msgspec.Struct, frozen=True):
    """What changed in a protocol's metadata; carried in a protocol_update event's `detail`."""

    slug: str
    name: str
    chains_added: list[str]
    chains_removed: list[str]
    category: tuple[str | None, str | None] | None = None
    listed_at: tuple[int | None, int | None] | None = None
    new: bool = False


class Latest(msgspec.Struct, gc=False):
    """The newest known value of a series with its windowed changes (hot cache entry)."""

    metric: str
    subject: str
    chain: str
    ts: int
    value: float
    change_1h: float | None = None
    change_24h: float | None = None
    change_7d: float | None = None

    @property
    def series(self) -> SeriesKey:
        return SeriesKey(self.metric, self.subject, self.chain)
