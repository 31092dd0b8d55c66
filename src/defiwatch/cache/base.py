"""The hot cache interface every backend implements (memory.py, redis.py).

Guarantees, checked by one contract suite against both backends (tests/cache/test_contract.py):
- `put_latest` keeps, per series, the entry with the greatest `ts` (an older entry never
  overwrites a newer one, so replays and out-of-order writers are harmless).
- `get_latest` filters by any of metric, subject, chain (None = any), ordered by series key.
- `filled` is True once `mark_filled` was called and until the cache loses its data with it
  (Redis restarted without its data, a FLUSHALL; a new process for memory): the processor then
  rebuilds it from the database (processor/fill.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from defiwatch.domain import Latest

__all__ = ["HotCache"]


class HotCache(Protocol):
    async def put_latest(self, items: Sequence[Latest]) -> None:
        ...

    async def get_latest(
        self,
        metric: str | None = None,
        subject: str | None = None,
        chain: str | None = None,
        limit: int = 1000,
    ) -> list[Latest]:
        ...

    async def filled(self) -> bool:
        """Whether the cache still holds what the last refill from the database put in."""
        ...

    async def mark_filled(self) -> None:
        """Record that the cache was rebuilt from the database (a marker lost with the data)."""
        ...

    async def ping(self) -> None:
        """Raise BackendUnavailable if the backend cannot be reached."""
        ...

    async def close(self) -> None:
        ...
