"""The hot cache rebuilt from the database (processor/fill.py) on both deployments: the same
entries the processor wrote, after the cache lost its data, at start and when the marker is
gone, and not otherwise."""

from __future__ import annotations

import asyncio

import pytest

from defiwatch.app import Platform, open_platform
from defiwatch.cache import HotCache, MemoryHotCache
from defiwatch.config import Settings
from defiwatch.processor import CacheFiller
from stream.redis_loss import lose_redis_data

T0 = 1_710_115_200
HOUR, DAY = 3_600, 86_400


async def ingest(platform: Platform) -> None:
    """Two series with ten days of hourly points (so 1h, 24h and 7d changes exist), one with
    a single point (no reference at all), one with a gap where 1h finds no reference."""
    points = [{"metric": "tvl", "subject": "aave", "chain": "ethereum", "ts": T0 + h * HOUR,
               "value": 1e9 + h * 1e6} for h in range(240)]
    points += [{"metric": "price", "subject": "coingecko:ethereum", "ts": T0 + h * HOUR,
                "value": 3000.0 - h} for h in range(240)]
    points += [{"metric": "tvl", "subject": "curve", "chain": "base", "ts": T0, "value": 5e8}]
    points += [{"metric": "tvl", "subject": "lido", "ts": T0 + d * DAY, "value": 1e9 * (1 + d)}
               for d in range(3)]
    result = await platform.ingest.ingest_points(points, source="test")
    assert not result.rejected, result.rejected
    await platform.processor().drain()


async def lose(platform: Platform) -> HotCache:
    """The cache after losing its data: Redis keys deleted, or a new process's memory."""
    s = platform.settings
    if platform.redis is None:
        return MemoryHotCache()
    assert s.redis_url is not None
    await lose_redis_data(s.redis_url.get_secret_value(), s.redis_prefix)
    return platform.cache


async def test_a_refill_writes_what_the_processor_wrote(settings: Settings) -> None:
    async with open_platform(settings) as p:
        await ingest(p)
        written = await p.cache.get_latest()
        assert len(written) == 4
        cache = await lose(p)
        assert await cache.get_latest() == []
        assert await CacheFiller(p.engine, cache, check_s=60).refill() == 4
        assert await cache.get_latest() == written
        aave = next(x for x in written if x.subject == "aave")
        assert aave.change_1h is not None and aave.change_7d is not None
        lido = next(x for x in written if x.subject == "lido")
        assert (lido.change_1h, lido.change_24h) == (None, 50.0)
        assert await cache.filled()


async def test_refills_at_start_even_with_the_marker(settings: Settings) -> None:
    async with open_platform(settings) as p:
        await ingest(p)
        await p.cache.mark_filled()
        assert await CacheFiller(p.engine, p.cache, check_s=5).check() == 4


@pytest.mark.parametrize("settings", ["production"], indirect=True)
async def test_a_lost_marker_refills_at_the_next_check(settings: Settings) -> None:
    now = [0.0]
    async with open_platform(settings) as p:
        await ingest(p)
        filler = CacheFiller(p.engine, p.cache, check_s=5, clock=lambda: now[0])
        assert await filler.check() == 4  # at start
        now[0] += 5
        assert await filler.check() is None  # the marker is there
        await lose(p)
        now[0] += 1
        assert await filler.check() is None  # not due yet
        assert await p.cache.get_latest() == []
        now[0] += 5
        assert await filler.check() == 4
        assert len(await p.cache.get_latest()) == 4


async def complete(cache: HotCache) -> None:
    """Until the cache holds the four series again (a refill by a running processor; nothing
    announces it but the cache itself)."""
    async with asyncio.timeout(20):
        while len(await cache.get_latest()) < 4:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_running_processor_refills_a_lost_cache(settings: Settings) -> None:
    """`run` refills at start (an embedded process's empty memory), and on Redis again within
    `processor_cache_check_s` of a loss."""
    settings = settings.model_copy(update={"processor_cache_check_s": 0.05})
    async with open_platform(settings) as p:
        await ingest(p)
        p.cache = await lose(p)
        stop = asyncio.Event()
        task = asyncio.create_task(p.processor().run(stop))
        try:
            await complete(p.cache)
            if p.redis is not None:
                await lose(p)
                await complete(p.cache)
        finally:
            stop.set()
            p.wakeup.notify()
            await task
