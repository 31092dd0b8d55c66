"""One authenticated client connection, independent of its transport.

A `Session` turns client messages into hub subscriptions, acks and errors (protocol.py does the
parsing), enforces the tier's per-connection limits, and runs recovery: a subscribe with `since`
replays the missed events of the channel from the stream's retention (`recovered: true`), or,
when they are gone, sends the channel's current values from the hot cache (`recovered: false`).
A `since` of an earlier life of the stream (Redis lost its data) replays the new stream from its
start, then the current values of the series that replay did not cover (`recovered: false`).

The transport is an `Output`: something that queues frames in order without blocking and can be
closed with a code. server.py provides one over `websockets`; a Socket.IO adapter can provide
another and reuse everything here (with `authenticate_key` for its handshake).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.cache import HotCache
from defiwatch.config import TierLimits
from defiwatch.domain import Latest, SeriesKey
from defiwatch.errors import BackendUnavailable
from defiwatch.gateway import metrics
from defiwatch.gateway.auth import REQUIRED_SCOPE, admit
from defiwatch.gateway.hub import Hub, Subscriber, Subscription
from defiwatch.gateway.limits import Admission, InboundLimiter
from defiwatch.gateway.protocol import (
    Auth,
    Channel,
    ChannelKind,
    CloseCode,
    ErrorCode,
    Filter,
    Ping,
    Rejection,
    Subscribe,
    Unsubscribe,
    ack_frame,
    channel_matches,
    error_frame,
    latest_belongs,
    latest_frame,
    latest_query,
    parse_client_frame,
    pong_frame,
    welcome_frame,
)
from defiwatch.store.keys import Principal, authenticate
from defiwatch.stream import EventStream

__all__ = ["LATEST_LIMIT", "REQUIRED_SCOPE", "Output", "Session", "authenticate_key"]

log = structlog.get_logger(__name__)

LATEST_LIMIT = 1_000  # series per `latest` frame; more sets `truncated: true`


class Output(Subscriber, Protocol):
    """A connection's outgoing side: ordered, non-blocking, closable."""

    def send(self, frame: bytes) -> None:
        """Queue a control frame (ack, error, welcome, latest) after everything queued before."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start closing with `code`; frames still queued are dropped. Idempotent."""
        ...

    @property
    def closed(self) -> bool: ...

    async def drained(self) -> None:
        """Return once the send buffer has room for a page of replayed events (or closed)."""
        ...


async def authenticate_key(engine: AsyncEngine, key: str) -> Principal | Rejection:
    """The principal of an API key, or why it is refused (`unauthorized`, `forbidden`). Asks
    the database every time; the WebSocket gateway uses an `auth.Authenticator` (cached).

    Raises:
        sqlalchemy.exc.SQLAlchemyError, OSError: the database could not be reached.
    """
    async with engine.connect() as conn:
        return admit(await authenticate(conn, key))


