"""The hot cache on Redis: one hash, one field per series, shared by every process.

Each field is `str(series)` (`metric|subject|chain`, see `SeriesKey.__str__`) and holds the
msgspec JSON of the series' `Latest`. `cache/lua/put_latest.lua` applies a batch with the
newest-ts-wins rule in one atomic script call. A lookup of one series is an HGET; any other
filter is an HSCAN whose MATCH pattern narrows the scan on the server, followed by an exact
filter here (the pattern is only a prefilter), a sort by series key and the limit.

The Redis client is the caller's: `close` does not close it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import resources

import msgspec
import redis.asyncio as aioredis
import structlog

from defiwatch.cache.metrics import PutRecorder
from defiwatch.domain import Latest, SeriesKey
from defiwatch.redis_keys import RedisKeys
from defiwatch.stream.redis import redis_unavailable

__all__ = ["RedisHotCache", "glob_escape"]

log = structlog.get_logger(__name__)

_BACKEND = "redis"
_PUT_LATEST_LUA = (
    resources.files("defiwatch.cache").joinpath("lua/put_latest.lua").read_text("utf-8")
)
# Characters Redis' glob matcher (stringmatchlen) treats specially; a backslash escapes any.
_GLOB_SPECIAL = frozenset("\\*?[]")
# HSCAN COUNT: fields examined per round trip (a hint to Redis, not a result limit).
_SCAN_COUNT = 1000


def glob_escape(text: str) -> str:
    """`text` as a Redis MATCH pattern that matches exactly `text` (`a*b` matches only `a*b`)."""
    return "".join(f"\\{ch}" if ch in _GLOB_SPECIAL else ch for ch in text)


class RedisHotCache:
    """The hot cache on Redis (see module docstring).

    Args:
        client: a `redis.asyncio.Redis`; owned by the caller.
        prefix: the key prefix (`DEFIWATCH_REDIS_PREFIX`).
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        self._client = client
        keys = RedisKeys(prefix)
        self._key = keys.cache_latest
        self._filled_key = keys.cache_filled
        self._put_script = client.register_script(_PUT_LATEST_LUA)
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Latest)
        self._metrics = PutRecorder(_BACKEND)

    async def put_latest(self, items: Sequence[Latest]) -> None:
        """Store each item unless its series already holds a newer `ts` (equal ts overwrites).

        Raises:
            BackendUnavailable: Redis could not be reached; the batch was applied wholly or not
                at all, and applying it again is harmless.
        """
        if not items:
            return
        started = time.perf_counter()
        args: list[str | bytes | int] = []
        for item in items:
            args += [str(item.series), item.ts, self._encoder.encode(item)]
        with redis_unavailable("cache.put_latest"):
            written = int(await self._put_script(keys=[self._key], args=args))
        stale = len(items) - written
        self._metrics.record(written, stale, started)

    async def get_latest(
        self,
        metric: str | None = None,
        subject: str | None = None,
        chain: str | None = None,
        limit: int = 1000,
    ) -> list[Latest]:
        """Entries matching every given filter (None = any), ordered by series key, at most
        `limit`.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        if limit <= 0:
            return []
        if metric is not None and subject is not None and chain is not None:
            with redis_unavailable("cache.get_latest"):
                raw = await self._client.hget(self._key, str(SeriesKey(metric, subject, chain)))
            return [] if raw is None else [self._decoder.decode(raw)]
        # User input goes into a glob pattern: escape it, or `a*` would match `abc` and `x[1]`
        # would match `x1`. The pattern's `|` separators only narrow the scan; the exact
        # comparison below decides (a name may itself contain `|`).
        pattern = "|".join(
            "*" if part is None else glob_escape(part) for part in (metric, subject, chain)
        )
        found: dict[bytes | str, bytes | str] = {}
        with redis_unavailable("cache.get_latest"):
            # HSCAN may return a field twice (rehashing): the dict keeps one.
            async for field, value in self._client.hscan_iter(
                self._key, match=pattern, count=_SCAN_COUNT
            ):
                found[field] = value
        matches: list[Latest] = []
        for value in found.values():
            latest = self._decoder.decode(value)
            if (
                (metric is None or latest.metric == metric)
                and (subject is None or latest.subject == subject)
                and (chain is None or latest.chain == chain)
            ):
                matches.append(latest)
        matches.sort(key=lambda latest: latest.series)
        return matches[:limit]

    async def filled(self) -> bool:
        """Whether the refill marker is there (it goes with the data on a FLUSHALL or a restart
        without persistence).

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        with redis_unavailable("cache.filled"):
            return bool(await self._client.exists(self._filled_key))

    async def mark_filled(self) -> None:
        """Set the refill marker.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        with redis_unavailable("cache.mark_filled"):
            await self._client.set(self._filled_key, "1")

    async def ping(self) -> None:
        """Raises BackendUnavailable if Redis does not answer a PING."""
        with redis_unavailable("cache.ping"):
            await self._client.ping()

    async def close(self) -> None:
        """Nothing to release: the client belongs to the caller, who closes it."""
