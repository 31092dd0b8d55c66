"""The hub without sockets or an event loop: routing, shared bytes, alerts isolation, dedup,
holds and conflation (timers driven by hand)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from defiwatch.domain import Event
from defiwatch.gateway.hub import Hub
from defiwatch.gateway.protocol import Channel, Filter, parse_channel


class Recorder:
    """A one-line subscriber: keeps what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, bytes]] = []

    def deliver(self, channel: str, event: Event, frame: bytes) -> None:
        self.got.append((channel, event.offset, frame))

    def values(self) -> list[tuple[int, float | None]]:
        return [(offset, json.loads(frame)["data"]["value"]) for _, offset, frame in self.got]


class Timers:
    """A hand-driven scheduler: `fire()` runs what is due, in order."""

    def __init__(self) -> None:
        self.due: list[tuple[float, Callable[[], None], Timer]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer()
        self.due.append((delay, callback, timer))
        return timer

    def fire(self) -> None:
        due, self.due = self.due, []
        for _, callback, timer in due:
            if not timer.cancelled:
                callback()


class Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def ch(name: str) -> Channel:
    channel = parse_channel(name)
    assert isinstance(channel, Channel)
    return channel


def ev(offset: int, subject: str = "aave", chain: str = "ethereum", value: float = 1.0,
       type_: str = "tvl_change", metric: str = "tvl", change_pct: float | None = 2.0,
       detail: dict[str, Any] | None = None, ts: int | None = None) -> Event:
    return Event(type=type_, metric=metric, subject=subject, chain=chain, value=value,
                 previous=None, change_abs=None, change_pct=change_pct, change_1h=None,
                 change_24h=None, change_7d=None, ts=ts if ts is not None else offset,
                 emitted_at=0.0, source="test", offset=offset, detail=detail)


@pytest.fixture
def timers() -> Timers:
    return Timers()


@pytest.fixture
def hub(timers: Timers) -> Hub:
    return Hub(schedule=timers, clock=lambda: 1.0)


def test_one_frame_per_channel_shared_by_every_subscriber(hub: Hub) -> None:
    a, b, c = Recorder(), Recorder(), Recorder()
    hub.subscribe(a, ch("protocol:aave"))
    hub.subscribe(b, ch("protocol:aave"))
    hub.subscribe(c, ch("tvl_changes"))
    hub.subscribe(c, ch("chain:base"))
    assert hub.publish(ev(1)) == 3
    assert a.got[0][2] is b.got[0][2]  # the same bytes object, not equal copies
    assert [(name, off) for name, off, _ in c.got] == [("tvl_changes", 1)]
    assert json.loads(a.got[0][2])["channel"] == "protocol:aave"
    assert hub.publish(ev(2, subject="curve", chain="base")) == 2  # c: two channels
    assert [name for name, _, _ in c.got] == ["tvl_changes", "chain:base", "tvl_changes"]


def test_unsubscribe_and_resubscribe(hub: Hub) -> None:
    a = Recorder()
    hub.subscribe(a, ch("protocol:aave"))
    hub.subscribe(a, ch("protocol:aave"), filter=Filter(min_change_pct=5.0))  # replaces
    assert hub.subscription_count == 1
    hub.publish(ev(1, change_pct=2.0))
    hub.publish(ev(2, change_pct=6.0))
    assert [off for _, off, _ in a.got] == [2]
    assert hub.unsubscribe(a, "protocol:aave") is True
    assert hub.unsubscribe(a, "protocol:aave") is False
    hub.publish(ev(3))
    assert len(a.got) == 1 and hub.subscription_count == 0


def test_unsubscribe_all(hub: Hub) -> None:
    a = Recorder()
    hub.subscribe(a, ch("protocol:aave"))
    hub.subscribe(a, ch("alerts"), user_id=1)
    assert hub.unsubscribe_all(a) == 2
    assert hub.publish(ev(1)) == 0
    assert hub.publish_alert(ev(1, type_="alert_fired", detail={"user_id": 1})) == 0


def test_alerts_go_only_to_their_user(hub: Hub) -> None:
    alice, bob, nosy = Recorder(), Recorder(), Recorder()
    hub.subscribe(alice, ch("alerts"), user_id=1)
    hub.subscribe(bob, ch("alerts"), user_id=2)
    hub.subscribe(nosy, ch("tvl_changes"))
    assert hub.publish_alert(ev(1, type_="alert_fired", detail={"user_id": 1, "rule_id": 9})) == 1
    assert hub.publish_alert(ev(2, type_="alert_fired", detail={"user_id": 2, "rule_id": 8})) == 1
    assert hub.publish_alert(ev(3, type_="alert_fired", detail={"rule_id": 7})) == 0  # no user
    assert [off for _, off, _ in alice.got] == [1]
    assert [off for _, off, _ in bob.got] == [2]
    assert nosy.got == []
    assert hub.publish(ev(4, type_="alert_fired", detail={"user_id": 1})) == 0  # never public
    with pytest.raises(ValueError):
        hub.subscribe(nosy, ch("alerts"))


def test_hold_then_release_dedups_replay_and_live(hub: Hub) -> None:
    a = Recorder()
    sub = hub.subscribe(a, ch("protocol:aave"), hold=True)
    hub.publish(ev(5))  # live while recovering: held
    hub.publish(ev(6))
    assert a.got == []
    for offset in (3, 4, 5):  # the replay read up to 5
        sub.replay(ev(offset), hub.frame("protocol:aave", ev(offset)))
    sub.release()
    hub.publish(ev(6))  # a duplicate can never pass
    hub.publish(ev(7))
    assert [off for _, off, _ in a.got] == [3, 4, 5, 6, 7]


def test_release_drops_held_events_older_than_the_latest_frame(hub: Hub) -> None:
    a = Recorder()
    sub = hub.subscribe(a, ch("protocol:aave"), hold=True)
    hub.publish(ev(5, ts=100))
    hub.publish(ev(6, subject="aave", chain="base", ts=100))
    sub.release(newer_than={ev(5).series: 100})
    assert [off for _, off, _ in a.got] == [6]


def test_conflation_sends_the_newest_value_per_series_per_interval(hub: Hub,
                                                                   timers: Timers) -> None:
    slow, fast = Recorder(), Recorder()
    hub.subscribe(slow, ch("tvl_changes"), max_rate_ms=500)
    hub.subscribe(fast, ch("tvl_changes"))
    for i in range(1, 11):  # a burst: ten updates of aave, two of curve
        hub.publish(ev(i, value=float(i)))
    hub.publish(ev(11, subject="curve", value=0.5))
    hub.publish(ev(12, subject="curve", value=0.7))
    assert slow.got == [] and len(fast.got) == 12
    assert len(timers.due) == 1 and timers.due[0][0] == 0.5
    timers.fire()
    assert slow.values() == [(10, 10.0), (12, 0.7)]  # newest of each, in stream order
    hub.publish(ev(13, value=13.0))
    assert len(slow.got) == 2  # a new interval started
    timers.fire()
    assert slow.values()[-1] == (13, 13.0)
    timers.fire()
    assert len(slow.got) == 3  # nothing pending, nothing sent


def test_unsubscribe_cancels_pending_conflation(hub: Hub, timers: Timers) -> None:
    a = Recorder()
    hub.subscribe(a, ch("tvl_changes"), max_rate_ms=100)
    hub.publish(ev(1))
    hub.unsubscribe(a, "tvl_changes")
    timers.fire()
    assert a.got == []


def test_a_subscriber_may_unsubscribe_during_delivery(hub: Hub) -> None:
    class Leaver(Recorder):
        def deliver(self, channel: str, event: Event, frame: bytes) -> None:
            super().deliver(channel, event, frame)
            hub.unsubscribe_all(self)

    leavers = [Leaver() for _ in range(3)]
    for leaver in leavers:
        hub.subscribe(leaver, ch("protocol:aave"))
    assert hub.publish(ev(1)) == 3
    assert all(len(leaver.got) == 1 for leaver in leavers)
    assert hub.subscription_count == 0


async def test_publish_async_yields_between_chunks_and_skips_ended_subscriptions(
    hub: Hub,
) -> None:
    import asyncio

    subscribers = [Recorder() for _ in range(5)]
    for subscriber in subscribers:
        hub.subscribe(subscriber, ch("protocol:aave"))

    async def unsubscribe_the_last() -> None:  # runs at the fan-out's first yield
        hub.unsubscribe(subscribers[-1], "protocol:aave")

    task = asyncio.create_task(unsubscribe_the_last())
    assert await hub.publish_async(ev(1), chunk=2) == 5  # offered to the snapshot of five
    await task
    assert [len(s.got) for s in subscribers] == [1, 1, 1, 1, 0]
