"""Consumer groups over the event stream: several workers share its events, each event once.

An optional capability of a stream (its own small Protocol), used by the alert
engine: `defiwatch run alerts` workers of one group split the events between them, and the
entries a dead worker had taken are claimed by another after `min_idle_s`.

Guarantees (tests/alerts/test_stream_group.py runs them against both backends):

- `read` hands out entries that no consumer of the group was given yet, oldest first, and
  records each as *pending* for this consumer until `ack`.
- `pending` returns this consumer's own unacknowledged entries (a worker restarted under the
  same name resumes with them); `claim` moves entries pending at any consumer for at least
  `min_idle_s` seconds to this one (a worker that died mid-batch).
- Delivery is at least once: an entry comes back (through `pending` or `claim`) until it is
  acked. Consumers make processing idempotent (the alert engine: series cursors and dedup keys).
- An entry trimmed from the stream's retention before it was processed comes back with
  `event=None`; ack it (it is lost; counted in `defiwatch_stream_group_lost_total`).

Redis: XREADGROUP / XACK / XAUTOCLAIM on the stream's own key (no key of our own). A group Redis
lost (FLUSHALL, restart without data) is recreated where this worker left off (RedisStreamGroup),
or, by a worker started after the loss, where the group's workers last committed (`ensure`'s
`committed`: the alert engine reads it from its database, so this module holds no SQL). Memory: the
embedded deployment's one process; a plain position and a dict of pending entries, on the stream's
event loop, so no lock (the same reasoning as stream/memory.py).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import structlog
from prometheus_client import Counter

from defiwatch.domain import Event
from defiwatch.redis_keys import STREAM_ENTRY_FIELD, RedisKeys
from defiwatch.stream.base import EventStream
from defiwatch.stream.redis import redis_unavailable, stream_epoch

__all__ = ["CommittedPosition", "Delivery", "GroupStart", "MemoryStreamGroup", "RedisStreamGroup",
           "StreamGroup", "start_id"]

log = structlog.get_logger(__name__)

GROUP_DELIVERED = Counter("defiwatch_stream_group_delivered_total",
                          "Entries handed to a group consumer, by how", ["backend", "how"])
GROUP_RECREATED = Counter("defiwatch_stream_group_recreated_total",
                          "Consumer groups recreated after Redis lost them (NOGROUP)", ["backend"])
GROUP_LOST = Counter("defiwatch_stream_group_lost_total",
                     "Pending entries trimmed from the stream before they were acked", ["backend"])

Start = Literal["latest", "earliest"]
T = TypeVar("T")

# Replies meaning Redis lost the group: a command on it (NOGROUP), or a read blocked while its
# stream was deleted (UNBLOCKED).
_GROUP_LOST = ("NOGROUP", "UNBLOCKED")


class Delivery(msgspec.Struct, frozen=True):
    """One stream entry given to a consumer. `event` is None when the entry was trimmed."""

    offset: int
    event: Event | None


class CommittedPosition(Protocol):
    """Reads where a group's consumers durably got to: (stream epoch, newest offset whose
    outcome they committed), or None if they never committed one."""

    async def __call__(self) -> tuple[str, int] | None: ...


class GroupStart(enum.Enum):
    """Where a group created now starts, and why (logged by `ensure`)."""

    CONFIGURED = "configured"  # nothing committed yet (a first deployment): `start` decides
    RESUMED = "resumed"  # after the committed offset: the stream is the same life (epoch)
    NEW_LIFE = "new_life"  # at 0: the stream was lost since, all of the new one came after


def start_id(start: Start, epoch: str, committed: tuple[str, int] | None) -> tuple[str, GroupStart]:
    """XGROUP CREATE's last-delivered id for a group created in stream life `epoch`.

    Args:
        start: where a group of a first deployment starts ("latest": `$`, no history fired on).
        epoch: the stream's current epoch.
        committed: (epoch, offset) the group's consumers last committed, or None.
    """
    if committed is None:
        return ("$" if start == "latest" else "0"), GroupStart.CONFIGURED
    committed_epoch, offset = committed
    if committed_epoch == epoch:
        return f"{offset}-0", GroupStart.RESUMED
    return "0", GroupStart.NEW_LIFE


class StreamGroup(Protocol):
    """A consumer (`consumer`) in a consumer group over an event stream (see module docstring)."""

    consumer: str

    @property
    def group(self) -> str:
        """The group's name, shared by its consumers (the key of its committed position)."""
        ...

    @property
    def epoch(self) -> str | None:
        """The stream life (epoch) of the entries handed out since `ensure`, to commit with
        their offsets; None when the group keeps no position (it cannot outlive its stream)."""
        ...

    async def ensure(self, start: Start = "latest",
                     committed: CommittedPosition | None = None) -> None:
        """Create the group if it does not exist: after the position `committed` reads (see
        `start_id`), or, when none was committed, after the newest entry ("latest": only
        events published from now on) or at the oldest retained one."""
        ...

    async def read(self, count: int, block_s: float) -> list[Delivery]:
        """Up to `count` new entries; wait up to `block_s` seconds for one (0: do not wait)."""
        ...

    async def pending(self, count: int) -> list[Delivery]:
        """Up to `count` of this consumer's delivered but unacknowledged entries."""
        ...

    async def claim(self, min_idle_s: float, count: int) -> list[Delivery]:
        """Take over up to `count` entries pending at any consumer for >= `min_idle_s`."""
        ...

    async def ack(self, offsets: Sequence[int]) -> None:
        """Mark entries processed: they are never delivered again."""
        ...


