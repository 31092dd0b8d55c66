"""Consumer groups (stream/group.py): one contract, memory and Redis.

(Kept with the alert tests: the alert engine is the group's one user.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from defiwatch.domain import Event
from defiwatch.redis_keys import RedisKeys
from defiwatch.store.schema import alert_history
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream
from defiwatch.stream.group import MemoryStreamGroup, RedisStreamGroup, StreamGroup
from stream.redis_loss import lose_redis_data

from .conftest import HOUR, T0, Alerting, point
from .test_engine import create_rule, rows


def ev(ts: int, subject: str = "aave") -> Event:
    return Event(type="tvl_change", metric="tvl", subject=subject, chain="-", value=float(ts),
                 previous=None, change_abs=None, change_pct=None, change_1h=None,
                 change_24h=None, change_7d=None, ts=ts, emitted_at=0.0, source="test")


@dataclass
class Backend:
    stream: EventStream
    client: aioredis.Redis | None
    prefix: str
    clock: list[float]
    _memory: MemoryStreamGroup | None = None

    def group(self, consumer: str) -> StreamGroup:
        if self.client is not None:
            return RedisStreamGroup(self.client, prefix=self.prefix, group="g", consumer=consumer)
        if self._memory is None:
            self._memory = MemoryStreamGroup(self.stream, consumer=consumer,
                                             clock=lambda: self.clock[0])
            return self._memory
        return self._memory.with_consumer(consumer)

    async def idle(self, seconds: float) -> None:
        if self.client is None:
            self.clock[0] += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield Backend(MemoryEventStream(retention=1000), None, "", [0.0])
        return
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    client = aioredis.from_url(url, socket_timeout=5)
    try:
        yield Backend(RedisEventStream(client, prefix=prefix, retention=1000), client, prefix,
                      [0.0])
    finally:
        await client.aclose()


async def test_a_new_group_starts_after_the_newest_event(backend: Backend) -> None:
    await backend.stream.publish([ev(1)])
    one = backend.group("one")
    await one.ensure("latest")
    await backend.stream.publish([ev(2)])
    assert [d.offset for d in await one.read(10, 0)] == [2]


async def test_consumers_share_entries_and_ack_them(backend: Backend) -> None:
    one, two = backend.group("one"), backend.group("two")
    await one.ensure()
    await two.ensure()
    await backend.stream.publish([ev(ts) for ts in range(1, 7)])
    first = await one.read(4, 0)
    second = await two.read(10, 0)
    assert [d.offset for d in first] == [1, 2, 3, 4]
    assert [d.offset for d in second] == [5, 6]
    assert first[0].event is not None and first[0].event.ts == 1
    assert await one.read(10, 0) == []
    assert [d.offset for d in await one.pending(10)] == [1, 2, 3, 4]
    await one.ack([1, 2])
    assert [d.offset for d in await one.pending(10)] == [3, 4]


async def test_a_dead_consumers_entries_are_claimed_after_the_idle_time(backend: Backend) -> None:
    dead, alive = backend.group("dead"), backend.group("alive")
    await dead.ensure()
    await backend.stream.publish([ev(1), ev(2)])
    assert len(await dead.read(10, 0)) == 2
    assert await alive.claim(10.0, 10) == []  # not idle long enough
    await backend.idle(0.2)
    claimed = await alive.claim(0.1, 10)
    assert [d.offset for d in claimed] == [1, 2]
    assert [d.offset for d in await alive.pending(10)] == [1, 2]
    assert await dead.pending(10) == []
    await alive.ack([1, 2])
    await backend.idle(0.2)
    assert await alive.claim(0.1, 10) == []


async def test_read_waits_for_a_publish(backend: Backend) -> None:
    one = backend.group("one")
    await one.ensure()

    async def later() -> None:
        await asyncio.sleep(0.05)
        await backend.stream.publish([ev(1)])

    task = asyncio.create_task(later())
    got = await one.read(10, 2.0)
    await task
    assert [d.offset for d in got] == [1]


# --- Redis losing the group (stream/group.py RedisStreamGroup) -------------------------------


@pytest.fixture
async def redis_backend(redis_url: str, redis_prefix: str) -> AsyncIterator[Backend]:
    client = aioredis.from_url(redis_url, socket_timeout=5)
    try:
        yield Backend(RedisEventStream(client, prefix=redis_prefix, retention=1000), client,
                      redis_prefix, [0.0])
    finally:
        await client.aclose()


async def test_a_lost_group_is_recreated_at_the_last_acked_offset(
        redis_backend: Backend) -> None:
    """Only the group is gone (the stream lives on, same epoch): the events published while
    it was missing are delivered, those acked before are not."""
    one = redis_backend.group("one")
    await one.ensure("latest")
    await redis_backend.stream.publish([ev(1), ev(2), ev(3)])
    await one.ack([d.offset for d in await one.read(10, 0)])
    assert redis_backend.client is not None
    await redis_backend.client.xgroup_destroy(RedisKeys(redis_backend.prefix).stream_events, "g")
    await redis_backend.stream.publish([ev(4), ev(5)])
    assert [d.offset for d in await one.read(10, 0)] == [4, 5]


async def test_a_group_lost_with_its_stream_starts_at_the_new_streams_start(
        redis_url: str, redis_backend: Backend) -> None:
    """Redis lost everything (a new epoch): the new stream's events all came after the fault;
    a group recreated at `$` would skip those published before the worker's next command."""
    one, two = redis_backend.group("one"), redis_backend.group("two")
    await one.ensure("latest")
    await redis_backend.stream.publish([ev(ts) for ts in range(1, 6)])
    await one.ack([d.offset for d in await one.read(10, 0)])
    await lose_redis_data(redis_url, redis_backend.prefix)
    await redis_backend.stream.publish([ev(10), ev(11)])  # offsets 1 and 2 of the new stream
    assert await one.pending(10) == []  # NOGROUP: recreated, nothing of the new life pending
    got = await one.read(10, 0)
    assert [(d.offset, d.event.ts if d.event else None) for d in got] == [(1, 10), (2, 11)]
    await one.ack([1, 2])
    await redis_backend.stream.publish([ev(12)])
    assert [d.offset for d in await two.read(10, 0)] == [3]  # the same group, another worker


@pytest.mark.parametrize("settings", ["production"], indirect=True)
async def test_events_published_while_redis_had_lost_the_group_are_evaluated(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any, redis_url: str,
) -> None:
    """The engine goes on after NOGROUP (no exit) and fires on the first event of the new
    stream, published before the worker's next command."""
    await create_rule(client, await make_key(), condition={
        "metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9})
    engine = alerting.engine()
    await alerting.ingest(point("aave", T0, 1.2e9))
    await engine.drain()
    await lose_redis_data(redis_url, alerting.platform.settings.redis_prefix)
    await alerting.ingest(point("aave", T0 + HOUR, 0.9e9))
    assert await engine.drain() == 1
    assert [r["state"] for r in await rows(alerting, alert_history)] == ["firing"]
