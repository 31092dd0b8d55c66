"""Channels -> subscriptions, and the fan-out of stream events to them.

The hub is transport-agnostic: anything with a `deliver(channel, event, frame)` method is a
`Subscriber` (the WebSocket connections of server.py; a Socket.IO session can be one too). It
never awaits and never blocks: `publish` encodes an event's JSON once, builds one frame per
matching channel and hands the *same bytes* to every subscription of that channel (centrifuge's
preparedData). A subscriber must queue or write the frame without awaiting.

Per subscription the hub applies, in this order:
1. dedup by offset: a subscription never gets an offset twice or out of order (replayed events
   and live ones overlap during recovery; see `Subscription.hold`);
2. the subscription's filter;
3. conflation with `max_rate_ms`: at most one frame per series per interval, the newest,
   flushed when the interval ends (a trailing throttle; timers come from `schedule`).

The private `alerts` channel is indexed by user id: an alert event (from the alerts stream) goes
only to subscriptions whose `user_id` is the event's `detail.user_id`, so no connection can see
another user's alerts, whatever it subscribes to.

Concurrency: all methods run on one event loop thread; `publish` delivers to a snapshot of the
channel's subscriptions, so a subscriber may unsubscribe (itself or others) during `deliver`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Protocol, TypeVar

import structlog
from prometheus_client import Counter

from defiwatch.domain import Event, SeriesKey
from defiwatch.gateway import metrics
from defiwatch.gateway.protocol import (
    ALERTS_CHANNEL,
    Channel,
    ChannelKind,
    Filter,
    alert_recipient,
    encode_event,
    event_frame,
    route,
)

__all__ = ["FANOUT_CHUNK", "Cancellable", "Hub", "Schedule", "Subscriber", "Subscription"]

log = structlog.get_logger(__name__)

# Subscriptions served per step of `publish_async` before yielding to the event loop: at about
# 10 us each (docs/gateway-notes.md) a step holds the loop for ~20 ms at most.
FANOUT_CHUNK = 2_000


class Subscriber(Protocol):
    """What the hub delivers to: one client connection, of any transport."""

    def deliver(self, channel: str, event: Event, frame: bytes) -> None:
        """Take one event frame of `channel` (protocol v1 JSON, shared with other subscribers:
        do not modify). Called on the event loop; must not block: queue or write, then return."""
        ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# `schedule(delay_s, callback)`: run callback after delay_s seconds; default loop.call_later.
Schedule = Callable[[float, Callable[[], None]], Cancellable]


def _call_later(delay: float, callback: Callable[[], None]) -> Cancellable:
    return asyncio.get_running_loop().call_later(delay, callback)


class _Tally:
    """Frames delivered, counted with a plain attribute on the hot path; the hub moves the
    count into the Prometheus counter once per published event."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_K = TypeVar("_K", str, int)


def _remove(index: dict[_K, dict[Subscriber, Subscription]], key: _K, subscriber: Subscriber) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.pop(subscriber, None)
        if not subs:
            del index[key]


