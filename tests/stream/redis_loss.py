"""Redis losing its data, as a test can cause it on a shared server: every key of the test's
prefix is deleted (what a FLUSHALL or a restart without persistence does to one deployment,
without touching the keys of tests running beside it). conftest's `redis_prefix` cleans up
with the same `delete_prefix`."""

from __future__ import annotations

import asyncio

import redis


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under `prefix`; return how many there were."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


async def lose_redis_data(url: str, prefix: str) -> int:
    """`delete_prefix` from a test's event loop (in a thread: the client is synchronous)."""
    return await asyncio.to_thread(delete_prefix, url, prefix)