# --- memory --------------------------------------------------------------------------------


class _GroupState:
    def __init__(self) -> None:
        self.position: int | None = None  # newest offset handed out
        # offset -> (consumer, delivered at (monotonic s), event)
        self.pending: dict[int, tuple[str, float, Event]] = {}


class MemoryStreamGroup:
    """A consumer group over an in-process stream (any EventStream, read through its API).

    It lives and dies with its stream, in one process: there is no lost group to resume, so it
    keeps no position (`epoch` None) and `ensure` does not read `committed`.

    Args:
        stream: the stream to share.
        consumer: this consumer's name.
        clock: monotonic seconds, for idle times.
    """

    _BACKEND = "memory"
    group = "embedded"
    epoch: str | None = None

    def __init__(
        self,
        stream: EventStream,
        *,
        consumer: str = "embedded",
        clock: Callable[[], float] = time.monotonic,
        _state: _GroupState | None = None,
    ) -> None:
        self.consumer = consumer
        self._stream = stream
        self._clock = clock
        self._state = _state or _GroupState()

    def with_consumer(self, consumer: str) -> MemoryStreamGroup:
        """Another consumer of the same group."""
        return MemoryStreamGroup(self._stream, consumer=consumer, clock=self._clock,
                                 _state=self._state)

    async def ensure(self, start: Start = "latest",
                     committed: CommittedPosition | None = None) -> None:
        if self._state.position is None:
            if start == "latest":
                self._state.position = await self._stream.last_offset()
            else:
                first = (await self._stream.read(0, 1)).first_offset
                self._state.position = max(first - 1, 0)

    async def read(self, count: int, block_s: float) -> list[Delivery]:
        await self.ensure()
        state = self._state
        assert state.position is not None
        page = await self._stream.read(state.position, count)
        if not page.events and block_s > 0:
            await self._stream.wait(state.position, block_s)
            page = await self._stream.read(state.position, count)
        if page.gap and page.events:
            lost = page.events[0].offset - state.position - 1
            if lost > 0:
                GROUP_LOST.labels(self._BACKEND).inc(lost)
                log.warning("stream.group.gap", backend=self._BACKEND, lost=lost)
        now = self._clock()
        out: list[Delivery] = []
        for event in page.events:
            # Another consumer may have moved the position while we awaited the read.
            if event.offset <= state.position:
                continue
            state.pending[event.offset] = (self.consumer, now, event)
            state.position = event.offset
            out.append(Delivery(event.offset, event))
        GROUP_DELIVERED.labels(self._BACKEND, "new").inc(len(out))
        return out

    async def pending(self, count: int) -> list[Delivery]:
        mine = sorted(o for o, (c, _, _) in self._state.pending.items() if c == self.consumer)
        return [Delivery(o, self._state.pending[o][2]) for o in mine[:count]]

    async def claim(self, min_idle_s: float, count: int) -> list[Delivery]:
        now = self._clock()
        out: list[Delivery] = []
        for offset in sorted(self._state.pending):
            if len(out) >= count:
                break
            _owner, delivered, event = self._state.pending[offset]
            if now - delivered >= min_idle_s:
                self._state.pending[offset] = (self.consumer, now, event)
                out.append(Delivery(offset, event))
        GROUP_DELIVERED.labels(self._BACKEND, "claimed").inc(len(out))
        return out

    async def ack(self, offsets: Sequence[int]) -> None:
        for offset in offsets:
            self._state.pending.pop(offset, None)


