"""The HotCache contract (cache/base.py), run against every backend with one fixture."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conftest import TIMEOUT_FACTOR
from defiwatch.cache import HotCache, MemoryHotCache, RedisHotCache
from defiwatch.cache.redis import glob_escape
from defiwatch.domain import Latest, SeriesKey
from defiwatch.errors import BackendUnavailable


def latest(
    ts: int, value: float = 1.0, metric: str = "tvl", subject: str = "uniswap",
    chain: str = "ethereum", change_24h: float | None = None,
) -> Latest:
    return Latest(metric=metric, subject=subject, chain=chain, ts=ts, value=value,
                  change_24h=change_24h)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None for memory; `(redis_url, prefix)` for Redis, skipped (or failed in CI) without it.

    Sync on purpose: it pulls the Redis fixtures lazily so memory runs need no Redis, and
    getfixturevalue cannot set up async fixtures from inside an async one.
    """
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


@pytest.fixture
async def cache(backend: tuple[str, str] | None) -> AsyncIterator[HotCache]:
    if backend is None:
        memory = MemoryHotCache()
        yield memory
        await memory.close()
        return
    url, prefix = backend
    client = aioredis.from_url(url)
    shared = RedisHotCache(client, prefix=prefix)
    try:
        yield shared
    finally:
        await shared.close()
        await client.aclose()


async def test_empty(cache: HotCache) -> None:
    assert await cache.get_latest() == []
    assert await cache.get_latest("tvl", "uniswap", "ethereum") == []


async def test_round_trip(cache: HotCache) -> None:
    item = Latest(metric="price", subject="coingecko:ethereum", chain="-", ts=1_700_000_000,
                  value=2345.678, change_1h=None, change_24h=-1.25, change_7d=3.5)
    await cache.put_latest([item])
    assert await cache.get_latest() == [item]
    assert await cache.get_latest("price", "coingecko:ethereum", "-") == [item]


async def test_newest_ts_wins(cache: HotCache) -> None:
    await cache.put_latest([latest(10, 1.0)])
    await cache.put_latest([latest(20, 2.0)])
    assert [(x.ts, x.value) for x in await cache.get_latest()] == [(20, 2.0)]
    await cache.put_latest([latest(15, 3.0)])  # older: never overwrites
    assert [(x.ts, x.value) for x in await cache.get_latest()] == [(20, 2.0)]
    await cache.put_latest([latest(20, 4.0, change_24h=1.0)])  # same ts: replaces
    assert [(x.ts, x.value) for x in await cache.get_latest()] == [(20, 4.0)]


async def test_newest_wins_within_a_batch_and_per_series(cache: HotCache) -> None:
    await cache.put_latest([latest(30, 3.0), latest(25, 2.5), latest(5, 0.5, subject="aave")])
    got = await cache.get_latest()
    assert [(x.subject, x.ts) for x in got] == [("aave", 5), ("uniswap", 30)]


async def test_put_nothing(cache: HotCache) -> None:
    await cache.put_latest([])
    assert await cache.get_latest() == []


_METRICS = ["tvl", "price"]
_SUBJECTS = ["aave", "coingecko:ethereum", "uniswap"]
_CHAINS = ["-", "arbitrum", "ethereum"]
_ALL = [
    SeriesKey(m, s, c) for m, s, c in itertools.product(_METRICS, _SUBJECTS, _CHAINS)
    if not (m == "price" and s == "uniswap")
]
# Every combination of given/None filters, each for a value that exists and one that does not.
_FILTERS = [
    (metric, subject, chain)
    for metric in (None, "tvl", "price", "mcap")
    for subject in (None, "uniswap", "coingecko:ethereum", "nope")
    for chain in (None, "ethereum", "-", "solana")
]


@pytest.mark.parametrize(("metric", "subject", "chain"), _FILTERS)
async def test_filters(
    cache: HotCache, metric: str | None, subject: str | None, chain: str | None
) -> None:
    await cache.put_latest([latest(100 + i, float(i), *key) for i, key in enumerate(_ALL)])
    expected = sorted(
        key for key in _ALL
        if (metric is None or key.metric == metric)
        and (subject is None or key.subject == subject)
        and (chain is None or key.chain == chain)
    )
    got = await cache.get_latest(metric, subject, chain)
    assert [x.series for x in got] == expected  # also: ordered by series key


