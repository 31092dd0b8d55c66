"""The in-process event stream: a ring of the newest `retention` events with integer offsets.

This is the embedded deployment's production backend, not a test double: one process runs every
role, so publisher and readers share this object. It keeps every guarantee of
`defiwatch.stream.base` (checked by tests/stream/test_contract.py); offsets restart at 1 with
the process. A reader holding an offset from before a restart gets `gap=True` while that offset
is beyond `last_offset` (see `has_gap`); once new offsets pass it, nothing can tell the two lives
apart by offsets alone: `epoch()` (a random id per object) tells them apart.

Events returned by `publish` and `read` are the ring's own objects, shared by every reader: treat
them as read-only.

Concurrency: all methods run on one event loop, and `publish` does its dedup check and its
append without an `await` in between, so no other coroutine can observe or interleave with a
half-published batch. That is the whole "lock": there is nothing to acquire.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence

import msgspec
import structlog

from defiwatch.domain import Event, SeriesKey
from defiwatch.stream.base import DedupKey, StreamSlice, series_key
from defiwatch.stream.metrics import PublishRecorder

__all__ = ["MemoryEventStream", "has_gap"]

log = structlog.get_logger(__name__)

_BACKEND = "memory"


def has_gap(since: int, first_offset: int, last_offset: int) -> bool:
    """Whether a reader positioned at `since` has missed events (`StreamSlice.gap`).

    True when events after `since` were trimmed (or the whole stream is gone), and also when
    `since` is beyond the newest offset: that position comes from an earlier life of the
    stream (a restarted process for memory, a flushed Redis), whose later events are lost to
    the reader, so it must resynchronise rather than wait for offsets to catch up.
    """
    if since > last_offset:
        return True
    return last_offset > since and (first_offset == 0 or first_offset > since + 1)


class MemoryEventStream:
    """The event stream in process memory (see module docstring).

    Args:
        retention: how many of the newest events are kept for `read`, exactly (>= 1). Older
            events are dropped as new ones arrive; readers behind them get `gap=True`.
        dedup_key: the identity whose `ts` must increase (default: the event's series).
    """

    def __init__(self, retention: int, *, dedup_key: DedupKey = series_key) -> None:
        if retention < 1:
            raise ValueError(f"retention must be >= 1 event, got {retention}")
        # Offsets in the ring are dense: ring[i].offset == ring[0].offset + i.
        self._ring: deque[Event] = deque(maxlen=retention)
        self._last_offset = 0
        # Series -> (ts, value) of its newest published event; never trimmed, so the dedup
        # holds for series whose events have left the ring.
        self._last: dict[str, tuple[int, float | None]] = {}
        self._dedup_key = dedup_key
        # Set (and replaced) on every publish that appended something; waiters hold the old one.
        self._appended = asyncio.Event()
        self._closed = False
        self._epoch = uuid.uuid4().hex  # this object is the stream's whole life
        self._metrics = PublishRecorder(_BACKEND)

    async def publish(self, events: Sequence[Event]) -> list[Event]:
        """Append the events newer than their series' last published `ts`; return them.

        The returned events are copies with `offset` set; the caller's objects are untouched.
        Within one batch, events of a series are checked in order against each other too.
        """
        started = time.perf_counter()
        appended: list[Event] = []
        # No await from here to the wake-up below: check and append are one atomic step.
        for event in events:
            series = self._dedup_key(event)
            last = self._last.get(series)
            if last is not None and event.ts <= last[0]:
                continue
            self._last_offset += 1
            stored = msgspec.structs.replace(event, offset=self._last_offset)
            self._ring.append(stored)
            self._last[series] = (event.ts, event.value)
            appended.append(stored)
        if appended:
            # Wake every current waiter, then give future waiters a fresh, unset event.
            self._appended.set()
            self._appended = asyncio.Event()
        self._metrics.record(len(events), len(appended), started)
        return appended

    async def read(self, since: int, limit: int) -> StreamSlice:
        """Up to `limit` events with offset > `since`, oldest first; `gap` if some were trimmed."""
        since = max(since, 0)
        first = self._ring[0].offset if self._ring else 0
        last = self._last_offset
        gap = has_gap(since, first, last)
        if limit <= 0 or since >= last:
            return StreamSlice(events=[], first_offset=first, last_offset=last, gap=gap)
        start = max(since + 1 - first, 0)  # ring index of the first event to return
        count = min(limit, len(self._ring) - start)
        from_right = len(self._ring) - start
        if from_right <= start:
            # Readers are usually near the tail: walk from the right end, O(from_right), instead
            # of from the left, O(start) (a deque has no O(1) random access in the middle).
            tail = list(itertools.islice(reversed(self._ring), from_right))
            tail.reverse()
            events = tail[:count]
        else:
            events = list(itertools.islice(self._ring, start, start + count))
        return StreamSlice(events=events, first_offset=first, last_offset=last, gap=gap)

    # `timeout` is part of the EventStream protocol: the wait is a bounded poll by design
    # (on Redis it becomes XREAD BLOCK; cancelling a blocked XREAD would cost a connection).
    async def wait(self, after: int, timeout: float) -> int:
        """Return the last offset once it is > `after`, or after `timeout` seconds, or on close."""
        if timeout <= 0:
            return self._last_offset
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A loop, not one wait: a publish wakes us even if `after` is ahead of the stream.
        while self._last_offset <= after and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            appended = self._appended
            try:
                async with asyncio.timeout(remaining):
                    await appended.wait()
            except TimeoutError:
                break
        return self._last_offset

    async def last_offset(self) -> int:
        return self._last_offset

    async def epoch(self) -> str:
        """A random id chosen when this object was made: offsets restart with the process."""
        return self._epoch

    async def last_published(
        self, series: Sequence[SeriesKey]
    ) -> dict[SeriesKey, tuple[int, float]]:
        """`(ts, value)` of the newest published event per series; NaN for a None value
        (protocol_update events carry no value)."""
        out: dict[SeriesKey, tuple[int, float]] = {}
        for key in series:
            last = self._last.get(str(key))
            if last is not None:
                out[key] = (last[0], math.nan if last[1] is None else last[1])
        return out

    async def ping(self) -> None:
        """Always reachable: it is this process."""

    async def close(self) -> None:
        """Wake pending `wait` calls so shutdown does not sit out their timeouts."""
        self._closed = True
        self._appended.set()
