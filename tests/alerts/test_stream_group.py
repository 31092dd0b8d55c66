"""Consumer groups (stream/group.py): one contract, memory and Redis.

(Kept with the alert tests: the alert engine is the group's one user.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from defiwatch.domain import Event
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream
from defiwatch.stream.group import MemoryStreamGroup, RedisStreamGroup, StreamGroup


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