_GLOBBY = ["a*b", "axxb", "ab", "x[1]", "x1", "q?z", "qaz", "back\\slash", "back\\\\slash",
           "pipe|d", "^caret", "[", "]"]


async def test_glob_characters_in_filters_match_literally(cache: HotCache) -> None:
    await cache.put_latest([latest(1, subject=s) for s in _GLOBBY])
    await cache.put_latest([latest(1, metric="x*", subject="w?", chain="[e]")])
    for subject in _GLOBBY:
        assert [x.subject for x in await cache.get_latest(subject=subject)] == [subject]
        assert [x.subject for x in await cache.get_latest("tvl", subject)] == [subject]
        assert [x.subject for x in await cache.get_latest(None, subject, "ethereum")] == [subject]
        assert [x.subject for x in await cache.get_latest("tvl", subject, "ethereum")] == [subject]
    assert await cache.get_latest(subject="a?b") == []
    assert await cache.get_latest(subject="*") == []
    assert [x.series for x in await cache.get_latest(metric="x*")] == [
        SeriesKey("x*", "w?", "[e]")]
    assert [x.series for x in await cache.get_latest(chain="[e]")] == [
        SeriesKey("x*", "w?", "[e]")]
    assert await cache.get_latest(chain="e") == []


async def test_limit(cache: HotCache) -> None:
    subjects = [f"p{i:02d}" for i in range(12)]
    await cache.put_latest([latest(1, subject=s) for s in reversed(subjects)])
    assert [x.subject for x in await cache.get_latest(limit=5)] == subjects[:5]
    assert [x.subject for x in await cache.get_latest(metric="tvl", limit=3)] == subjects[:3]
    assert await cache.get_latest(limit=0) == []
    assert len(await cache.get_latest("tvl", "p03", "ethereum", limit=1)) == 1
    assert await cache.get_latest("tvl", "p03", "ethereum", limit=0) == []
    assert len(await cache.get_latest()) == 12  # default limit 1000


async def test_ping(cache: HotCache) -> None:
    await cache.ping()


async def test_filled_until_marked(cache: HotCache) -> None:
    assert await cache.filled() is False
    await cache.mark_filled()
    assert await cache.filled() is True


async def test_metrics_count_written_and_stale(cache: HotCache) -> None:
    labels = {"backend": "memory" if isinstance(cache, MemoryHotCache) else "redis"}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    written = sample("defiwatch_cache_entries_written_total")
    stale = sample("defiwatch_cache_entries_stale_total")
    await cache.put_latest([latest(10), latest(10, subject="aave")])
    await cache.put_latest([latest(9), latest(11)])
    assert sample("defiwatch_cache_entries_written_total") - written == 3
    assert sample("defiwatch_cache_entries_stale_total") - stale == 1


# --- Redis only ---------------------------------------------------------------------------


async def test_redis_unreachable_raises_backend_unavailable() -> None:
    client = aioredis.from_url(
        "redis://127.0.0.1:1/0", retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=2 * TIMEOUT_FACTOR,
    )
    cache = RedisHotCache(client, prefix="dw:")
    try:
        with pytest.raises(BackendUnavailable):
            await cache.ping()
        with pytest.raises(BackendUnavailable):
            await cache.put_latest([latest(1)])
        with pytest.raises(BackendUnavailable):
            await cache.get_latest(metric="tvl")
        with pytest.raises(BackendUnavailable):
            await cache.get_latest("tvl", "uniswap", "ethereum")
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [("plain:slug-1.x", "plain:slug-1.x"), ("a*b", "a\\*b"), ("x[1]", "x\\[1\\]"),
     ("q?", "q\\?"), ("back\\slash", "back\\\\slash"), ("", "")],
)
def test_glob_escape(text: str, pattern: str) -> None:
    assert glob_escape(text) == pattern
