"""The EventStream contract (stream/base.py), run against every backend with one fixture.

Redis-only behaviour (a restarted publisher, a lost counter, socket timeouts, unreachable server,
error mapping) follows the contract tests; the memory ring also gets a property test.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from hypothesis import given, settings
from prometheus_client import REGISTRY
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conftest import TIMEOUT_FACTOR
from defiwatch.domain import Event, SeriesKey
from defiwatch.errors import BackendUnavailable
from defiwatch.redis_keys import RedisKeys
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream
from defiwatch.stream.redis import REDIS_UNAVAILABLE_ERRORS, redis_unavailable

OpenStream = Callable[..., Awaitable[EventStream]]

UNI = SeriesKey("tvl", "uniswap", "ethereum")
AAVE = SeriesKey("tvl", "aave", "ethereum")
ETH = SeriesKey("price", "coingecko:ethereum", "-")


def ev(ts: int, value: float | None = 1.0, series: SeriesKey = UNI) -> Event:
    return Event(
        type="price_change" if series.metric == "price" else "tvl_change",
        metric=series.metric, subject=series.subject, chain=series.chain,
        value=value, previous=None, change_abs=None, change_pct=None,
        change_1h=None, change_24h=None, change_7d=None,
        ts=ts, emitted_at=1_700_000_000.5, source="test",
    )


# --- fixtures -----------------------------------------------------------------------------


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
async def open_stream(backend: tuple[str, str] | None) -> AsyncIterator[OpenStream]:
    """Open streams of the parametrized backend; Redis ones share the test's prefix."""
    opened: list[EventStream] = []
    clients: list[aioredis.Redis] = []

    async def open_(retention: int = 1000, **options: Any) -> EventStream:
        """`options`: dedup_key (both backends), name (Redis: the stream's own keys)."""
        stream: EventStream
        if backend is None:
            options.pop("name", None)
            stream = MemoryEventStream(retention, **options)
        else:
            url, prefix = backend
            client = aioredis.from_url(url)
            clients.append(client)
            stream = RedisEventStream(client, prefix=prefix, retention=retention, **options)
        opened.append(stream)
        return stream

    yield open_
    for stream in opened:
        await stream.close()
    for client in clients:
        await client.aclose()


@pytest.fixture
async def stream(open_stream: OpenStream) -> EventStream:
    return await open_stream()


def backend_name(stream: EventStream) -> str:
    return "memory" if isinstance(stream, MemoryEventStream) else "redis"


# --- offsets and publish ------------------------------------------------------------------


async def test_empty_stream(stream: EventStream) -> None:
    assert await stream.last_offset() == 0
    page = await stream.read(0, 10)
    assert (page.events, page.first_offset, page.last_offset, page.gap) == ([], 0, 0, False)


async def test_offsets_start_at_one_and_grow_by_one(stream: EventStream) -> None:
    first = await stream.publish([ev(1), ev(2, series=AAVE), ev(3)])
    second = await stream.publish([ev(4), ev(5)])
    assert [e.offset for e in first + second] == [1, 2, 3, 4, 5]
    assert await stream.last_offset() == 5


async def test_publish_returns_copies_and_read_round_trips(stream: EventStream) -> None:
    sent = [ev(10, 1.25), ev(11, None, series=ETH)]
    sent[1].detail = {"slug": "uniswap", "chains_added": ["base"]}
    published = await stream.publish(sent)
    assert [e.offset for e in sent] == [0, 0]  # the caller's events are not modified
    assert [(e.series, e.ts, e.value, e.detail) for e in published] == [
        (UNI, 10, 1.25, None), (ETH, 11, None, sent[1].detail)]
    assert (await stream.read(0, 10)).events == published


async def test_publish_of_nothing(stream: EventStream) -> None:
    assert await stream.publish([]) == []
    assert await stream.last_offset() == 0


# --- per-series dedup ---------------------------------------------------------------------


async def test_republishing_a_batch_adds_nothing(stream: EventStream) -> None:
    """The crash-replay case: a processor re-sends the batch it may already have published."""
    batch = [ev(100), ev(100, series=AAVE), ev(101)]
    first = await stream.publish(batch)
    assert await stream.publish(batch) == []
    assert await stream.last_offset() == 3
    assert (await stream.read(0, 10)).events == first