class Subscription:
    """One subscriber's subscription to one channel (see the module docstring for the rules).

    Made by `Hub.subscribe`; the subscriber keeps it to replay into it (`replay`) and to end a
    hold (`release`).
    """

    __slots__ = ("_held", "_interval_s", "_name", "_pending", "_plain", "_schedule", "_tally",
                 "_timer", "active", "channel", "filter", "last_offset", "max_rate_ms",
                 "subscriber", "user_id")

    def __init__(
        self,
        subscriber: Subscriber,
        channel: Channel,
        *,
        filter: Filter | None,
        max_rate_ms: int | None,
        user_id: int | None,
        hold: bool,
        schedule: Schedule,
        tally: _Tally,
    ) -> None:
        self.subscriber = subscriber
        self.channel = channel
        self.filter = filter
        self.max_rate_ms = max_rate_ms
        self.user_id = user_id
        self.last_offset = 0  # the newest offset offered (dedup); events come in offset order
        self._held: list[tuple[Event, bytes]] | None = [] if hold else None
        self._interval_s = (max_rate_ms or 0) / 1000.0
        self._name = channel.name
        self._plain = filter is None and not self._interval_s  # the fast path in `offer`
        self.active = True
        self._pending: dict[Hashable, tuple[Event, bytes]] = {}
        self._timer: Cancellable | None = None
        self._schedule = schedule
        self._tally = tally

    @property
    def held(self) -> bool:
        return self._held is not None

    def offer(self, event: Event, frame: bytes) -> None:
        """A live event of this channel: held while recovering, else passed on."""
        if self._held is not None:
            self._held.append((event, frame))
        elif self._plain and event.offset > self.last_offset:
            # The common case inlined (no filter, no conflation): once per event per client.
            self.last_offset = event.offset
            self._tally.n += 1
            self.subscriber.deliver(self._name, event, frame)
        else:
            self._accept(event, frame)

    def replay(self, event: Event, frame: bytes) -> bool:
        """An event read back from the stream during recovery: passed on even while held.
        Returns whether it was passed on (False: a duplicate or filtered out)."""
        return self._accept(event, frame, live=False)

    def release(self, newer_than: Mapping[SeriesKey, int] | None = None) -> None:
        """End the hold: pass on the live events that arrived during recovery and are newer than
        the last replayed one, then take live events directly.

        Args:
            newer_than: series -> ts already sent to the client another way (a `latest` frame);
                held events of those series not newer than that are dropped, so the client's
                last value of a series is never older than one it was already given.
        """
        held, self._held = self._held, None
        for event, frame in held or ():
            if newer_than is not None:
                seen = newer_than.get(event.series)
                if seen is not None and event.ts <= seen:
                    continue
            self._accept(event, frame)

    def _accept(self, event: Event, frame: bytes, *, live: bool = True) -> bool:
        if not self.active or event.offset <= self.last_offset:
            return False
        self.last_offset = event.offset
        if self.filter is not None and not self.filter.matches(event):
            return False
        if not self._interval_s:
            self._tally.n += live  # replays are counted by the session, apart
            self.subscriber.deliver(self._name, event, frame)
            return True
        key = event.series
        if key in self._pending:
            metrics.FRAMES_CONFLATED.labels("rate").inc()
        self._pending[key] = (event, frame)
        if self._timer is None:
            self._timer = self._schedule(self._interval_s, self._flush)
        return True

    def _flush(self) -> None:
        # The interval ended: send the newest frame of each series, in stream order. The next
        # event of any series starts a new interval, so two frames of one series are always at
        # least `max_rate_ms` apart and the last one sent is the newest value.
        self._timer = None
        pending = sorted(self._pending.values(), key=lambda item: item[0].offset)
        self._pending.clear()
        metrics.FRAMES_SENT.labels("event").inc(len(pending))
        for event, frame in pending:
            self.subscriber.deliver(self._name, event, frame)

    def cancel(self) -> None:
        """End the subscription: drop pending conflated frames and timers, and ignore whatever
        a fan-out that took its snapshot earlier still offers."""
        self.active = False
        self._plain = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._held = None


