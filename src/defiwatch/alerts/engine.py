"""The alert engine: the I/O shell around the rule index and the lifecycle.

Per batch of stream entries (taken through a consumer group, so several workers share them):

1. Events that no rule watches are only acknowledged. For the others, samples are built (with
   change windows beyond 1h/24h/7d computed from stored points, when a rule needs one) and the
   newest values of other series that rules read are fetched from the hot cache.
2. One database transaction: lock the batch's series (PostgreSQL advisory locks, in order), read
   the series cursors and drop events older than what was already applied (another worker got a
   newer event of the series first), read and lock the instance states those events can touch,
   evaluate event by event through the index (alerts/evaluate.py), write alert_history rows
   (unique dedup key), notification_logs rows (the outbox) and alert events (the stream outbox),
   the new states, the cursors and the group's stream position (where a worker started after
   Redis lost the group resumes). Commit.
3. Publish the alert events to the `alerts` stream, delete them from the stream outbox, and
   acknowledge the batch.

A worker that dies before 3 leaves its entries pending; another claims them after
`claim_idle_s`. Re-processing is harmless: the cursors skip events already applied, and what was
committed but not published is published by any engine's sweep of the stream outbox. So a
transition is recorded, queued and streamed exactly once across workers (docs/alerts.md has the
argument in full).

A tick (every `tick_s`) advances instances that are due without an event: a pending instance
past its `for` duration, a fire held by the cooldown, a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from defiwatch.alerts.config import EngineConfig
from defiwatch.alerts.evaluate import Decision, Evaluator, MemoryStates
from defiwatch.alerts.events import AlertEventType, alert_dedup_key, build_alert_event, event_dict
from defiwatch.alerts.index import RuleIndex
from defiwatch.alerts.lifecycle import Action, InstanceState, due_at
from defiwatch.alerts.rules import CompiledRule, RuleKind, compile_stored
from defiwatch.cache import HotCache
from defiwatch.domain import Event, EventType, Latest, SeriesKey
from defiwatch.domain.changes import SeriesState, pct_change
from defiwatch.domain.conditions import Sample
from defiwatch.errors import DefiwatchError
from defiwatch.ops import health
from defiwatch.ops.supervisor import BACKEND_ERRORS, Backoff, wait_or_stop
from defiwatch.store import alerts as store
from defiwatch.store import delivery
from defiwatch.store.points import load_history
from defiwatch.stream import EventStream
from defiwatch.stream.group import Delivery, StreamGroup

__all__ = ["AlertEngine", "sample_of", "state_series"]

log = structlog.get_logger(__name__)

EVENTS = Counter("defiwatch_alerts_events_evaluated_total",
                 "Stream events evaluated against the rules")
SKIPPED = Counter("defiwatch_alerts_events_skipped_total",
                  "Stream events not evaluated, by reason", ["reason"])
MATCHED = Counter("defiwatch_alerts_rules_matched_total",
                  "Rule instances evaluated (index candidates and active instances)")
FIRED = Counter("defiwatch_alerts_fired_total", "Alerts fired, by reason", ["reason"])
TRANSITIONS = Counter("defiwatch_alerts_transitions_total",
                      "Lifecycle transitions recorded, by action", ["action"])
NOTIFICATIONS = Counter("defiwatch_alerts_notifications_queued_total",
                        "Notification outbox rows written, by kind", ["kind"])
EVALUATION = Histogram(
    "defiwatch_alerts_evaluation_seconds",
    "Time to evaluate one batch through the index (pure core, without database time)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BATCH = Histogram(
    "defiwatch_alerts_batch_seconds", "Time to process one batch, end to end",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LATENCY = Histogram(
    "defiwatch_alerts_event_to_fired_seconds",
    "From the event's emitted_at to its alert committed and published",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RULES = Gauge("defiwatch_alerts_rules_loaded", "Active (not paused) rules in the index")

_VALUE_EVENTS = frozenset({EventType.TVL_CHANGE.value, EventType.PRICE_CHANGE.value})
_DUE_BATCH = 500


def sample_of(event: Event) -> Sample:
    """The sample a condition sees for a stream event (value events only)."""
    assert event.value is not None
    return Sample(
        event.metric, event.subject, event.chain, event.ts, event.value, event.previous,
        {3_600: event.change_1h, 86_400: event.change_24h, 604_800: event.change_7d},
    )


def _sample_of_latest(latest: Latest) -> Sample:
    return Sample(
        latest.metric, latest.subject, latest.chain, latest.ts, latest.value, None,
        {3_600: latest.change_1h, 86_400: latest.change_24h, 604_800: latest.change_7d},
    )


def _state(raw: dict[str, Any]) -> InstanceState:
    return msgspec.convert(raw, InstanceState)


def state_series(rule: CompiledRule, instance: str) -> str:
    """alert_states.series: how the engine finds a state from an event (see schema.py)."""
    if rule.kind is RuleKind.WILDCARD:
        return instance
    return rule.scope[0] if rule.kind is RuleKind.SINGLE else ""


class _Outbox:
    """What one transaction queued: alert events to publish and when their source was emitted."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.emitted: list[float] = []
        self.ids: list[int] = []  # alert_stream_outbox rows holding `events`