async def test_older_ts_is_dropped_other_series_unaffected(stream: EventStream) -> None:
    await stream.publish([ev(10)])
    out = await stream.publish([ev(5), ev(5, series=AAVE), ev(10), ev(11)])
    assert [(e.series, e.ts, e.offset) for e in out] == [(AAVE, 5, 2), (UNI, 11, 3)]


async def test_events_of_one_batch_are_checked_against_each_other(stream: EventStream) -> None:
    out = await stream.publish([ev(2), ev(1), ev(2), ev(3), ev(1, series=AAVE)])
    assert [(e.series, e.ts) for e in out] == [(UNI, 2), (UNI, 3), (AAVE, 1)]


# --- read ---------------------------------------------------------------------------------


async def test_read_pages_by_since_and_limit(stream: EventStream) -> None:
    await stream.publish([ev(ts) for ts in range(1, 11)])
    seen: list[int] = []
    since = 0
    while True:
        page = await stream.read(since, 4)
        assert (page.first_offset, page.last_offset, page.gap) == (1, 10, False)
        if not page.events:
            break
        assert len(page.events) <= 4
        seen += [e.offset for e in page.events]
        since = page.events[-1].offset
    assert seen == list(range(1, 11))
    assert [e.ts for e in (await stream.read(7, 100)).events] == [8, 9, 10]
    assert (await stream.read(3, 0)).events == []


async def test_read_beyond_last_offset_is_a_gap(stream: EventStream) -> None:
    """A position from an earlier life of the stream (restart, flush) must not look caught up."""
    await stream.publish([ev(1), ev(2)])
    page = await stream.read(7, 10)
    assert (page.events, page.last_offset, page.gap) == ([], 2, True)
    assert (await stream.read(-3, 10)).gap is False  # negative: from the start
    assert [e.offset for e in (await stream.read(-3, 10)).events] == [1, 2]


async def test_retention_trims_and_reports_gap(open_stream: OpenStream) -> None:
    stream = await open_stream(retention=10)
    total = 500
    for start in range(0, total, 50):
        await stream.publish([ev(ts) for ts in range(start + 1, start + 51)])

    page = await stream.read(0, 1000)
    first = page.first_offset
    assert 1 < first <= total - 10 + 1  # trimmed, yet at least `retention` events kept
    assert (page.last_offset, page.gap) == (total, True)
    assert [e.offset for e in page.events] == list(range(first, total + 1))
    # Resuming right before the oldest retained event is clean; one further back is a hole.
    assert (await stream.read(first - 1, 5)).gap is False
    assert (await stream.read(first - 2, 5)).gap is True
    # Caught up: nothing was lost after `since`, whatever was trimmed before it.
    tail = await stream.read(total, 5)
    assert (tail.events, tail.gap) == ([], False)


async def test_retention_keeps_dedup_for_trimmed_series(open_stream: OpenStream) -> None:
    stream = await open_stream(retention=1)
    await stream.publish([ev(10)])
    await stream.publish([ev(ts, series=AAVE) for ts in range(1, 300)])
    assert await stream.publish([ev(10)]) == []


# --- wait ---------------------------------------------------------------------------------


async def test_wait_wakes_on_publish(stream: EventStream) -> None:
    await stream.publish([ev(1)])
    waiter = asyncio.create_task(stream.wait(1, timeout=60 * TIMEOUT_FACTOR))
    try:
        # Not a synchronisation: whether or not the waiter is blocked yet, it must end below.
        done, _ = await asyncio.wait({waiter}, timeout=0.05 * TIMEOUT_FACTOR)
        assert not done, "wait returned although nothing newer than `after` was published"
        await stream.publish([ev(2)])
        assert await asyncio.wait_for(waiter, 5 * TIMEOUT_FACTOR) == 2
    finally:
        waiter.cancel()


async def test_wait_returns_at_once_when_newer_events_exist(stream: EventStream) -> None:
    await stream.publish([ev(1), ev(2)])
    assert await asyncio.wait_for(stream.wait(0, 60 * TIMEOUT_FACTOR), 5 * TIMEOUT_FACTOR) == 2


async def test_wait_returns_on_timeout(stream: EventStream) -> None:
    await stream.publish([ev(1)])
    assert await stream.wait(1, timeout=0.05) == 1
    assert await stream.wait(1, timeout=0) == 1


# --- last_published, ping, metrics --------------------------------------------------------


