"""The notifier (`defiwatch run notifier`): claims due outbox rows, sends them, settles them.

    claim (one transaction)        send (concurrently)          settle (batched transactions)
    lock due rows, plan them,  ──> senders.send(notification) ──> row + attempt outcome,
    lease + attempt rows            breaker.record, decide()       endpoint failure clock

At least once: a row is leased before it is sent and settled after, so a notifier that dies
mid-send leaves a lease that expires and another notifier sends the row again, under the same
idempotency key (`ntf_<id>`: the webhook-id, the email Message-ID). Several notifiers share the
outbox on PostgreSQL (`FOR UPDATE SKIP LOCKED`); they wake on `NOTIFY defiwatch_notify` and
poll as a fallback. A slow or dead receiver only holds its own host's slots (`per_host`), and
its circuit breaker postpones its rows instead of spending attempts on them.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from defiwatch.alerts.events import event_dict
from defiwatch.config import Settings
from defiwatch.domain.events import Event
from defiwatch.notify.breaker import Admission, CircuitBreaker, breaker_key
from defiwatch.notify.message import Notification
from defiwatch.notify.plan import (
    BYPASS_KINDS,
    WINDOW_S,
    Plan,
    PlanInput,
    Send,
    build_notification,
    digest_payload,
    per_minute,
    plan,
)
from defiwatch.notify.redact import redact_url
from defiwatch.notify.retry import Action, Decision, RetryPolicy, decide
from defiwatch.notify.senders.base import Outcome, Reason, SendResult
from defiwatch.notify.senders.webhook import generate_webhook_secret
from defiwatch.ops import health
from defiwatch.processor.wakeup import Wakeup
from defiwatch.store import alerts as alert_store
from defiwatch.store import delivery as store
from defiwatch.store.delivery import AttemptStart, Endpoint, OutboxRow, Settlement
from defiwatch.stream import EventStream

__all__ = ["Notifier", "NotifierConfig"]

log = structlog.get_logger(__name__)

CLAIMED = Counter("defiwatch_notifier_claimed", "Outbox rows claimed, by what was done with them "
                  "(send, held, postponed, dead, expanded, digested).", ["action"])
SETTLED = Counter("defiwatch_notifier_settled", "Attempts settled, by the row's new status "
                  "(delivered, pending = retry, dead).", ["status"])
DELIVERY_SECONDS = Histogram(
    "defiwatch_notifier_delivery_seconds",
    "From queueing (an alert fired) to the receiver's acceptance, seconds, delivered rows only.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0, 86400.0))
INFLIGHT = Gauge("defiwatch_notifier_inflight", "Sends in flight in this notifier.")
DISABLED = Counter("defiwatch_notifier_endpoints_disabled",
                   "Endpoints disabled after failing continuously.")

_SETTLE_BATCH = 500
_MAX_SETTLE_WAIT_S = 30.0


class _Sends(Protocol):
    async def send(self, notification: Notification) -> SendResult: ...


@dataclass(frozen=True)
class NotifierConfig:
    worker: str
    concurrency: int = 256
    per_host: int = 32
    batch: int = 200
    lease_s: float = 60.0
    poll_s: float = 1.0
    default_per_minute: int = 30
    disable_after_s: float = 3 * 86_400.0
    send_timeout_s: float = 10.0  # the HTTP senders' deadline; the lease should outlast it

    @classmethod
    def from_settings(cls, s: Settings) -> NotifierConfig:
        return cls(worker=s.notifier_id or f"{socket.gethostname()}:{os.getpid()}",
                   concurrency=s.notifier_concurrency, per_host=s.notifier_per_host,
                   batch=s.notifier_batch, lease_s=s.notifier_lease_s, poll_s=s.notifier_poll_s,
                   default_per_minute=s.notify_max_per_minute,
                   disable_after_s=s.notify_disable_after_s,
                   send_timeout_s=s.notify_webhook_timeout_s)


@dataclass(frozen=True, slots=True)
class _Done:
    send: Send
    host: str
    endpoint_id: int | None
    result: SendResult
    decision: Decision
    finished_at: float


class Notifier:
    """One notifier process's loop. `run` until stopped; `drain` (tests, tools) claims and
    settles until nothing is due."""

    def __init__(
        self,
        engine: AsyncEngine,
        senders: _Sends,
        *,
        config: NotifierConfig,
        retry: RetryPolicy,
        breaker: CircuitBreaker,
        alerts: EventStream | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._db = engine
        self._senders = senders
        self.config = config
        self._retry = retry
        self._breaker = breaker
        self._alerts = alerts
        self._clock = clock
        self._rng = rng
        self._inflight: dict[str, int] = defaultdict(int)
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Queue[_Done | None] = asyncio.Queue()  # None: the settler's stop
        self._slot_freed = asyncio.Event()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, wakeup: Wakeup) -> None:
        settler = asyncio.create_task(self._settle_forever(), name="notifier-settle")
        log.info("notifier.started", worker=self.config.worker)
        if self.config.lease_s <= self.config.send_timeout_s:
            log.warning("notifier.lease_too_short", lease_s=self.config.lease_s,
                        send_timeout_s=self.config.send_timeout_s,
                        consequence="a send slower than the lease is made again by another "
                                    "notifier (same idempotency key)")
        try:
            while not stop.is_set():
                try:
                    more = await self.claim()
                    health.beat("notifier", idle_s=self.config.poll_s)
                except (SQLAlchemyError, OSError) as exc:
                    log.warning("notifier.claim_failed", error=str(exc))
                    health.beat("notifier", error=str(exc), idle_s=self.config.poll_s)
                    more = False
                if not more:
                    await self._idle(stop, wakeup)
        finally:
            # Let the sends finish and the settler write every outcome before it stops: a
            # cancelled write would roll back a batch of answered sends (sent again later).
            await self._finish_inflight()
            self._done.put_nowait(None)
            await settler
            log.info("notifier.stopped", worker=self.config.worker)

    async def _idle(self, stop: asyncio.Event, wakeup: Wakeup) -> None:
        """Until a wake-up, a freed slot (if full), stop, or the poll interval."""
        self._slot_freed.clear()
        waiters = [asyncio.ensure_future(stop.wait()),
                   asyncio.ensure_future(wakeup.wait(self.config.poll_s))]
        if self._free() <= 0:
            waiters.append(asyncio.ensure_future(self._slot_freed.wait()))
        try:
            await asyncio.wait(waiters, timeout=self.config.poll_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def drain(self, *, max_rounds: int = 1_000) -> None:
        """Claim, send and settle until nothing is due now (retries scheduled later stay)."""
        for _ in range(max_rounds):
            more = await self.claim()
            await self._finish_inflight()
            await self._settle_pending()
            if not more and not self._tasks:
                return

    def _free(self) -> int:
        return self.config.concurrency - len(self._tasks)

    # --- claim ------------------------------------------------------------------------------

    async def claim(self) -> bool:
        """Claim one batch and start its sends; True if more rows may be due right away."""
        free = self._free()
        if free <= 0:
            return False
        now = self._clock()
        limit = min(self.config.batch, free)
        saturated = [h for h, n in self._inflight.items() if n >= self.config.per_host]
        async with self._db.begin() as conn:
            rows = await store.claim_due(conn, now=now, limit=limit, exclude_hosts=saturated)
            if not rows:
                return False
            await store.close_lost_attempts(conn, rows, now)
            planned = plan(rows, await self._inputs(conn, rows, now, free))
            await self._apply(conn, planned, now)
        self._count(planned)
        for send in planned.sends:
            self._start(send)
        progress = len(rows) - planned.deferred
        return (len(rows) == limit and progress > 0) or bool(planned.digests or planned.expansions)

    async def _inputs(self, conn: AsyncConnection, rows: list[OutboxRow], now: float,
                      free: int) -> PlanInput:
        first = [r for r in rows if r.dispatched_at is None and r.kind not in BYPASS_KINDS]
        endpoint_keys = {(r.user_id, r.channel, r.target) for r in rows
                         if r.channel in ("webhook", "chat", "email")}
        endpoints = await store.ensure_endpoints(conn, endpoint_keys, now=now,
                                                 new_secret=generate_webhook_secret)
        push_users = {r.user_id for r in rows if r.channel == "push"}
        preferences = await store.load_preferences(conn, {r.user_id for r in first})
        limits = {(r.user_id, r.channel): per_minute(preferences.get(r.user_id), r.channel,
                                                     self.config.default_per_minute)
                  for r in first}
        return PlanInput(
            now=now,
            preferences=preferences,
            endpoints=endpoints,
            devices=await store.load_devices(conn, push_users) if push_users else {},
            dispatched=await store.recent_dispatches(conn, limits, since=now - WINDOW_S),
            default_per_minute=self.config.default_per_minute,
            free=free,
            host_free=lambda host: self.config.per_host - self._inflight.get(host, 0),
            admit=self._admit,
        )

    def _admit(self, host: str) -> float | None:
        now = self._clock()
        if self._breaker.admit(host, now) is not Admission.REJECT:
            return None
        return self._breaker.retry_at(host) or now + 1.0

    async def _apply(self, conn: AsyncConnection, planned: Plan, now: float) -> None:
        for group in planned.digests:
            await store.fold_digest(conn, group, digest_payload(group), now)
        for row, devices in planned.expansions:
            await store.expand_push(conn, row, devices, now)
        await store.release(conn, planned.releases, now)
        await store.start_attempts(
            conn, [AttemptStart(s.row.id, s.attempt, s.row.dispatched_at is None)
                   for s in planned.sends],
            worker=self.config.worker, now=now, lease_until=now + self.config.lease_s)

    @staticmethod
    def _count(planned: Plan) -> None:
        CLAIMED.labels("send").inc(len(planned.sends))
        CLAIMED.labels("expanded").inc(len(planned.expansions))
        CLAIMED.labels("digested").inc(sum(len(g) for g in planned.digests))
        for release in planned.releases:
            action = {"held": "held", "dead": "dead"}.get(release["status"], "postponed")
            CLAIMED.labels(action).inc()

    # --- send -------------------------------------------------------------------------------

    def _start(self, send: Send) -> None:
        host = send.row.host or breaker_key(send.target)
        self._inflight[host] += 1
        INFLIGHT.inc()
        task = asyncio.create_task(self._deliver(send, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, send: Send, host: str) -> None:
        try:
            result = await self._attempt(send)
        finally:
            self._inflight[host] -= 1
            if self._inflight[host] <= 0:
                del self._inflight[host]
            INFLIGHT.dec()
            self._slot_freed.set()
        now = self._clock()
        self._breaker.record(host, result, now)
        decision = decide(result, send.attempt - send.row.retry_from, self._retry, self._rng())
        self._done.put_nowait(_Done(send, host, send.endpoint_id, result, decision, now))

    async def _attempt(self, send: Send) -> SendResult:
        """One send; a bug in building or sending the message is a final failure of this row,
        never of the loop."""
        try:
            return await self._senders.send(build_notification(send))
        except Exception as exc:  # recorded on the row, logged with the trace
            log.exception("notifier.send_bug", notification=send.row.id)
            return SendResult(Outcome.FAILED_FINAL, Reason.INTERNAL,
                              error=f"internal error: {type(exc).__name__}")

    async def _finish_inflight(self) -> None:
        """Wait for the sends in flight (each is bounded by its sender's timeout)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # --- settle -----------------------------------------------------------------------------

    async def _settle_forever(self) -> None:
        """Settle outcomes in batches until the stop marker, and everything before it."""
        stopping = False
        while not stopping:
            first = await self._done.get()
            batch, stopping = self._take(_SETTLE_BATCH - 1)
            if first is None:
                stopping = True
            else:
                batch.insert(0, first)
            if batch:
                await self._settle(batch)

    async def _settle_pending(self) -> None:
        while not self._done.empty():
            batch, _ = self._take(_SETTLE_BATCH)
            await self._settle(batch)

    def _take(self, n: int) -> tuple[list[_Done], bool]:
        """Up to `n` queued outcomes, and whether the stop marker was among them."""
        out: list[_Done] = []
        stop = False
        while len(out) < n and not self._done.empty():
            item = self._done.get_nowait()
            if item is None:
                stop = True
            else:
                out.append(item)
        return out, stop

    async def _settle(self, batch: list[_Done]) -> None:
        """Write a batch of outcomes, retrying while the database is unreachable (the leases
        keep the rows ours meanwhile). Any other error is a bug: the batch is logged and left
        to its leases, whose expiry sends the rows again (at least once, never lost)."""
        delay = 0.2
        while True:
            try:
                published = await self._write(batch)
                break
            except (OperationalError, InterfaceError, OSError) as exc:
                log.warning("notifier.settle_failed", error=str(exc), rows=len(batch),
                            retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_SETTLE_WAIT_S)
            except SQLAlchemyError:
                log.exception("notifier.settle_bug", rows=[d.send.row.id for d in batch])
                return
        for done in batch:
            status = _row_status(done.decision)
            SETTLED.labels(status).inc()
            if status == "delivered":
                DELIVERY_SECONDS.observe(max(0.0, done.finished_at - done.send.row.created_at))
        await self._publish(published)

    async def _write(self, batch: list[_Done]) -> list[tuple[int, Event]]:
        now = self._clock()
        ok: set[int] = set()
        failed: dict[int, str] = {}
        for done in batch:
            if done.endpoint_id is None:
                continue
            if done.result.delivered:
                ok.add(done.endpoint_id)
            else:
                failed[done.endpoint_id] = done.result.error or str(done.result.reason)
        async with self._db.begin() as conn:
            await store.settle(conn, [_settlement(d) for d in batch], worker=self.config.worker)
            for done in batch:
                if done.decision.action is Action.DISABLE and done.send.row.channel == "push":
                    await store.disable_device(
                        conn, done.send.row.user_id, done.send.row.target,
                        f"gone: the push service answered {done.result.status_code}", now)
            await store.mark_endpoints(conn, ok=ok, failed=failed, now=now)
            disabled = await store.disable_endpoints(
                conn, failed, failing_before=now - self.config.disable_after_s, now=now,
                reason=f"no successful delivery for {self.config.disable_after_s / 3600:g} h")
            return await self._tell_owners(conn, disabled, batch, now)

    async def _tell_owners(self, conn: AsyncConnection, disabled: list[Endpoint],
                           batch: list[_Done], now: float) -> list[tuple[int, Event]]:
        """A history entry and an `alerts` channel event per disabled endpoint."""
        if not disabled:
            return []
        rows = {d.endpoint_id: d.send.row for d in batch}
        events: list[Event] = []
        for endpoint in disabled:
            DISABLED.inc()
            row = rows.get(endpoint.id)
            detail = (row.payload.get("detail") or {}) if row is not None else {}
            event = _disabled_event(endpoint, now)
            await store.record_disabled(conn, endpoint, rule_name=detail.get("rule_name"),
                                        event=event_dict(event), now=now)
            events.append(event)
            log.warning("notifier.endpoint_disabled", endpoint=endpoint.id,
                        user=endpoint.user_id, channel=endpoint.channel,
                        target=_shown(endpoint), failing_since=endpoint.failing_since)
        ids = await alert_store.enqueue_stream_events(conn, [event_dict(e) for e in events], now)
        return list(zip(ids, events, strict=True))

    async def _publish(self, published: list[tuple[int, Event]]) -> None:
        """After the commit, onto the alerts stream (the alert engine's sweep publishes what a
        crash here leaves in the stream outbox)."""
        if not published or self._alerts is None:
            return
        await self._alerts.publish([event for _, event in published])
        async with self._db.begin() as conn:
            await alert_store.delete_stream_events(conn, [i for i, _ in published])


def _row_status(decision: Decision) -> str:
    if decision.action is Action.DONE:
        return "delivered"
    return "pending" if decision.action is Action.RETRY else "dead"


def _settlement(done: _Done) -> Settlement:
    status = _row_status(done.decision)
    attempt_status = {"delivered": "delivered", "pending": "failed"}.get(status, "dead")
    result = done.result
    error = None if result.delivered else (result.error or done.decision.why)
    next_at = done.finished_at + (done.decision.delay_s or 0.0)
    return Settlement(done.send.row.id, done.send.attempt, status, attempt_status, next_at,
                      result.status_code, error, round(result.latency_s * 1000.0, 3),
                      done.finished_at)


def _shown(endpoint: Endpoint) -> str:
    return endpoint.target if endpoint.channel == "email" else redact_url(endpoint.target)


def _disabled_event(endpoint: Endpoint, now: float) -> Event:
    return Event(
        type="endpoint_disabled", metric="delivery", subject=endpoint.channel, chain="",
        value=None, previous=None, change_abs=None, change_pct=None, change_1h=None,
        change_24h=None, change_7d=None, ts=int(now), emitted_at=now, source="notifier",
        detail={"user_id": endpoint.user_id, "rule_id": None,
                "instance": f"endpoint:{endpoint.id}", "endpoint_id": endpoint.id,
                "channel": endpoint.channel, "target": _shown(endpoint),
                "failing_since": endpoint.failing_since, "state": "endpoint_disabled",
                "reason": "endpoint_failing"})