class Session:
    """The protocol state of one authenticated connection.

    Args:
        connection_id: unique id, sent in the welcome and logged.
        principal: the key's owner, tier and scopes.
        limits: the tier's limits (subscriptions, inbound messages per minute, connections).
        hub: where subscriptions live.
        output: the connection's outgoing side; also the hub subscriber.
        events: the event stream (replays of public channels).
        alerts: the fired-alerts stream (replays of `alerts`); None if this deployment has none.
        cache: the hot cache (`latest` after an unrecoverable gap).
        replay_page: events read from a stream per page of a replay.
        monotonic: seconds for rate limiting; clock: epoch seconds for `pong.ts`.
    """

    def __init__(
        self,
        *,
        connection_id: str,
        principal: Principal,
        limits: TierLimits,
        hub: Hub,
        output: Output,
        events: EventStream,
        alerts: EventStream | None,
        cache: HotCache,
        replay_page: int = 500,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection_id = connection_id
        self.principal = principal
        self.limits = limits
        self._hub = hub
        self._output = output
        self._events = events
        self._alerts = alerts
        self._cache = cache
        self._replay_page = max(1, replay_page)
        self._monotonic = monotonic
        self._clock = clock
        self._limiter = InboundLimiter(limits.ws_messages_per_minute, monotonic())
        self._log = log.bind(connection_id=connection_id, user=principal.user)
        self._control = metrics.FRAMES_SENT.labels("control")

    async def start(self, *, node: str) -> None:
        """Send the welcome frame (connection id, tier, limits, stream positions and epochs).

        Raises:
            BackendUnavailable: the stream could not be reached.
        """
        limits = {"subscriptions": self.limits.ws_subscriptions,
                  "messages_per_minute": self.limits.ws_messages_per_minute,
                  "connections": self.limits.ws_connections}
        self._send(welcome_frame(
            connection_id=self.connection_id, user=self.principal.user, tier=self.principal.tier,
            limits=limits, stream=await _position(self._events),
            alerts_stream=await _position(self._alerts) if self._alerts is not None else None,
            node=node,
        ))

    def close(self) -> None:
        """End every subscription (the connection is gone)."""
        self._hub.unsubscribe_all(self._output)

    def _send(self, frame: bytes) -> None:
        self._control.inc()
        self._output.send(frame)

    def _reject(self, rejection: Rejection) -> None:
        self._send(error_frame(rejection))

    async def handle(self, raw: str | bytes) -> None:
        """Act on one client message: an ack, a pong, an error frame, or a close on abuse."""
        admission = self._limiter.admit(self._monotonic())
        command = parse_client_frame(raw)
        if admission is not Admission.ACCEPT:
            request_id = None if isinstance(command, Rejection) else command.id
            per_minute = self.limits.ws_messages_per_minute
            self._reject(Rejection(
                ErrorCode.RATE_LIMITED,
                f"more than {per_minute} messages per minute: this one was dropped; "
                "continuing closes the connection (4029)", None, request_id, temporary=True))
            if admission is Admission.ABUSE:
                metrics.INBOUND.labels("abuse").inc()
                self._log.warning("gateway.rate_abuse", per_minute=per_minute)
                self._output.close(CloseCode.RATE_LIMITED, "rate limit abuse")
            else:
                metrics.INBOUND.labels("rate_limited").inc()
            return
        if isinstance(command, Rejection):
            metrics.INBOUND.labels("invalid").inc()
            self._reject(command)
            return
        metrics.INBOUND.labels("ok").inc()
        if isinstance(command, Ping):
            self._send(pong_frame(command.id, self._clock()))
        elif isinstance(command, Unsubscribe):
            if self._hub.unsubscribe(self._output, command.channel.name):
                self._send(ack_frame(command.id, channel=command.channel.name))
            else:
                self._reject(Rejection(ErrorCode.NOT_SUBSCRIBED,
                                       f"not subscribed to {command.channel.name}", "channel",
                                       command.id))
        elif isinstance(command, Auth):
            self._reject(Rejection(ErrorCode.INVALID_REQUEST, "already authenticated", "type",
                                   command.id))
        else:
            await self._subscribe(command)

    async def _subscribe(self, command: Subscribe) -> None:
        channel = command.channel
        current = self._hub.subscriptions(self._output)
        if channel.name not in current and len(current) >= self.limits.ws_subscriptions:
            self._reject(Rejection(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"this tier allows {self.limits.ws_subscriptions} subscriptions per connection; "
                "unsubscribe from one first", "channel", command.id))
            return
        user_id = self.principal.user_id if channel.kind is ChannelKind.ALERTS else None
        if command.since is None:
            # Ack and subscribe with no await between: the ack precedes every event frame.
            self._send(ack_frame(command.id, channel=channel.name))
            self._hub.subscribe(self._output, channel, filter=command.filter,
                                max_rate_ms=command.max_rate_ms, user_id=user_id)
            return
        # Recovery. Subscribe first, held: live events arriving while we read the stream are
        # kept, then passed on after the replay, minus those the replay already sent (the
        # subscription dedups by offset). So nothing falls between replay and live.
        sub = self._hub.subscribe(self._output, channel, filter=command.filter,
                                  max_rate_ms=command.max_rate_ms, user_id=user_id, hold=True)
        try:
            recovered, replayed, covered = await self._replay(sub, command)
            latest = None if recovered else await self._latest(channel, command.filter, covered)
        except BackendUnavailable as exc:
            self._hub.unsubscribe(self._output, channel.name)
            self._reject(Rejection(ErrorCode.BACKEND_UNAVAILABLE, exc.message, None, command.id,
                                   temporary=True))
            return
        if self._output.closed or self._hub.subscriptions(self._output).get(channel.name) is not sub:
            return
        metrics.FRAMES_SENT.labels("replay").inc(replayed)
        self._send(ack_frame(command.id, channel=channel.name, recovered=recovered,
                             replayed=replayed))
        if latest is None:
            sub.release()
        else:
            items, truncated = latest
            self._send(latest_frame(channel.name, items, truncated=truncated))
            sub.release(newer_than={item.series: item.ts for item in items})
        self._log.debug("gateway.recovered", channel=channel.name, since=command.since,
                        recovered=recovered, replayed=replayed)

    async def _replay(self, sub: Subscription, command: Subscribe) -> _Replay:
        """Replay events after `since` into `sub` (see `_Replay` for what is returned).

        A `since` of an earlier life of the stream (another `epoch`, or beyond the newest
        offset when no epoch is given: Redis lost its data and the stream began again) cannot
        be resumed: everything the restarted stream still holds was published after the fault,
        so it is all replayed, with `recovered: false` for what was lost with the old stream.
        """
        channel = command.channel
        stream = self._alerts if channel.kind is ChannelKind.ALERTS else self._events
        if stream is None:
            return _Replay(False, 0, frozenset())
        restarted = command.epoch is not None and command.epoch != await stream.epoch()
        position = 0 if restarted else command.since or 0
        replayed = 0
        covered: set[SeriesKey] = set()
        first = True
        while not self._output.closed:
            page = await stream.read(position, self._replay_page)
            if first and position > page.last_offset:
                restarted, position = True, 0
                continue
            if page.gap and not (first and restarted):
                # Trimmed before we got there (first page) or while we read (a later page, if
                # the client is slower than the stream's retention): either way a hole. (A
                # restarted stream's first page may start after a trim: all of it is new.)
                return _Replay(False, replayed, frozenset())
            first = False
            for event in page.events:
                if channel_matches(channel, event, sub.user_id) and sub.replay(
                        event, self._hub.frame(channel.name, event)):
                    replayed += 1
                    covered.add(event.series)
            if not page.events or page.events[-1].offset >= page.last_offset:
                break
            position = page.events[-1].offset
            await self._output.drained()
        if restarted:
            self._log.info("stream.epoch_changed", channel=channel.name, since=command.since,
                           epoch=command.epoch, replayed=replayed)
            return _Replay(False, replayed, frozenset(covered))
        return _Replay(True, replayed, frozenset())

    async def _latest(self, channel: Channel, flt: Filter | None,
                      covered: frozenset[SeriesKey]) -> tuple[list[Latest], bool]:
        """The channel's current values from the hot cache, but for the `covered` series (a
        restarted stream's replay just sent them)."""
        items: list[Latest] = []
        truncated = False
        for metric, subject, chain in latest_query(channel):
            found = await self._cache.get_latest(metric, subject, chain, LATEST_LIMIT)
            truncated = truncated or len(found) >= LATEST_LIMIT
            items += [item for item in found
                      if item.series not in covered and latest_belongs(channel, item, flt)]
        if len(items) > LATEST_LIMIT:
            items, truncated = items[:LATEST_LIMIT], True
        return items, truncated


class _Replay(NamedTuple):
    """What a recovery replay did: whether the client's position was resumed without a hole
    (`recovered`), the event frames it sent, and, after a stream restart, the series those
    covered (their `latest` values are not sent again)."""

    recovered: bool
    replayed: int
    covered: frozenset[SeriesKey]


async def _position(stream: EventStream) -> dict[str, Any]:
    return {"epoch": await stream.epoch(), "last_offset": await stream.last_offset()}