async def test_last_published(stream: EventStream) -> None:
    await stream.publish([ev(10, 1.5), ev(20, 2.5, series=AAVE), ev(30, 3.5)])
    await stream.publish([ev(25, 9.0)])  # dropped: older than 30
    await stream.publish([ev(40, None, series=ETH)])
    got = await stream.last_published([UNI, AAVE, ETH, SeriesKey("tvl", "nope", "-")])
    assert got.keys() == {UNI, AAVE, ETH}
    assert (got[UNI], got[AAVE]) == ((30, 3.5), (20, 2.5))
    assert got[ETH][0] == 40 and math.isnan(got[ETH][1])
    assert await stream.last_published([]) == {}


async def test_ping(stream: EventStream) -> None:
    await stream.ping()


async def test_metrics_count_published_and_deduplicated(stream: EventStream) -> None:
    labels = {"backend": backend_name(stream)}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    published = sample("defiwatch_stream_events_published_total")
    deduplicated = sample("defiwatch_stream_events_deduplicated_total")
    await stream.publish([ev(1), ev(2)])
    await stream.publish([ev(2), ev(3)])
    assert sample("defiwatch_stream_events_published_total") - published == 3
    assert sample("defiwatch_stream_events_deduplicated_total") - deduplicated == 1


# --- Redis only ---------------------------------------------------------------------------


async def test_redis_second_instance_continues_offsets(redis_url: str, redis_prefix: str) -> None:
    """A restarted publisher (new client, new object, same prefix) continues the same stream."""
    first_client = aioredis.from_url(redis_url)
    second_client = aioredis.from_url(redis_url)
    try:
        before = RedisEventStream(first_client, prefix=redis_prefix, retention=100)
        batch = [ev(1), ev(2), ev(1, series=AAVE)]
        await before.publish(batch)
        await before.close()

        after = RedisEventStream(second_client, prefix=redis_prefix, retention=100)
        assert await after.last_offset() == 3
        assert await after.publish(batch) == []  # the dedup state survived too
        assert [e.offset for e in await after.publish([ev(3)])] == [4]
        assert await after.last_published([UNI]) == {UNI: (3, 1.0)}
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_redis_lost_counter_resumes_after_newest_entry(
    redis_url: str, redis_prefix: str
) -> None:
    client = aioredis.from_url(redis_url)
    try:
        stream = RedisEventStream(client, prefix=redis_prefix, retention=100)
        await stream.publish([ev(1), ev(2)])
        await client.delete(RedisKeys(redis_prefix).stream_offset)
        assert [e.offset for e in await stream.publish([ev(3)])] == [3]
    finally:
        await client.aclose()


async def test_redis_wait_longer_than_socket_timeout(redis_url: str, redis_prefix: str) -> None:
    """redis-py applies socket_timeout to XREAD BLOCK replies: wait must block in slices."""
    client = aioredis.from_url(redis_url, socket_timeout=1.0)
    try:
        stream = RedisEventStream(client, prefix=redis_prefix, retention=100)
        assert await stream.wait(0, timeout=1.3) == 0
        await stream.publish([ev(1)])
        assert await stream.wait(0, timeout=1.3) == 1
    finally:
        await client.aclose()