class Hub:
    """Routes events to subscriptions; one per gateway process, fed by its stream readers.

    Args:
        schedule: timer factory for conflation (default: the running loop's `call_later`).
        clock: wall-clock epoch seconds, for the event-to-send latency histogram only.
    """

    def __init__(self, *, schedule: Schedule = _call_later,
                 clock: Callable[[], float] = time.time) -> None:
        self._schedule = schedule
        self._clock = clock
        self._channels: dict[str, dict[Subscriber, Subscription]] = {}
        self._alerts: dict[int, dict[Subscriber, Subscription]] = {}
        self._by_subscriber: dict[Subscriber, dict[str, Subscription]] = {}
        self._events_routed = metrics.EVENTS_ROUTED.labels("events")
        self._alerts_routed = metrics.EVENTS_ROUTED.labels("alerts")
        self._frames = metrics.FRAMES_SENT.labels("event")
        self._tally = _Tally()

    # --- subscriptions --------------------------------------------------------------------

    def subscribe(
        self,
        subscriber: Subscriber,
        channel: Channel,
        *,
        filter: Filter | None = None,
        max_rate_ms: int | None = None,
        user_id: int | None = None,
        hold: bool = False,
    ) -> Subscription:
        """Subscribe (or re-subscribe, replacing filter and rate) `subscriber` to `channel`.

        Args:
            user_id: the subscriber's user; required for the `alerts` channel, whose events are
                delivered only when their `detail.user_id` equals it.
            hold: start held (recovery): live events are kept until `Subscription.release`.

        Raises:
            ValueError: `alerts` without a user_id.
        """
        if channel.kind is ChannelKind.ALERTS and user_id is None:
            raise ValueError("the alerts channel needs the subscriber's user_id")
        self.unsubscribe(subscriber, channel.name)
        sub = Subscription(subscriber, channel, filter=filter, max_rate_ms=max_rate_ms,
                           user_id=user_id, hold=hold, schedule=self._schedule,
                           tally=self._tally)
        if channel.kind is ChannelKind.ALERTS:
            assert user_id is not None
            self._alerts.setdefault(user_id, {})[subscriber] = sub
        else:
            self._channels.setdefault(channel.name, {})[subscriber] = sub
        self._by_subscriber.setdefault(subscriber, {})[channel.name] = sub
        metrics.SUBSCRIPTIONS.inc()
        return sub

    def unsubscribe(self, subscriber: Subscriber, channel: str) -> bool:
        """End one subscription; False if there was none."""
        mine = self._by_subscriber.get(subscriber)
        sub = mine.pop(channel, None) if mine is not None else None
        if sub is None:
            return False
        if not mine:
            del self._by_subscriber[subscriber]
        if sub.user_id is not None and sub.channel.kind is ChannelKind.ALERTS:
            _remove(self._alerts, sub.user_id, subscriber)
        else:
            _remove(self._channels, channel, subscriber)
        sub.cancel()
        metrics.SUBSCRIPTIONS.dec()
        return True

    def unsubscribe_all(self, subscriber: Subscriber) -> int:
        """End every subscription of `subscriber` (it disconnected); return how many."""
        channels = list(self._by_subscriber.get(subscriber, ()))
        for channel in channels:
            self.unsubscribe(subscriber, channel)
        return len(channels)

    def subscriptions(self, subscriber: Subscriber) -> dict[str, Subscription]:
        """The subscriber's subscriptions by canonical channel name (a copy)."""
        return dict(self._by_subscriber.get(subscriber, {}))

    @property
    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._by_subscriber.values())

    # --- fan-out --------------------------------------------------------------------------

    def frame(self, channel: str, event: Event) -> bytes:
        """The event frame of one event on one channel (for replays, which are per client)."""
        return event_frame(channel, event.offset, encode_event(event))

    def publish(self, event: Event) -> int:
        """Fan one event of the event stream out, in one step; return the subscriptions it was
        offered to (before their filters and conflation)."""
        targets = self._targets(event)
        before = self._tally.n
        for frame, subs in targets:
            for sub in subs:
                sub.offer(event, frame)
        return self._observe(event, targets, before, self._events_routed)

    async def publish_async(self, event: Event, *, chunk: int = FANOUT_CHUNK) -> int:
        """`publish`, yielding to the event loop after every `chunk` subscriptions, so one
        event to tens of thousands of connections never stalls the loop (heartbeats, new
        connections) for the whole fan-out. Per connection, order is kept: the caller awaits
        one event's fan-out before the next."""
        targets = self._targets(event)
        before = self._tally.n
        budget = chunk
        for frame, subs in targets:
            for sub in subs:
                sub.offer(event, frame)  # an ended subscription ignores it (see `cancel`)
                budget -= 1
                if not budget:
                    budget = chunk
                    await asyncio.sleep(0)
        return self._observe(event, targets, before, self._events_routed)

    def publish_alert(self, event: Event) -> int:
        """Fan one event of the alerts stream out to its user's `alerts` subscriptions only."""
        targets = self._alert_targets(event)
        before = self._tally.n
        for frame, subs in targets:
            for sub in subs:
                sub.offer(event, frame)
        return self._observe(event, targets, before, self._alerts_routed)

    async def publish_alert_async(self, event: Event) -> int:
        """`publish_alert` with the signature of `publish_async` (one user's connections are
        few: no need to yield)."""
        return self.publish_alert(event)

    def _targets(self, event: Event) -> list[tuple[bytes, tuple[Subscription, ...]]]:
        """Per channel of the event that has subscribers: its frame and a snapshot of them."""
        targets: list[tuple[bytes, tuple[Subscription, ...]]] = []
        data: bytes | None = None
        for channel in route(event):
            subs = self._channels.get(channel)
            if not subs:
                continue
            if data is None:
                data = encode_event(event)  # once per event, only if someone listens
            # once per (event, channel), shared by every subscriber of the channel
            targets.append((event_frame(channel, event.offset, data), tuple(subs.values())))
        return targets

    def _alert_targets(self, event: Event) -> list[tuple[bytes, tuple[Subscription, ...]]]:
        user_id = alert_recipient(event)
        if user_id is None:
            log.warning("gateway.alert_without_user", offset=event.offset, type=event.type)
            return []
        subs = self._alerts.get(user_id)
        return [(self.frame(ALERTS_CHANNEL, event), tuple(subs.values()))] if subs else []

    def _observe(self, event: Event, targets: list[tuple[bytes, tuple[Subscription, ...]]],
                 before: int, routed: Counter) -> int:
        routed.inc()
        offered = sum(len(subs) for _, subs in targets)
        if self._tally.n > before:
            self._frames.inc(self._tally.n - before)
        if offered:
            metrics.EVENT_LATENCY.observe(max(0.0, self._clock() - event.emitted_at))
        return offered
