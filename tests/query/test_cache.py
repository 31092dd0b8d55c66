"""One contract for the in-process and Redis result caches (query/cache.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from defiwatch.cooldown import Cooldown
from defiwatch.errors import BackendUnavailable
from defiwatch.query import CoolingResultCache, MemoryResultCache, RedisResultCache, ResultCache
from loopback import free_port


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[ResultCache]:
    if request.param == "memory":
        yield MemoryResultCache(max_entries=100)
        return
    client = aioredis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield RedisResultCache(client, prefix=request.getfixturevalue("redis_prefix"))
    finally:
        await client.aclose()


async def test_get_returns_the_last_put(cache: ResultCache) -> None:
    assert await cache.get("k") is None
    await cache.put("k", b"one", 60)
    await cache.put("k", b"two\x00\xff", 60)
    assert await cache.get("k") == b"two\x00\xff"
    await cache.put("other", b"x", 0)  # ttl <= 0 stores nothing
    assert await cache.get("other") is None


async def test_entries_expire(cache: ResultCache) -> None:
    await cache.put("short", b"v", 0.05)
    assert await cache.get("short") == b"v"
    await asyncio.sleep(0.15)
    assert await cache.get("short") is None


async def test_touch_renews_only_a_live_entry(cache: ResultCache) -> None:
    assert await cache.touch("absent", 60) is False
    assert await cache.get("absent") is None  # touching stores nothing
    await cache.put("k", b"v", 60)
    assert await cache.touch("k", 60) is True
    assert await cache.get("k") == b"v"
    assert await cache.touch("k", 0) is False  # ttl <= 0: gone, like put
    assert await cache.get("k") is None


async def test_memory_touch_gives_a_new_lifetime() -> None:
    now = [0.0]
    cache = MemoryResultCache(clock=lambda: now[0])
    await cache.put("k", b"v", 10)
    now[0] = 8.0
    assert await cache.touch("k", 10) is True
    now[0] = 15.0  # past the first lifetime, within the renewed one
    assert await cache.get("k") == b"v"
    now[0] = 18.0
    assert await cache.get("k") is None
    assert await cache.touch("k", 10) is False


async def test_memory_cache_evicts_the_least_recently_used() -> None:
    now = [0.0]
    cache = MemoryResultCache(max_entries=2, clock=lambda: now[0])
    await cache.put("a", b"1", 10)
    await cache.put("b", b"2", 10)
    assert await cache.get("a") == b"1"  # a is now the most recent
    await cache.put("c", b"3", 10)
    assert (await cache.get("b"), await cache.get("a"), len(cache)) == (None, b"1", 2)
    now[0] = 11.0
    assert await cache.get("a") is None


async def test_a_failing_cache_costs_speed_not_answers(tmp_path: object) -> None:
    from defiwatch.app import open_platform
    from defiwatch.config import Settings
    from defiwatch.query import QueryService
    from defiwatch.query.service import CACHE_ERRORS

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/c.db", replay_enabled=False,
                        demo_key=False)
    async with open_platform(settings) as p:
        broken = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        service = QueryService(p.engine, RedisResultCache(broken, prefix="x:"))
        before = CACHE_ERRORS._value.get()
        answers = [await service.advanced({"select": ["slug"]}) for _ in range(2)]
        assert [a.cache for a in answers] == ["miss", "miss"]
        assert CACHE_ERRORS._value.get() >= before + 2
        await broken.aclose()


async def test_a_failed_backend_is_skipped_for_the_cooldown(redis_prefix: str) -> None:
    """A Redis nobody listens on fails every call; after the first, calls fail at once (the
    backend is not asked) until the cooldown has passed."""
    now = [100.0]
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1,
                            retry=Retry(NoBackoff(), 0))  # as the API's request client
    cache = CoolingResultCache(RedisResultCache(client, prefix=redis_prefix),
                               Cooldown(1.0, clock=lambda: now[0]))
    try:
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await cache.get("k")
        for call in (cache.get("k"), cache.put("k", b"v", 5), cache.touch("k", 5)):
            with pytest.raises(BackendUnavailable, match="skipped for 1 s"):
                await call
        now[0] += 1.01
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await cache.put("k", b"v", 5)
    finally:
        await client.aclose()


async def test_a_working_backend_passes_through(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url)
    cache = CoolingResultCache(RedisResultCache(client, prefix=redis_prefix), Cooldown(1.0))
    try:
        await cache.put("k", b"v", 5)
        assert await cache.get("k") == b"v"
        assert await cache.touch("k", 5)
    finally:
        await client.aclose()