async def test_redis_unreachable_raises_backend_unavailable() -> None:
    client = aioredis.from_url(
        "redis://127.0.0.1:1/0", retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=2 * TIMEOUT_FACTOR,
    )
    stream = RedisEventStream(client, prefix="dw:", retention=100)
    try:
        with pytest.raises(BackendUnavailable) as info:
            await stream.ping()
        assert info.value.temporary
        assert isinstance(info.value.__cause__, redis_errors.ConnectionError)
        with pytest.raises(BackendUnavailable):
            await stream.publish([ev(1)])
        with pytest.raises(BackendUnavailable):
            await stream.read(0, 10)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ConnectionError("refused"),
        redis_errors.BusyLoadingError("loading"),
        redis_errors.AuthenticationError("auth"),
        redis_errors.TimeoutError("slow"),
        redis_errors.ReadOnlyError("replica"),
        redis_errors.ClusterDownError("down"),
        redis_errors.MasterDownError("down"),
        redis_errors.TryAgainError("resharding"),
        ConnectionResetError("reset"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_redis_unavailable_errors_are_mapped(error: Exception) -> None:
    assert isinstance(error, REDIS_UNAVAILABLE_ERRORS)
    with pytest.raises(BackendUnavailable) as info, redis_unavailable("test"):
        raise error
    assert info.value.__cause__ is error


def test_redis_other_errors_propagate() -> None:
    """A ResponseError (wrong key type, script bug) is our bug, not an outage."""
    with pytest.raises(redis_errors.ResponseError), redis_unavailable("test"):
        raise redis_errors.ResponseError("WRONGTYPE")


# --- memory ring properties ---------------------------------------------------------------

_SERIES = [UNI, AAVE, ETH]
_batches = st.lists(
    st.lists(st.tuples(st.sampled_from(_SERIES), st.integers(0, 12)), max_size=8),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(batches=_batches, retention=st.integers(1, 20))
def test_memory_ring_properties(
    batches: list[list[tuple[SeriesKey, int]]], retention: int
) -> None:
    """Offsets dense and increasing; each (series, ts) at most once; per series ts increasing;
    exactly the events newer than their series' newest earlier event are kept."""

    async def scenario() -> None:
        stream = MemoryEventStream(retention)
        newest: dict[SeriesKey, int] = {}
        expected: list[tuple[SeriesKey, int]] = []
        for batch in batches:
            out = await stream.publish([ev(ts, series=series) for series, ts in batch])
            kept = []
            for series, ts in batch:
                if ts > newest.get(series, -1):
                    newest[series] = ts
                    kept.append((series, ts))
            assert [(e.series, e.ts) for e in out] == kept
            assert [e.offset for e in out] == list(
                range(len(expected) + 1, len(expected) + len(kept) + 1))
            expected += kept

        page = await stream.read(0, 10_000)
        assert page.last_offset == len(expected) == await stream.last_offset()
        offsets = [e.offset for e in page.events]
        assert offsets == list(range(page.last_offset - len(offsets) + 1, page.last_offset + 1))
        assert page.first_offset == (offsets[0] if offsets else 0)
        assert len(page.events) == min(retention, len(expected))
        assert page.gap == (len(expected) > retention)
        assert [(e.series, e.ts) for e in page.events] == expected[len(expected) - len(offsets):]
        pairs = [(e.series, e.ts) for e in page.events]
        assert len(set(pairs)) == len(pairs)
        for series in _SERIES:
            stamps = [e.ts for e in page.events if e.series == series]
            assert stamps == sorted(set(stamps))

    asyncio.run(scenario())



async def test_a_named_stream_with_its_own_dedup_key(open_stream: OpenStream) -> None:
    """A second stream (fired alerts) is independent of the event stream and dedups per
    (rule, series): two rules firing on one point both stay, a re-publish adds nothing."""
    import msgspec

    def by_rule(event: Event) -> str:
        return f"{(event.detail or {}).get('rule_id')}|{event.series}"

    events = await open_stream()
    alerts = await open_stream(name="alerts", dedup_key=by_rule)
    first = msgspec.structs.replace(ev(100), detail={"rule_id": 1})
    second = msgspec.structs.replace(ev(100), detail={"rule_id": 2})
    published = await alerts.publish([first, second])
    assert [(e.offset, e.detail) for e in published] == [(1, {"rule_id": 1}), (2, {"rule_id": 2})]
    assert await alerts.publish([first, second]) == []
    assert await events.last_offset() == 0
    assert [e.offset for e in await events.publish([ev(100)])] == [1]


async def test_epoch_names_one_life_of_the_stream(open_stream: OpenStream) -> None:
    """Stable across calls and publishes, shared by every reader of the same stream; a
    different stream (or, for memory, a new object: a restarted process) has another one."""
    stream = await open_stream()
    epoch = await stream.epoch()
    assert isinstance(epoch, str) and epoch
    await stream.publish([ev(1)])
    assert await stream.epoch() == epoch
    assert await (await open_stream(name="alerts")).epoch() != epoch
    again = await open_stream()
    if isinstance(stream, MemoryEventStream):
        assert await again.epoch() != epoch  # a new ring: offsets restarted
    else:
        assert await again.epoch() == epoch  # same prefix and name: the same Redis stream


async def test_redis_epoch_changes_when_the_stream_is_lost(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        stream = RedisEventStream(client, prefix=redis_prefix, retention=100)
        before = await stream.epoch()
        await client.delete(RedisKeys(redis_prefix).stream_epoch)  # as a FLUSHALL would
        assert await stream.epoch() != before
    finally:
        await client.aclose()
