"""The event stream on Redis Streams: the production backend, shared by every process.

Layout (names in `defiwatch.redis_keys`): one stream whose entry ids are `{offset}-0`, so an
offset *is* the entry id and `read(since)` is an XRANGE; an INCR counter that hands out offsets
(kept apart from the stream, so trimming never resets it); a hash with each series' last
published `"{ts} {value}"` for the dedup. `stream/lua/publish.lua` checks, numbers and appends a
whole batch in one atomic script call (see its header). A fourth key holds the stream's epoch,
a random id created by the first `epoch()` call (SET NX) and gone with the other keys.

Entries hold the event JSON with `offset` 0; the entry id is the only record of the offset and
is set on the decoded event when reading.

The Redis client is the caller's: this class never closes it, so one client (and its pool) can
serve the stream and the cache; whoever created it closes it after calling `close` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import structlog

from defiwatch.domain import Event, SeriesKey
from defiwatch.errors import BackendUnavailable
from defiwatch.redis_keys import STREAM_ENTRY_FIELD, RedisKeys
from defiwatch.stream.base import DedupKey, StreamSlice, series_key
from defiwatch.stream.memory import has_gap
from defiwatch.stream.metrics import PublishRecorder

__all__ = ["REDIS_UNAVAILABLE_ERRORS", "RedisEventStream", "redis_unavailable", "stream_epoch"]

log = structlog.get_logger(__name__)

_BACKEND = "redis"
_PUBLISH_LUA = resources.files("defiwatch.stream").joinpath("lua/publish.lua").read_text("utf-8")

# Errors that mean "Redis cannot serve us right now" and become BackendUnavailable (temporary).
# Anything else (ResponseError from a wrong key type, a script bug) is our bug and propagates.
REDIS_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,  # refused, reset, auth, loading (BusyLoadingError), pool full
    redis_errors.TimeoutError,  # socket_timeout / socket_connect_timeout passed
    redis_errors.ReadOnlyError,  # we reached a replica, e.g. during a failover
    redis_errors.ClusterDownError,  # includes MasterDownError
    redis_errors.TryAgainError,  # cluster resharding
    OSError,  # a socket error redis-py did not wrap
)


@contextlib.contextmanager
def redis_unavailable(operation: str) -> Iterator[None]:
    """Translate Redis reachability errors raised in the block into BackendUnavailable.

    Args:
        operation: what was attempted, e.g. "stream.publish"; goes into the message and the log.

    Raises:
        BackendUnavailable: from the original exception (kept as `__cause__`).
    """
    try:
        yield
    except REDIS_UNAVAILABLE_ERRORS as exc:
        log.warning("redis.unavailable", operation=operation, error=str(exc),
                    error_type=type(exc).__name__)
        raise BackendUnavailable(
            f"Redis is unavailable ({operation}: {type(exc).__name__}: {exc}); "
            "check that it is running and DEFIWATCH_REDIS_URL points to it, then retry"
        ) from exc


def _text(raw: bytes | str) -> str:
    # The client may or may not have decode_responses=True; accept both.
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _entry_offset(entry_id: bytes | str) -> int:
    return int(_text(entry_id).partition("-")[0])


async def stream_epoch(client: aioredis.Redis, keys: RedisKeys) -> str:
    """The epoch of the stream named by `keys`, created by the first caller (SET NX); shared
    with stream/group.py, which needs it to tell a lost group from a lost stream.

    Raises:
        BackendUnavailable: Redis could not be reached.
    """
    with redis_unavailable("stream.epoch"):
        # MULTI/EXEC: the GET sees either the value we just set or the one that was there.
        async with client.pipeline(transaction=True) as pipe:
            pipe.set(keys.stream_epoch, uuid.uuid4().hex, nx=True)
            pipe.get(keys.stream_epoch)
            replies: list[Any] = await pipe.execute()
    return _text(replies[1])


PUBLISH_CHUNK = 1_000  # events per atomic script call


class RedisEventStream:
    """The event stream on Redis Streams (see module docstring).

    Args:
        client: a `redis.asyncio.Redis`; owned by the caller. Its `socket_timeout` (seconds,
            None = no limit) bounds each blocking XREAD in `wait`, which is split to fit.
        prefix: the key prefix (`DEFIWATCH_REDIS_PREFIX`).
        name: the stream's name within the prefix ("stream" = the event stream).
        dedup_key: the identity whose `ts` must increase (default: the event's series).
        retention: events kept for `read` (>= 1); approximate: Redis trims whole radix-tree
            nodes (`MAXLEN ~`), so it may keep up to about 100 more, never fewer.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        retention: int,
        name: str = "stream",
        dedup_key: DedupKey = series_key,
    ) -> None:
        if retention < 1:
            raise ValueError(f"retention must be >= 1 event, got {retention}")
        self._client = client
        self._keys = RedisKeys(prefix, name)
        self._dedup_key = dedup_key
        self._retention = retention
        self._publish_script = client.register_script(_PUBLISH_LUA)
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Event)
        # redis-py applies socket_timeout to every reply, including a blocking XREAD's: a block
        # longer than it would fail as a TimeoutError. Block in slices that fit inside it, with
        # a margin: Redis checks block timeouts on its ~100 ms tick (hz 10), so a reply may come
        # that much late. (A socket_timeout under ~0.3 s is too tight for any blocking read.)
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block_s: float | None = (
            None
            if socket_timeout is None
            else float(socket_timeout) - min(1.0, float(socket_timeout) / 2)
        )
        self._metrics = PublishRecorder(_BACKEND)

    async def publish(self, events: Sequence[Event]) -> list[Event]:
        """Append the events newer than their series' last published `ts`; return them.

        One script call per chunk of `PUBLISH_CHUNK` events: dedup, numbering and append are
        atomic per chunk, and a chunk keeps Redis busy for about a millisecond, not a batch's
        worth. A failure between chunks is safe: re-publishing the batch drops what is there.
        The returned events are copies with `offset` set; the caller's objects are untouched.

        Raises:
            BackendUnavailable: Redis could not be reached; nothing or the whole batch was
                appended, and re-publishing the batch is safe (the dedup drops what is there).
        """
        appended: list[Event] = []
        for start in range(0, len(events), PUBLISH_CHUNK):
            appended += await self._publish_chunk(events[start : start + PUBLISH_CHUNK])
        return appended

    async def _publish_chunk(self, events: Sequence[Event]) -> list[Event]:
        if not events:
            return []
        started = time.perf_counter()
        args: list[str | bytes | int] = [self._retention, STREAM_ENTRY_FIELD]
        for event in events:
            stored = event if event.offset == 0 else msgspec.structs.replace(event, offset=0)
            value = "" if event.value is None else repr(float(event.value))
            args += [self._dedup_key(event), event.ts, value, self._encoder.encode(stored)]
        keys = [
            self._keys.stream_events,
            self._keys.stream_offset,
            self._keys.stream_last_published,
        ]
        with redis_unavailable("stream.publish"):
            offsets: list[int] = await self._publish_script(keys=keys, args=args)
        appended = [
            msgspec.structs.replace(event, offset=int(offset))
            for event, offset in zip(events, offsets, strict=True)
            if offset
        ]
        self._metrics.record(len(events), len(appended), started)
        return appended

    async def read(self, since: int, limit: int) -> StreamSlice:
        """Up to `limit` events with offset > `since`, oldest first; `gap` if some were trimmed.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        since = max(since, 0)
        keys = self._keys
        with redis_unavailable("stream.read"):
            # MULTI/EXEC: the slice, the oldest entry and the counter come from one instant, so
            # `gap` cannot be computed from a first_offset trimmed after the slice was taken.
            async with self._client.pipeline(transaction=True) as pipe:
                if limit > 0:
                    pipe.xrange(keys.stream_events, min=f"{since + 1}-0", max="+", count=limit)
                pipe.xrange(keys.stream_events, min="-", max="+", count=1)
                pipe.get(keys.stream_offset)
                replies: list[Any] = await pipe.execute()
        entries: list[Any] = replies[0] if limit > 0 else []
        oldest: list[Any] = replies[-2]
        first = _entry_offset(oldest[0][0]) if oldest else 0
        last = int(replies[-1]) if replies[-1] is not None else 0
        events: list[Event] = []
        for entry_id, fields in entries:
            event = self._decoder.decode(next(iter(fields.values())))
            event.offset = _entry_offset(entry_id)
            events.append(event)
        gap = has_gap(since, first, last)
        return StreamSlice(events=events, first_offset=first, last_offset=last, gap=gap)

    # `timeout` is part of the EventStream protocol: the wait is a bounded poll by design
    # (on Redis it becomes XREAD BLOCK; cancelling a blocked XREAD would cost a connection).
    async def wait(self, after: int, timeout: float) -> int:
        """Return the last offset once it is > `after`, or after `timeout` seconds.

        Uses XREAD BLOCK, which returns as soon as an entry with a greater id exists (at once if
        one already does), so no publish between our check and our block can be missed.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        if timeout > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            stream_id = f"{max(after, 0)}-0"
            while (remaining := deadline - loop.time()) > 0:
                block_s = (
                    remaining if self._max_block_s is None else min(remaining, self._max_block_s)
                )
                with redis_unavailable("stream.wait"):
                    # BLOCK 0 would mean "forever": never pass less than 1 ms.
                    newer = await self._client.xread(
                        {self._keys.stream_events: stream_id},
                        count=1,
                        block=max(1, int(block_s * 1000)),
                    )
                if newer:
                    break
        return await self.last_offset()

    async def last_offset(self) -> int:
        """The newest offset ever assigned (0 before the first publish).

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        with redis_unavailable("stream.last_offset"):
            raw = await self._client.get(self._keys.stream_offset)
        return int(raw) if raw is not None else 0

    async def epoch(self) -> str:
        """The stream's epoch: created once by whichever reader asks first (SET NX), then
        shared by every process using this prefix and name, until the keys are deleted.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        return await stream_epoch(self._client, self._keys)

    async def last_published(
        self, series: Sequence[SeriesKey]
    ) -> dict[SeriesKey, tuple[int, float]]:
        """`(ts, value)` of the newest published event per series; NaN for a None value
        (protocol_update events carry no value).

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        if not series:
            return {}
        with redis_unavailable("stream.last_published"):
            raw: list[bytes | str | None] = await self._client.hmget(
                self._keys.stream_last_published, [str(key) for key in series]
            )
        out: dict[SeriesKey, tuple[int, float]] = {}
        for key, record in zip(series, raw, strict=True):
            if record is None:
                continue
            ts, _, value = _text(record).partition(" ")
            out[key] = (int(ts), float(value) if value else math.nan)
        return out

    async def ping(self) -> None:
        """Raises BackendUnavailable if Redis does not answer a PING."""
        with redis_unavailable("stream.ping"):
            await self._client.ping()

    async def close(self) -> None:
        """Nothing to release: the client belongs to the caller, who closes it."""
