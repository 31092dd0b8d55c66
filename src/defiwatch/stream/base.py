"""The event stream interface every backend implements (memory.py, redis.py).

Guarantees, checked by one contract suite against both backends (tests/stream/test_contract.py):

- Offsets are integers, start at 1 and grow by exactly 1 per published event, across restarts
  of publishers (Redis) or for the life of the process (memory).
- Per series, events are published in increasing `ts`; `publish` drops an event whose `ts` is not
  newer than the last published `ts` of its series. ("Series" is the stream's dedup key, by
  default `metric|subject|chain`; a stream of fired alerts uses rule and series instead.)
  The check and the append are one atomic step, so a processor that re-publishes a batch
  after a crash adds nothing twice: exactly once per (series, ts) in the stream.
- Retention is bounded (`retention` events, approximately on Redis); `read(since)` returns events
  with offset > `since`. When `since` is older than the oldest retained offset the slice says
  `gap=True`, so a caller can tell a clean resume from a hole. A `since` beyond the newest
  offset also says `gap=True`: the stream restarted (memory) or was reset, and the caller's
  position means nothing here any more.
- `epoch()` names one life of the stream: offsets from two different epochs are unrelated. It is
  stable for the life of the stream (a MemoryEventStream object; a Redis stream until its keys
  are deleted, e.g. a FLUSHALL) and the same for every reader of that stream, so a reader that
  kept `(epoch, offset)` can tell a resumable position from one of a lost stream even after new
  offsets have passed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from defiwatch.domain import Event, SeriesKey

__all__ = ["DedupKey", "EventStream", "StreamSlice", "series_key"]

DedupKey = Callable[[Event], str]


def series_key(event: Event) -> str:
    """The default dedup identity: the event's series (`metric|subject|chain`)."""
    return str(event.series)


class StreamSlice(msgspec.Struct, frozen=True):
    """Events with offsets in (since, last_offset], oldest first.

    `first_offset` is the oldest retained offset (0 when the stream is empty); `last_offset` the
    newest offset ever assigned; `gap` is True when events after `since` were already trimmed.
    """

    events: list[Event]
    first_offset: int
    last_offset: int
    gap: bool


class EventStream(Protocol):
    async def publish(self, events: Sequence[Event]) -> list[Event]:
        """Append events atomically with the per-series dedup; return the appended ones with
        their offsets set (skipped duplicates are absent)."""
        ...

    async def read(self, since: int, limit: int) -> StreamSlice:
        """Up to `limit` events with offset > `since`, oldest first. Never blocks."""
        ...

    async def wait(self, after: int, timeout: float) -> int:
        """Block until an event with offset > `after` exists or `timeout` seconds pass; return
        the last offset."""
        ...

    async def last_offset(self) -> int:
        ...

    async def epoch(self) -> str:
        """An opaque id of this life of the stream (see the module docstring); never empty."""
        ...

    async def last_published(
        self, series: Sequence[SeriesKey]
    ) -> dict[SeriesKey, tuple[int, float]]:
        """`(ts, value)` of the newest published event per series; absent if none was.
        A valueless event (protocol_update) reports NaN as its value."""
        ...

    async def ping(self) -> None:
        """Raise BackendUnavailable if the backend cannot be reached."""
        ...

    async def close(self) -> None:
        ...