# --- redis ---------------------------------------------------------------------------------


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


class RedisStreamGroup:
    """A consumer group over the Redis event stream (stream/redis.py), with XREADGROUP.

    Redis can lose the group under a running worker (a FLUSHALL, a restart without data): every
    command then fails with NOGROUP (or a blocked read with UNBLOCKED). The group is recreated
    on the spot and the command retried, starting where this worker's acknowledgements left
    off: at the last offset it acked when the stream is the same life (epoch) as before, at
    the start when the stream itself was lost, since every event of a new stream was published
    after the fault. Re-delivery is harmless (consumers are idempotent, see the module
    docstring); a group started at `$` would skip what was published while workers were down.
    A worker started while the group is missing has no acknowledgements of its own: `ensure`
    reads where the group's workers committed (`start_id`).

    Args:
        client: a `redis.asyncio.Redis`, owned by the caller. Its `socket_timeout` bounds each
            blocking read, which is shortened to fit (as in stream/redis.py).
        prefix: the key prefix (`DEFIWATCH_REDIS_PREFIX`).
        group: the group name (`DEFIWATCH_ALERTS_CONSUMER_GROUP`).
        consumer: this worker's name, unique per live worker (e.g. host and pid). A worker
            restarted under the same name gets its pending entries back at once; under a new
            name they are claimed after the idle time.
        name: the stream's name ("stream" = the event stream).
    """

    _BACKEND = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        group: str,
        consumer: str,
        name: str = "stream",
    ) -> None:
        self.consumer = consumer
        self.group = group
        self._client = client
        self._keys = RedisKeys(prefix, name)
        self._key = self._keys.stream_events
        self._decoder = msgspec.json.Decoder(Event)
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block_s: float | None = (
            None if socket_timeout is None
            else float(socket_timeout) - min(1.0, float(socket_timeout) / 2)
        )
        self._ensured = False
        self._epoch: str | None = None  # the stream's life the group was ensured in
        self._acked = 0  # the newest offset this consumer acknowledged in that life

    @property
    def epoch(self) -> str | None:
        return self._epoch

    async def ensure(self, start: Start = "latest",
                     committed: CommittedPosition | None = None) -> None:
        """XGROUP CREATE ... MKSTREAM at `start_id`; an existing group is left as it is.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        if self._ensured:
            return
        epoch = await stream_epoch(self._client, self._keys)
        position = None if committed is None else await committed()
        last_id, why = start_id(start, epoch, position)
        if await self._create(last_id):
            log.info("stream.group.created", group=self.group, consumer=self.consumer,
                     start=why.value, start_id=last_id, committed=position)
        self._epoch, self._ensured = epoch, True

    async def _create(self, last_id: str) -> bool:
        """XGROUP CREATE after `last_id`; False if the group exists (another worker made it)."""
        with redis_unavailable("stream.group.ensure"):
            try:
                await self._client.xgroup_create(self._key, self.group, id=last_id,
                                                 mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                return False
        return True

    async def _recreate(self, error: str) -> None:
        """Recreate the group Redis lost: `start_id`, with this worker's acknowledgements as the
        committed position (fresher than the database's; see the class docstring)."""
        epoch = await stream_epoch(self._client, self._keys)
        acked = None if self._epoch is None else (self._epoch, self._acked)
        last_id, why = start_id("earliest", epoch, acked)
        created = await self._create(last_id)
        GROUP_RECREATED.labels(self._BACKEND).inc()
        log.warning("group.recreated", group=self.group, consumer=self.consumer, error=error,
                    start=why.value, start_id=last_id, created=created)
        if why is not GroupStart.RESUMED:
            self._acked = 0
        self._epoch = epoch

    async def _call(self, operation: str, command: Callable[[], Awaitable[T]]) -> T:
        """Run a group command; when Redis lost the group, recreate it and run it once more.

        Raises:
            BackendUnavailable: Redis could not be reached.
        """
        await self.ensure()
        try:
            with redis_unavailable(operation):
                return await command()
        except redis_errors.ResponseError as exc:
            if not str(exc).startswith(_GROUP_LOST):
                raise
            await self._recreate(str(exc))
        with redis_unavailable(operation):
            return await command()

    def _decode(self, entries: Any) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields in entries or ():
            offset = int(_text(entry_id).partition("-")[0])
            if not fields:
                out.append(Delivery(offset, None))  # trimmed while pending
                continue
            raw = fields.get(STREAM_ENTRY_FIELD.encode(), fields.get(STREAM_ENTRY_FIELD))
            event = self._decoder.decode(raw)
            event.offset = offset
            out.append(Delivery(offset, event))
        return out

    @staticmethod
    def _entries(reply: Any) -> Any:
        """The entries of a one-stream XREADGROUP reply (RESP2 `[[key, entries]]`; a dict
        `{key: entries}` under RESP3)."""
        if not reply:
            return []
        if isinstance(reply, dict):
            return next(iter(reply.values()), [])
        return reply[0][1]

    async def read(self, count: int, block_s: float) -> list[Delivery]:
        block_ms: int | None = None
        if block_s > 0:
            limit = block_s if self._max_block_s is None else min(block_s, self._max_block_s)
            block_ms = max(1, int(limit * 1000))
        reply = await self._call("stream.group.read", lambda: self._client.xreadgroup(
            self.group, self.consumer, {self._key: ">"}, count=count, block=block_ms))
        out = self._decode(self._entries(reply))
        GROUP_DELIVERED.labels(self._BACKEND, "new").inc(len(out))
        return out

    async def pending(self, count: int) -> list[Delivery]:
        reply = await self._call("stream.group.pending", lambda: self._client.xreadgroup(
            self.group, self.consumer, {self._key: "0"}, count=count))
        out = self._decode(self._entries(reply))
        await self._ack_lost(out)
        return [d for d in out if d.event is not None]

    async def claim(self, min_idle_s: float, count: int) -> list[Delivery]:
        """XAUTOCLAIM from the start of the pending list; entries deleted from the stream are
        reported by Redis (7+) and acked here as lost."""
        reply = await self._call("stream.group.claim", lambda: self._client.xautoclaim(
            self._key, self.group, self.consumer, min_idle_time=int(min_idle_s * 1000),
            start_id="0-0", count=count))
        entries = reply[1] if len(reply) > 1 else []
        deleted = reply[2] if len(reply) > 2 else []
        out = self._decode(entries)
        if deleted:
            GROUP_LOST.labels(self._BACKEND).inc(len(deleted))
            log.warning("stream.group.lost", group=self.group, entries=len(deleted))
            with redis_unavailable("stream.group.ack"):
                await self._client.xack(self._key, self.group, *deleted)
        await self._ack_lost(out)
        claimed = [d for d in out if d.event is not None]
        if claimed:
            GROUP_DELIVERED.labels(self._BACKEND, "claimed").inc(len(claimed))
            log.info("stream.group.claimed", group=self.group, consumer=self.consumer,
                     entries=len(claimed), first=claimed[0].offset)
        return claimed

    async def _ack_lost(self, deliveries: Sequence[Delivery]) -> None:
        lost = [d.offset for d in deliveries if d.event is None]
        if lost:
            GROUP_LOST.labels(self._BACKEND).inc(len(lost))
            await self.ack(lost)

    async def ack(self, offsets: Sequence[int]) -> None:
        """XACK (a no-op on a lost group: what it held is gone); remembers the newest offset
        acked, where a recreated group starts."""
        if not offsets:
            return
        with redis_unavailable("stream.group.ack"):
            await self._client.xack(self._key, self.group, *[f"{o}-0" for o in offsets])
        self._acked = max(self._acked, *offsets)
