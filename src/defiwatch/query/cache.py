"""Where query answers are kept: in process (embedded) or in Redis (shared by API processes).

The cache stores opaque bytes under a key; it decides nothing about freshness. Every entry
carries the change_log watermark it was computed at, and the query service checks that
watermark against the database before serving it (freshness.py), so an entry is never served
after a change it depends on, whichever process made the change. The TTL only bounds memory and
how long metadata edits that write no change_log row (a protocol's name or url) can linger.

Guarantees, checked by one contract suite against both backends (tests/query/test_cache.py):
- `get` returns what the last `put` of that key stored, or None once the TTL has passed;
- `put` with ttl_s <= 0 stores nothing;
- `touch` gives a live entry a new lifetime of ttl_s and says whether there was one (an
  expired or evicted entry stays gone);
- the memory backend holds at most `max_entries` entries, evicting the least recently used.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from defiwatch.cooldown import Cooldown
from defiwatch.errors import BackendUnavailable
from defiwatch.redis_keys import RedisKeys

T = TypeVar("T")

__all__ = ["CacheEntry", "CoolingResultCache", "MemoryResultCache", "RedisResultCache", "ResultCache"]


class CacheEntry(msgspec.Struct, array_like=True, frozen=True):
    """A cached answer: the watermark it is valid at, and the payload (route-specific bytes)."""

    watermark: str
    payload: bytes


class ResultCache(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The bytes stored under `key`, or None (absent or expired)."""
        ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store `value` for `ttl_s` seconds (<= 0: do not store)."""
        ...

    async def touch(self, key: str, ttl_s: float) -> bool:
        """Keep the entry under `key` for `ttl_s` more seconds from now; False if there is
        none (absent, expired or evicted: nothing is stored then)."""
        ...

    async def close(self) -> None:
        ...


class MemoryResultCache:
    """An LRU of at most `max_entries` entries with per-entry expiry, for one process.

    All methods run on one event loop and never await while mutating, so no lock is needed.
    """

    def __init__(self, max_entries: int = 10_000, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        self._items[key] = (self._clock() + ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    async def touch(self, key: str, ttl_s: float) -> bool:
        if await self.get(key) is None:
            return False
        if ttl_s <= 0:
            del self._items[key]
            return False
        self._items[key] = (self._clock() + ttl_s, self._items[key][1])
        return True

    async def close(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@contextlib.contextmanager
def _unreachable() -> Iterator[None]:
    """Redis errors of a cache call as BackendUnavailable, with the error text."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(f"query cache unreachable: {type(exc).__name__}: {exc}") from exc


class RedisResultCache:
    """Entries as Redis strings with an expiry (`{prefix}query:result:{digest}`).

    A Redis failure is reported as BackendUnavailable, like every other Redis backend.
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        self._client = client
        self._keys = RedisKeys(prefix)

    async def get(self, key: str) -> bytes | None:
        with _unreachable():
            value = await self._client.get(self._keys.query_result(key))
        if value is None:
            return None
        return value if isinstance(value, bytes) else value.encode()

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        with _unreachable():
            await self._client.set(self._keys.query_result(key), value,
                                   px=max(1, int(ttl_s * 1000)))

    async def touch(self, key: str, ttl_s: float) -> bool:
        with _unreachable():
            if ttl_s <= 0:
                await self._client.delete(self._keys.query_result(key))
                return False
            # PEXPIRE answers 0 when the key does not exist (expired or evicted).
            return bool(await self._client.pexpire(self._keys.query_result(key),
                                                   max(1, int(ttl_s * 1000))))

    async def close(self) -> None:
        """The client belongs to the composition root, which closes it."""


class CoolingResultCache:
    """A result cache that, once its backend failed, fails at once for a cooldown instead of
    asking it again (cooldown.py): under a hung Redis a query pays one timeout, not three."""

    def __init__(self, inner: ResultCache, cooldown: Cooldown) -> None:
        self._inner = inner
        self._cooldown = cooldown

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._cooldown.active:
            raise BackendUnavailable(
                f"query cache skipped for {self._cooldown.seconds:g} s after a failure")
        try:
            return await call()
        except BackendUnavailable:
            self._cooldown.start()
            raise

    async def get(self, key: str) -> bytes | None:
        return await self._guarded(lambda: self._inner.get(key))

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._guarded(lambda: self._inner.put(key, value, ttl_s))

    async def touch(self, key: str, ttl_s: float) -> bool:
        return await self._guarded(lambda: self._inner.touch(key, ttl_s))

    async def close(self) -> None:
        await self._inner.close()
