"""A connection's bounded send buffer, with conflation when it is full. Pure: no I/O, no clock.

Frames wait here only while the socket's own write buffer is over its high-water mark (a slow
reader); otherwise the server writes them straight through. When the buffer reaches `capacity`
it is conflated: of the frames of one series on one channel (their `key`) only the newest stays,
in its place, so a slow client gets fewer but never stale values, and the newest value of a series
is always the last one it receives. Frames without a key (acks, errors, alerts) are never dropped.
If the buffer is still full after that, the client is too far behind to be helped:
`PushResult.OVERFLOW` tells the server to close with 4008, and the client recovers with `since`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable

__all__ = ["Outbox", "PushResult"]


class PushResult(enum.Enum):
    QUEUED = "queued"
    CONFLATED = "conflated"  # queued after dropping older frames of the same keys
    OVERFLOW = "overflow"  # not queued: full even after conflation


class Outbox:
    """Frames waiting for the socket, oldest first, at most `capacity` (>= 1).

    `conflated` counts frames dropped by conflation over the outbox's life.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 frame, got {capacity}")
        self.capacity = capacity
        self.conflated = 0
        self._frames: deque[tuple[Hashable | None, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: bytes, key: Hashable | None) -> PushResult:
        """Queue `frame`; `key` identifies what a newer frame may replace (None: nothing)."""
        if len(self._frames) < self.capacity:
            self._frames.append((key, frame))
            return PushResult.QUEUED
        self._frames.append((key, frame))
        self._conflate()
        if len(self._frames) > self.capacity:
            self._frames.pop()
            return PushResult.OVERFLOW
        return PushResult.CONFLATED

    def _conflate(self) -> None:
        # Walk from the newest: the first frame seen of a key is its newest and is kept, in its
        # own position, so the relative order of what remains is the order of arrival. O(n),
        # and only when full.
        seen: set[Hashable] = set()
        kept: list[tuple[Hashable | None, bytes]] = []
        for key, frame in reversed(self._frames):
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            kept.append((key, frame))
        kept.reverse()
        self.conflated += len(self._frames) - len(kept)
        self._frames = deque(kept)

    def popleft(self) -> bytes:
        return self._frames.popleft()[1]

    def clear(self) -> int:
        """Drop every frame (the connection is closing); return how many were dropped."""
        dropped = len(self._frames)
        self._frames.clear()
        return dropped
