"""The notifier against a real database (SQLite and PostgreSQL) and real receivers on loopback.

Time is the notifier's injected clock (retries, holds, the disable clock); the senders and the
receivers are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import standardwebhooks
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.alerts.events import alert_stream_key, event_dict
from defiwatch.config import Settings
from defiwatch.notify.breaker import BreakerPolicy, CircuitBreaker
from defiwatch.notify.factory import Senders, build_senders
from defiwatch.notify.retry import RetryPolicy
from defiwatch.notify.senders.webpush import VapidKey
from defiwatch.notify.worker import Notifier, NotifierConfig
from defiwatch.store import create_engine, notifications, upgrade
from defiwatch.store import delivery as store
from defiwatch.store.schema import (
    alert_history,
    notification_attempts,
    notification_endpoints,
    notification_logs,
    notification_preferences,
    user_devices,
    users,
)
from defiwatch.stream import MemoryEventStream
from notify.factories import tvl_event
from notify.receiver import Receiver, Reply
from notify.test_webpush import SUBJECT, PushService, Subscriber

T0 = 1_790_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Outbox:
    engine: AsyncEngine
    senders: Senders
    clock: Clock = field(default_factory=Clock)
    alerts: MemoryEventStream = field(
        default_factory=lambda: MemoryEventStream(100, dedup_key=alert_stream_key))
    user_id: int = 1

    def notifier(self, senders: Senders | None = None, **config: Any) -> Notifier:
        return Notifier(
            self.engine, senders or self.senders,
            config=NotifierConfig(**{"worker": "test-worker", **config}),
            retry=RetryPolicy(max_attempts=3, base_delay_s=10.0, max_delay_s=100.0),
            breaker=CircuitBreaker(BreakerPolicy(failure_threshold=3, open_s=60.0)),
            alerts=self.alerts, clock=self.clock, rng=lambda: 0.5)

    async def queue(self, url: str, count: int = 1, *, severity: str = "warning",
                    channel: str = "webhook", first_seq: int = 0) -> None:
        rows = []
        for i in range(first_seq, first_seq + count):
            event = tvl_event(type="alert_fired", detail={
                "user_id": self.user_id, "rule_id": 7, "rule_name": "aave below 1bn",
                "severity": severity, "alert_id": None, "state": "firing"})
            rows.append({
                "alert_id": None, "user_id": self.user_id, "rule_id": 7, "kind": "alert_fired",
                "seq": i, "channel": channel, "target": url,
                "host": url.split("/")[2] if "/" in url else "",
                "config": {"type": channel} if channel == "push" else {"type": channel, "url": url},
                "payload": event_dict(event),
                "status": "pending", "attempt": 0, "next_attempt_at": self.clock.now,
                "created_at": self.clock.now, "updated_at": self.clock.now})
        async with self.engine.begin() as conn:
            await store.queue_notifications(conn, rows)

    async def rows(self, table: Any = notification_logs) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            result = await conn.execute(select(table).order_by(table.c[table.primary_key.columns.keys()[0]]))
            return [dict(r._mapping) for r in result]

    async def secrets(self, url: str) -> list[str]:
        async with self.engine.connect() as conn:
            stored = (await conn.execute(select(notification_endpoints.c.secrets).where(
                notification_endpoints.c.target == url))).scalar_one()
        return [s["secret"] for s in stored]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/outbox.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def outbox(database_url: str) -> AsyncIterator[Outbox]:
    url = database_url
    await upgrade(url)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(insert(users), [{"id": 1, "name": "ada", "tier": "pro", "created_at": T0}])
    senders = build_senders(Settings(notify_ssrf_allow=["127.0.0.1"],
                                     notify_webhook_timeout_s=5.0))
    try:
        yield Outbox(engine, senders)
    finally:
        await senders.aclose()
        await engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


async def test_delivers_a_signed_webhook_and_logs_the_attempt(outbox: Outbox,
                                                            receiver: Receiver) -> None:
    await outbox.queue(receiver.url())
    await outbox.notifier().drain()

    [seen] = receiver.requests
    [row] = await outbox.rows()
    [secret] = await outbox.secrets(receiver.url())
    payload = standardwebhooks.Webhook(secret).verify(seen.body, seen.headers)
    assert seen.headers["webhook-id"] == f"ntf_{row['id']}"
    assert payload["type"] == "alert_fired"
    assert row["status"] == "delivered" and row["attempt"] == 1 and row["response_code"] == 200
    [attempt] = await outbox.rows(notification_attempts)
    assert attempt["status"] == "delivered" and attempt["response_code"] == 200
    assert attempt["worker"] == "test-worker" and attempt["latency_ms"] >= 0


async def test_retries_with_backoff_then_delivers_under_the_same_id(outbox: Outbox,
                                                                   receiver: Receiver) -> None:
    receiver.script(Reply(503, headers={"Retry-After": "30"}))
    await outbox.queue(receiver.url())
    notifier = outbox.notifier()
    await notifier.drain()
    [row] = await outbox.rows()
    assert row["status"] == "pending" and row["attempt"] == 1 and row["response_code"] == 503
    assert row["next_attempt_at"] >= T0 + 30  # Retry-After is a floor

    await notifier.drain()  # not due yet: nothing is sent
    assert len(receiver.requests) == 1
    outbox.clock.now = row["next_attempt_at"]
    await notifier.drain()

    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    [row] = await outbox.rows()
    assert row["status"] == "delivered" and row["attempt"] == 2
    attempts = await outbox.rows(notification_attempts)
    assert [(a["attempt"], a["status"], a["response_code"]) for a in attempts] == [
        (1, "failed", 503), (2, "delivered", 200)]


async def test_a_final_4xx_is_not_retried(outbox: Outbox, receiver: Receiver) -> None:
    receiver.script(Reply(400))
    await outbox.queue(receiver.url())
    await outbox.notifier().drain()
    outbox.clock.now += 10_000
    await outbox.notifier().drain()
    [row] = await outbox.rows()
    assert row["status"] == "dead" and row["attempt"] == 1
    assert len(receiver.requests) == 1


async def test_gives_up_after_the_last_attempt(outbox: Outbox, receiver: Receiver) -> None:
    receiver.answer = lambda _seen: Reply(500)
    await outbox.queue(receiver.url())
    notifier = outbox.notifier()
    for _ in range(5):
        await notifier.drain()
        outbox.clock.now += 1_000
    [row] = await outbox.rows()
    assert row["status"] == "dead" and row["attempt"] == 3  # max_attempts
    assert [a["status"] for a in await outbox.rows(notification_attempts)] == [
        "failed", "failed", "dead"]


async def test_an_open_circuit_postpones_without_spending_attempts(outbox: Outbox) -> None:
    dead = "http://127.0.0.1:9/hook"  # discard port: nothing listens
    await outbox.queue(dead, count=6)
    await outbox.notifier(concurrency=1).drain()
    rows = await outbox.rows()
    tried = [r for r in rows if r["attempt"] > 0]
    postponed = [r for r in rows if r["attempt"] == 0]
    assert len(tried) == 3  # the breaker's threshold
    assert postponed and all(r["status"] == "pending" and r["next_attempt_at"] > T0
                             and "circuit open" in r["last_error"] for r in postponed)


async def test_a_dead_endpoint_is_disabled_and_its_owner_told(outbox: Outbox) -> None:
    dead = "http://127.0.0.1:9/hook"
    await outbox.queue(dead)
    notifier = outbox.notifier(disable_after_s=3_600.0)
    await notifier.drain()
    outbox.clock.now += 3_600  # an hour of failure
    await outbox.queue(dead, count=2)
    outbox.clock.now += 100  # past the breaker's open interval
    await notifier.drain()

    [endpoint] = await outbox.rows(notification_endpoints)
    assert endpoint["disabled_at"] is not None and endpoint["failing_since"] == T0
    [history] = await outbox.rows(alert_history)
    assert (history["state"], history["reason"], history["user_id"]) == (
        "disabled", "endpoint_failing", 1)
    [event] = (await outbox.alerts.read(0, 10)).events
    assert event.type == "endpoint_disabled" and event.detail is not None
    assert event.detail["user_id"] == 1 and event.detail["endpoint_id"] == endpoint["id"]

    await outbox.queue(dead, first_seq=99)  # a new notification for the disabled endpoint
    await notifier.drain()
    newest = (await outbox.rows())[-1]
    assert newest["status"] == "dead" and newest["attempt"] == 0
    assert newest["last_error"].startswith("endpoint disabled")


async def test_over_the_limit_is_held_then_sent_as_one_digest(outbox: Outbox,
                                                              receiver: Receiver) -> None:
    await outbox.queue(receiver.url(), count=5)
    notifier = outbox.notifier(default_per_minute=2)
    await notifier.drain()
    assert len(receiver.requests) == 2
    held = [r for r in await outbox.rows() if r["status"] == "held"]
    assert len(held) == 3 and all(r["next_attempt_at"] == T0 + 60 for r in held)

    outbox.clock.now = T0 + 60
    await notifier.drain()
    assert len(receiver.requests) == 3
    digest = json.loads(receiver.requests[-1].body)
    assert digest["type"] == "digest"
    rows = await outbox.rows()
    [digest_row] = [r for r in rows if r["kind"] == "digest"]
    folded = [r for r in rows if r["status"] == "digested"]
    assert digest_row["status"] == "delivered"
    assert sorted(r["id"] for r in folded) == sorted(r["id"] for r in held)
    assert all(r["parent_id"] == digest_row["id"] for r in folded)


@pytest.mark.parametrize(("severity", "held"), [("warning", True), ("critical", False)])
async def test_quiet_hours_hold_until_they_end(outbox: Outbox, receiver: Receiver,
                                               severity: str, held: bool) -> None:
    async with outbox.engine.begin() as conn:  # T0 is 16:13:20 in Paris
        await conn.execute(insert(notification_preferences), [{
            "user_id": 1, "timezone": "Europe/Paris", "quiet_start": "16:00",
            "quiet_end": "16:30", "quiet_allow_critical": True, "max_per_minute": {},
            "updated_at": T0}])
    await outbox.queue(receiver.url(), severity=severity)
    notifier = outbox.notifier()
    await notifier.drain()
    [row] = await outbox.rows()
    if not held:
        assert row["status"] == "delivered"
        return
    assert row["status"] == "held" and not receiver.requests
    assert row["next_attempt_at"] == T0 + 1_000  # 16:30 in Paris
    outbox.clock.now = T0 + 1_000
    await notifier.drain()
    [row] = await outbox.rows()
    assert row["status"] == "delivered" and len(receiver.requests) == 1


async def test_a_lost_claim_is_retaken_and_its_attempt_closed(outbox: Outbox,
                                                             receiver: Receiver) -> None:
    await outbox.queue(receiver.url())
    async with outbox.engine.begin() as conn:  # a notifier claimed it, then died
        [row] = await store.claim_due(conn, now=T0, limit=10)
        await store.start_attempts(conn, [store.AttemptStart(row.id, 1, True)],
                                   worker="dead-worker", now=T0, lease_until=T0 + 60)
    await outbox.notifier().drain()
    assert not receiver.requests  # still leased
    outbox.clock.now = T0 + 61
    await outbox.notifier().drain()
    [seen] = receiver.requests
    assert seen.headers["webhook-id"] == f"ntf_{row.id}"
    attempts = await outbox.rows(notification_attempts)
    assert [(a["attempt"], a["status"], a["worker"]) for a in attempts] == [
        (1, "failed", "dead-worker"), (2, "delivered", "test-worker")]
    assert "worker lost" in attempts[0]["error"]



async def test_push_to_every_device_expands_and_a_gone_device_is_disabled(
        outbox: Outbox, tmp_path: Any) -> None:
    vapid = VapidKey.generate()
    live, gone = Subscriber(), Subscriber()
    service = PushService(live, vapid.application_server_key)
    key_file = tmp_path / "vapid.pem"
    key_file.write_bytes(vapid.private_pem())
    senders = build_senders(Settings(notify_ssrf_allow=["127.0.0.1"],
                                     notify_vapid_private_key_file=key_file,
                                     notify_vapid_subject=SUBJECT))
    with Receiver(service.answer) as push, Receiver(lambda _s: Reply(410)) as expired:
        service.origin = push.origin
        async with outbox.engine.begin() as conn:
            for name, who, server in (("phone", live, push), ("old-tablet", gone, expired)):
                target = who.target(server.url(f"/push/{name}"))
                await conn.execute(insert(user_devices), [{
                    "user_id": 1, "device": name, "endpoint": target.endpoint,
                    "p256dh": target.p256dh, "auth": target.auth, "created_at": T0,
                    "updated_at": T0}])
        await outbox.queue("*", channel="push")
        try:
            await outbox.notifier(senders).drain()
        finally:
            await senders.aclose()
    assert service.problems == []
    [message] = service.delivered
    assert message["data"]["kind"] == "alert_fired"
    rows = {r["target"]: r for r in await outbox.rows()}
    assert rows["*"]["status"] == "expanded"
    assert rows["phone"]["status"] == "delivered" and rows["phone"]["parent_id"] == rows["*"]["id"]
    assert rows["old-tablet"]["status"] == "dead" and rows["old-tablet"]["response_code"] == 410
    devices = {d["device"]: d for d in await outbox.rows(user_devices)}
    assert devices["phone"]["disabled_at"] is None
    assert devices["old-tablet"]["disabled_reason"] == "gone: the push service answered 410"


async def test_a_redelivered_notification_is_sent_again_under_its_id(
        outbox: Outbox, receiver: Receiver) -> None:
    await outbox.queue(receiver.url())
    notifier = outbox.notifier()
    await notifier.drain()
    [row] = await outbox.rows()
    async with outbox.engine.begin() as conn:
        assert await notifications.redeliver_notification(conn, row["id"], outbox.clock.now)
    await notifier.drain()

    first, again = receiver.requests
    assert first.headers["webhook-id"] == again.headers["webhook-id"] == f"ntf_{row['id']}"
    [row] = await outbox.rows()
    assert (row["status"], row["attempt"], row["retry_from"]) == ("delivered", 2, 1)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_second_notifier_waits_to_count_a_users_dispatches(outbox: Outbox) -> None:
    """The per-minute limit is shared: a claim counts a (user, channel)'s dispatches under a
    transaction-long advisory lock, so a second notifier counts only after the first commits."""
    limits = {(1, "webhook"): 3}
    async with outbox.engine.begin() as first:
        await store.recent_dispatches(first, limits, since=0.0)

        async def second() -> None:
            async with outbox.engine.begin() as conn:
                await store.recent_dispatches(conn, limits, since=0.0)

        waiting = asyncio.create_task(second())
        async with outbox.engine.connect() as watcher:
            while not (await watcher.execute(text(  # the second claim is blocked on the lock
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted"))).scalar_one():
                assert not waiting.done()
                await asyncio.sleep(0.01)
        assert not waiting.done()
    await asyncio.wait_for(waiting, 30)  # released by the first commit
