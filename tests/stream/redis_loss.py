"""Redis losing its data, as a test can cause it on a shared server: every key of the test's
prefix is deleted (what a FLUSHALL or a restart without persistence does to one deployment,
without touching the keys of tests running beside it)."""

from __future__ import annotations

import redis.asyncio as aioredis


async def lose_redis_data(url: str, prefix: str) -> int:
    """Delete every key under `prefix`; return how many there were."""
    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()
