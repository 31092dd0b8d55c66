"""The hot cache interface every backend implements (memory.py, redis.py).

Guarantees, checked by one contract suite against both backends (tests/cache/test_contract.py):
- `put_latest` keeps, per series, the entry with the greatest `ts` (an older entry never
  overwrites a newer one, so replays and out-of-order writers are harmless).
- `get_latest` filters by any of metric, subject, chain (None = any), ordered by series key.
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

    async def ping(self) -> None:
        """Raise BackendUnavailable if the backend cannot be reached."""
        ...

    async def close(self) -> None:
        ...