class AlertEngine:
    """Evaluates the event stream against users' rules (see module docstring).

    Args:
        db: the database (rules, states, history, outboxes; points for custom windows).
        events: this worker's consumer of the event stream's group.
        alerts: the stream named "alerts" (dedup key `alert_stream_key`) fired and resolved
            alerts are published to.
        cache: the hot cache: newest values of series a rule reads besides the event's own.
        config: batching, polling and housekeeping intervals.
        clock: wall clock (epoch s) for the lifecycle; tests pass a fake one.
        on_queued: called after a commit that queued notifications (an in-process notifier's
            wake-up; on PostgreSQL the commit's NOTIFY does it across processes).
    """

    def __init__(
        self,
        db: AsyncEngine,
        events: StreamGroup,
        alerts: EventStream,
        cache: HotCache,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self._db = db
        self._on_queued = on_queued
        self._events = events
        self._alerts = alerts
        self._cache = cache
        self._cfg = config or EngineConfig()
        self._clock = clock
        self.index = RuleIndex()
        self._evaluator = Evaluator(self.index)
        self._revision = 0
        self._next_refresh = 0.0
        self._started = False
        self._recover = True  # process our own pending entries first (restart, failed batch)
        # The newest sample of each series this worker has seen, for rules reading a series
        # other than the event's (compared with the hot cache by ts: the newer wins).
        self._seen: dict[str, Sample] = {}
        self._postgres = db.dialect.name == "postgresql"

    # --- lifecycle of the worker ---------------------------------------------------------

    async def start(self) -> int:
        """Create the consumer group if needed, load every active rule and take over what
        other workers left pending; return how many entries that took (`_take_over`)."""
        if self._started:
            return 0
        await self._events.ensure("earliest" if self._cfg.start == "earliest" else "latest",
                                  committed=self._committed_position)
        await self.refresh_rules(force=True)
        self.index.prepare()
        # The loaded rules live as long as the process: move them out of the cyclic GC's
        # generations, so that a collection does not walk 100,000 rules and their closures in
        # the middle of a batch (a latency spike of tens of ms, measured by bench/alerts.py).
        gc.freeze()
        self._started = True
        log.info("alerts.started", consumer=self._events.consumer, rules=len(self.index))
        return await self._take_over()

    async def _take_over(self) -> int:
        """Process what other workers took but did not acknowledge, before any newer event.

        A worker restarted under a new name (a new pid) would otherwise apply newer events of
        those series first and skip the older ones as stale when it claimed them after
        `claim_idle_s`: their transitions would be lost. Entries a live worker is still on are
        taken too; the series locks and cursors apply each event once all the same.
        """
        taken = 0
        while claimed := await self._events.claim(0, self._cfg.batch):
            taken += await self.process(claimed)
            if len(claimed) < self._cfg.batch:
                break
        if taken:
            log.info("alerts.took_over", consumer=self._events.consumer, entries=taken)
        return taken

    async def drain(self) -> int:
        """Process everything available now, then tick and sweep the outbox; return the number
        of stream entries processed (the burst mode tests use)."""
        total = await self.start()
        while batch := await self._events.pending(self._cfg.batch):
            total += await self.process(batch)
        self._recover = False
        while batch := await self._events.read(self._cfg.batch, 0):
            total += await self.process(batch)
        await self.tick()
        await self.republish(older_than_s=0)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Process until `stop` is set; failures are logged and retried with backoff."""
        delay: float | None = None
        failures = 0
        next_claim = next_tick = 0.0
        while not stop.is_set():
            try:
                await self.start()
                if self._recover:
                    while batch := await self._events.pending(self._cfg.batch):
                        await self.process(batch)
                    self._recover = False
                now = time.monotonic()
                if now >= next_claim:
                    claimed = await self.recover_stale()
                    next_claim = now + (0 if claimed == self._cfg.batch
                                        else self._cfg.claim_idle_s / 2)
                batch = await self._events.read(self._cfg.batch, min(self._cfg.block_s,
                                                                     self._cfg.tick_s))
                if batch:
                    await self.process(batch)
                else:
                    await self.refresh_rules()
                if time.monotonic() >= next_tick:
                    await self.tick()
                    await self.republish(older_than_s=self._cfg.republish_after_s)
                    next_tick = time.monotonic() + self._cfg.tick_s
                if failures:
                    log.info("alerts.recovered", failures=failures)
                delay, failures = None, 0
                health.beat("alerts")
            except BACKEND_ERRORS as exc:
                # Never exit for good on a backend error (a Redis that lost its data answers
                # errors until the group is recreated): retry with backoff, logging each try.
                self._recover = True
                failures += 1
                delay = Backoff().delay(delay)
                log.warning("alerts.batch_failed", error=str(exc), error_type=type(exc).__name__,
                            failures=failures, retry_in_s=delay)
                health.beat("alerts", error=str(exc), idle_s=delay)
                await wait_or_stop(stop, delay)

    async def recover_stale(self) -> int:
        """Claim and process entries another worker took but did not acknowledge within
        `claim_idle_s` (it died mid-batch); return how many were claimed (at most one batch)."""
        await self.start()
        claimed = await self._events.claim(self._cfg.claim_idle_s, self._cfg.batch)
        if claimed:
            log.info("alerts.claimed", consumer=self._events.consumer, entries=len(claimed))
            await self.process(claimed)
        return len(claimed)

    # --- rules ---------------------------------------------------------------------------

    async def refresh_rules(self, *, force: bool = False) -> int:
        """Apply rule changes made since the last refresh; return how many rules changed.

        Polls the one-row revision counter every `rule_refresh_s` (cheap), and reads the changed
        rows only when it moved."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return 0
        self._next_refresh = now + self._cfg.rule_refresh_s
        async with self._db.connect() as conn:
            revision = await store.current_revision(conn)
            if revision == self._revision:
                return 0
            changed = await store.rules_changed_since(conn, self._revision)
        for row in changed:
            if row.deleted_at is not None or row.paused:
                self.index.remove(row.id)
                continue
            try:
                self.index.add(compile_stored(row))
            except DefiwatchError as exc:  # stored before a validation rule tightened
                self.index.remove(row.id)
                log.error("alerts.rule_invalid", rule_id=row.id, error=str(exc))
        self._revision = max([revision, *(r.revision for r in changed)])
        RULES.set(len(self.index))
        log.info("alerts.rules_refreshed", revision=self._revision, changed=len(changed),
                 active=len(self.index))
        return len(changed)

    # --- events --------------------------------------------------------------------------

    async def process(self, deliveries: Sequence[Delivery]) -> int:
        """Evaluate a batch of stream entries, persist and publish the outcome, acknowledge."""
        started = time.perf_counter()
        await self.refresh_rules()
        samples: list[tuple[Event, Sample]] = []
        for d in deliveries:
            event = d.event
            if event is None or event.value is None or event.type not in _VALUE_EVENTS:
                SKIPPED.labels("not_a_value_event").inc()
                continue
            if not self.index.watched(event.metric, event.subject, event.chain):
                SKIPPED.labels("unwatched").inc()
                continue
            samples.append((event, sample_of(event)))
        if samples:
            await self._fill_custom_windows(samples)
            foreign = await self._foreign(samples)
            try:
                outbox = await self._apply(samples, foreign, max(d.offset for d in deliveries))
            except BaseException:
                # The index primed fresh rules for evaluations that were rolled back.
                self.index.unprime()
                raise
            await self._publish(outbox)
        await self._events.ack([d.offset for d in deliveries])
        BATCH.observe(time.perf_counter() - started)
        return len(deliveries)

    async def _fill_custom_windows(self, samples: Sequence[tuple[Event, Sample]]) -> None:
        """Changes over windows other than 1h/24h/7d, from stored points (the source of truth,
        shared by all workers). Only for series whose rules use such a window."""
        needs: dict[str, tuple[frozenset[int], list[Sample]]] = {}
        for _, sample in samples:
            windows = self.index.custom_windows(sample.metric, sample.subject, sample.chain)
            if windows:
                needs.setdefault(sample.key, (windows, []))[1].append(sample)
        if not needs:
            return
        async with self._db.connect() as conn:
            for windows, group in needs.values():
                first, last = min(s.ts for s in group), max(s.ts for s in group)
                span = int(max(windows) * 1.5) + 1 + (last - first)
                key = SeriesKey(group[0].metric, group[0].subject, group[0].chain)
                history = SeriesState()
                for ts, value in await load_history(conn, key, before=last + 1, seconds=span):
                    history.add(ts, value)
                for sample in group:
                    for window in windows:
                        ref = history.reference(sample.ts, window)
                        sample.changes[window] = None if ref is None else pct_change(
                            sample.value, ref)

    async def _foreign(
        self, samples: Sequence[tuple[Event, Sample]]
    ) -> Callable[[str], Sample | None]:
        """Newest values of series that rules read besides the event's own."""
        keys: set[str] = set()
        for _, s in samples:
            keys |= self.index.foreign_keys(s.metric, s.subject, s.chain)
        cached: dict[str, Sample] = {}
        for key in keys:
            metric, subject, chain = key.split("|", 2)
            found = await self._cache.get_latest(metric, subject, chain, limit=1)
            if found:
                cached[key] = _sample_of_latest(found[0])
        seen = self._seen

        def lookup(key: str) -> Sample | None:
            a, b = seen.get(key), cached.get(key)
            if a is None or (b is not None and b.ts > a.ts):
                return b
            return a

        return lookup

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction. SQLite: BEGIN IMMEDIATE takes the write lock first, so the states
        read cannot be changed by the API before we write (a deferred transaction would fail
        with SQLITE_BUSY when upgrading its read to a write)."""
        async with self._db.connect() as conn:
            if not self._postgres:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    async def _apply(
        self, samples: Sequence[tuple[Event, Sample]], foreign: Callable[[str], Sample | None],
        position: int,
    ) -> _Outbox:
        """Evaluate and record `samples` in one transaction, with the group's `position` (the
        newest offset of their batch: every entry up to it is then applied or needs nothing)."""
        now = self._clock()
        series = sorted({s.key for _, s in samples})
        multi: set[int] = set()
        for _, s in samples:
            multi.update(self.index.multi_rules(s.metric, s.subject, s.chain))
        outbox = _Outbox()
        async with self._transaction() as conn:
            # Order matters: series locks first (sorted), then state rows (sorted): every worker
            # takes locks in the same order, so they serialise per series and never deadlock.
            await store.lock_series(conn, series)
            cursors = await store.load_cursors(conn, series)
            view = MemoryStates()
            for row in await store.load_states(conn, series, sorted(multi), lock=True):
                rule = self.index.get(row.rule_id)
                if rule is not None:
                    view.set(rule, row.instance, _state(row.state))
            applied: dict[str, store.Cursor] = {}
            changed: dict[tuple[int, str], CompiledRule] = {}
            evaluation = 0.0
            for event, sample in samples:
                last = cursors.get(sample.key)
                if last is not None:
                    if sample.ts <= last.ts:
                        SKIPPED.labels("stale").inc()
                        continue
                    # What the rules last saw of this series, whichever worker applied it: the
                    # index looks up the comparisons that flip from there (alerts/index.py).
                    sample.before = last.measures
                    if last.measures is not None and last.measures.get(0) is not None:
                        sample.previous = last.measures[0]
                cursors[sample.key] = applied[sample.key] = store.Cursor(
                    sample.ts, {0: sample.value, **sample.changes})
                seen = self._seen.get(sample.key)
                if seen is None or seen.ts < sample.ts:
                    self._seen[sample.key] = sample
                t0 = time.perf_counter()
                decisions, evaluated = self._evaluator.evaluate(
                    sample, view, now, foreign=foreign, origin=event)
                evaluation += time.perf_counter() - t0
                EVENTS.inc()
                MATCHED.inc(evaluated)
                for decision in decisions:
                    await self._record(conn, decision, view, outbox, now)
                    changed[(decision.rule.id, decision.instance)] = decision.rule
            EVALUATION.observe(evaluation)
            await self._save(conn, view, changed, now)
            await store.save_cursors(conn, applied, now)
            outbox.ids = await self._queue(conn, outbox, now)
            # Last: the position row is the one row every worker's batch writes; its lock is
            # held only from here to the commit, and taken after all the others (no deadlock).
            await self._save_position(conn, position, now)
        return outbox

    async def _save_position(self, conn: AsyncConnection, offset: int, now: float) -> None:
        """Commit the group's stream position with the batch: a worker started after Redis lost
        the group recreates it there (stream/group.py start_id), not at the newest entry.
        A batch of only unwatched events does not move it: re-delivering those costs little."""
        epoch = self._events.epoch
        if epoch is not None:
            await store.save_group_position(conn, self._events.group, epoch, offset, now)

    async def _committed_position(self) -> tuple[str, int] | None:
        """The position `_save_position` last committed for this group (read by `ensure`)."""
        async with self._db.connect() as conn:
            return await store.load_group_position(conn, self._events.group)

    # --- recording decisions ---------------------------------------------------------------

    async def _record(
        self, conn: AsyncConnection, d: Decision, view: MemoryStates, outbox: _Outbox, now: float
    ) -> None:
        """Write one decision's alert row and queue its notifications and stream event; keep
        the instance's state in `view` up to date (alert id, last alert ts, remembered event)."""
        rule, action, state = d.rule, d.step.action, d.step.state
        origin: Event | None = d.origin
        TRANSITIONS.labels(action.value).inc()
        if action in (Action.PENDING, Action.HELD) and origin is not None:
            # Remember what started the episode: a fire decided later by the tick records it.
            state = msgspec.structs.replace(state, event=event_dict(origin))
        elif action is Action.FIRED:
            source = event_dict(origin) if origin is not None else d.before.event
            state = await self._record_fire(conn, d, state, source, outbox, now)
        elif action is Action.RESOLVED:
            source = event_dict(origin) if origin is not None else None
            state = await self._record_resolve(conn, d, state, source, outbox, now)
        elif action is Action.REPEATED and state.alert_id is not None:
            source = d.before.event
            self._notify(outbox, rule, state.alert_id, AlertEventType.FIRED, state.repeats,
                         self._payload(AlertEventType.FIRED, rule, d.instance, state,
                                       source, "firing", d.step.reason.value, now, None))
        view.set(rule, d.instance, state)

    async def _record_fire(
        self, conn: AsyncConnection, d: Decision, state: InstanceState,
        source: dict[str, Any] | None, outbox: _Outbox, now: float,
    ) -> InstanceState:
        rule = d.rule
        series = state.episode_series or ""
        episode_ts = state.episode_ts or 0
        dedup = alert_dedup_key(rule.id, d.instance, series, episode_ts)
        metric, subject, chain = [*series.split("|", 2), "", "", ""][:3]
        suppressed = d.step.suppressed.value if d.step.suppressed else None
        alert_ts = max(int((source or {}).get("ts", episode_ts)), state.last_alert_ts + 1)
        row = {
            "rule_id": rule.id, "user_id": rule.user_id, "rule_name": rule.name,
            "severity": rule.severity, "instance": d.instance, "metric": metric,
            "subject": subject, "chain": chain, "state": "firing",
            "reason": d.step.reason.value, "suppressed": suppressed,
            "value": (source or {}).get("value"), "event": source, "fired_at": now,
            "dedup_key": dedup, "updated_at": now,
        }
        inserted = await store.insert_alerts(conn, [row])
        if dedup not in inserted:
            # Replayed after a crash: the alert exists, its notifications and event too.
            existing = await store.alert_ids(conn, [dedup])
            log.info("alerts.duplicate_transition", rule_id=rule.id, dedup_key=dedup)
            return msgspec.structs.replace(state, alert_id=existing.get(dedup))
        alert_id = inserted[dedup]
        state = msgspec.structs.replace(state, alert_id=alert_id, last_alert_ts=alert_ts)
        FIRED.labels(d.step.reason.value).inc()
        log.info("alerts.fired", rule_id=rule.id, user_id=rule.user_id, instance=d.instance,
                 alert_id=alert_id, reason=d.step.reason.value, suppressed=suppressed)
        payload = self._payload(AlertEventType.FIRED, rule, d.instance, state, source, "firing",
                                d.step.reason.value, now, suppressed, ts=alert_ts, dedup=dedup)
        if d.step.notify:
            self._notify(outbox, rule, alert_id, AlertEventType.FIRED, 0, payload)
        outbox.events.append(payload)
        outbox.emitted.append(float((source or {}).get("emitted_at") or now))
        return state

    async def _record_resolve(
        self, conn: AsyncConnection, d: Decision, state: InstanceState,
        source: dict[str, Any] | None, outbox: _Outbox, now: float,
    ) -> InstanceState:
        rule = d.rule
        alert_id = d.before.alert_id
        if alert_id is None and d.before.episode_ts is not None:
            dedup = alert_dedup_key(rule.id, d.instance, d.before.episode_series or "",
                                    d.before.episode_ts)
            alert_id = (await store.alert_ids(conn, [dedup])).get(dedup)
        state = msgspec.structs.replace(state, alert_id=None)
        if alert_id is None:
            return state
        done = await store.resolve_alerts(conn, [{
            "id": alert_id, "resolved_at": now, "resolve_reason": d.step.reason.value,
            "resolved_event": source}])
        if not done:
            return state  # replayed: resolved already
        alert_ts = max(int((source or {}).get("ts", 0)), state.last_alert_ts + 1)
        state = msgspec.structs.replace(state, last_alert_ts=alert_ts)
        suppressed = d.step.suppressed.value if d.step.suppressed else None
        log.info("alerts.resolved", rule_id=rule.id, instance=d.instance, alert_id=alert_id,
                 notify=d.step.notify)
        payload = self._payload(AlertEventType.RESOLVED, rule, d.instance, state, source,
                                "resolved", d.step.reason.value, now, suppressed, ts=alert_ts,
                                alert_id=alert_id, dedup=alert_dedup_key(
                                    rule.id, d.instance, d.before.episode_series or "",
                                    d.before.episode_ts or 0))
        if d.step.notify:
            self._notify(outbox, rule, alert_id, AlertEventType.RESOLVED, 0, payload)
        outbox.events.append(payload)
        outbox.emitted.append(float((source or {}).get("emitted_at") or now))
        return state

    def _payload(
        self, kind: AlertEventType, rule: CompiledRule, instance: str, state: InstanceState,
        source: dict[str, Any] | None, status: str, reason: str, now: float,
        suppressed: str | None, *, ts: int | None = None, alert_id: int | None = None,
        dedup: str | None = None,
    ) -> dict[str, Any]:
        """The alert event as a dict: stream payload and notification `data` (one shape)."""
        series = state.episode_series or ""
        detail = {
            "user_id": rule.user_id, "rule_id": rule.id, "rule_name": rule.name,
            "alert_id": alert_id if alert_id is not None else state.alert_id,
            "instance": instance, "state": status, "reason": reason,
            "dedup_key": dedup or alert_dedup_key(rule.id, instance, series,
                                                  state.episode_ts or 0),
            "severity": rule.severity, "fired_at": state.fired_at,
            "resolved_at": now if status == "resolved" else None, "suppressed": suppressed,
        }
        event = build_alert_event(kind, source=source, series=series,
                                  ts=ts if ts is not None else state.last_alert_ts, now=now,
                                  detail=detail)
        return event_dict(event)

    def _notify(self, outbox: _Outbox, rule: CompiledRule, alert_id: int,
                kind: AlertEventType, seq: int, payload: dict[str, Any]) -> None:
        """Queue one outbox row per channel target. `kind` is the notification kind
        (alert_fired, alert_resolved); `seq` 0 for the first, n for the n-th repeat."""
        now = self._clock()
        for channel in rule.channels:
            outbox.notifications.append({
                "alert_id": alert_id, "user_id": rule.user_id, "rule_id": rule.id,
                "kind": kind.value, "seq": seq, "channel": channel.type,
                "target": channel.target, "host": channel.host, "config": channel.as_json(),
                "payload": payload,
                "status": "pending", "attempt": 0, "next_attempt_at": now, "created_at": now,
                "updated_at": now,
            })
        label = "repeat" if seq else "fired" if kind is AlertEventType.FIRED else "resolved"
        NOTIFICATIONS.labels(label).inc(len(rule.channels))

    async def _save(self, conn: AsyncConnection, view: MemoryStates,
                    changed: dict[tuple[int, str], CompiledRule], now: float) -> None:
        rows: list[tuple[int, str, str, str, dict[str, Any], float | None]] = []
        for (rule_id, instance), rule in changed.items():
            state = view.get(rule_id, instance)
            if state is not None:
                rows.append((rule_id, instance, state_series(rule, instance), state.phase.value,
                             msgspec.to_builtins(state), due_at(rule.policy, state)))
        await store.save_states(conn, rows, now)

    async def _queue(self, conn: AsyncConnection, outbox: _Outbox, now: float) -> list[int]:
        await delivery.queue_notifications(conn, outbox.notifications)
        return await store.enqueue_stream_events(conn, outbox.events, now)

    async def _publish(self, outbox: _Outbox) -> None:
        """After the commit: wake the notifier, alert events onto the alerts stream, then out
        of the outbox."""
        if outbox.notifications and self._on_queued is not None:
            self._on_queued()
        if not outbox.events:
            return
        events = [msgspec.convert(p, Event) for p in outbox.events]
        await self._alerts.publish(events)
        async with self._db.begin() as conn:
            await store.delete_stream_events(conn, outbox.ids)
        now = time.time()
        for emitted in outbox.emitted:
            LATENCY.observe(max(0.0, now - emitted))

    # --- housekeeping --------------------------------------------------------------------

    async def tick(self) -> int:
        """Advance due instances (pending past `for`, cooldown ends, repeats); return how many
        transitions that made."""
        now = self._clock()
        outbox = _Outbox()
        count = 0
        async with self._transaction() as conn:
            rows = await store.load_due_states(conn, now, _DUE_BATCH)
            if not rows:
                return 0
            view = MemoryStates()
            changed: dict[tuple[int, str], CompiledRule] = {}
            orphans: list[tuple[int, str, str, str, dict[str, Any], float | None]] = []
            due: list[tuple[int, str, InstanceState]] = []
            for row in rows:
                rule = self.index.get(row.rule_id)
                state = _state(row.state)
                if rule is None:
                    # Paused or deleted: nothing is due until an event touches it again.
                    orphans.append((row.rule_id, row.instance, row.series, state.phase.value,
                                    row.state, None))
                    continue
                view.set(rule, row.instance, state)
                changed[(rule.id, row.instance)] = rule  # due_at is recomputed for all
                due.append((rule.id, row.instance, state))
            decisions = self._evaluator.tick(due, now)
            for decision in decisions:
                await self._record(conn, decision, view, outbox, now)
                count += 1
            await self._save(conn, view, changed, now)
            await store.save_states(conn, orphans, now)
            outbox.ids = await self._queue(conn, outbox, now)
        await self._publish(outbox)
        return count

    async def republish(self, *, older_than_s: float) -> int:
        """Publish alert events committed but never published (their worker died between
        commit and publish). Publishing twice is harmless: the alerts stream deduplicates."""
        async with self._db.connect() as conn:
            rows = await store.pending_stream_events(
                conn, older_than=self._clock() - older_than_s, limit=1_000)
        if not rows:
            return 0
        await self._alerts.publish([msgspec.convert(p, Event) for _, p in rows])
        async with self._db.begin() as conn:
            await store.delete_stream_events(conn, [i for i, _ in rows])
        log.info("alerts.republished", events=len(rows))
        return len(rows)
