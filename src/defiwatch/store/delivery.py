"""The notification outbox as the notifier sees it: queue, claim, start attempts, settle.

Claims take due rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so several notifiers share
the outbox without taking the same row (SQLite ignores the clause: one notifier there). A claim
writes the attempt row (`sending`) in the same transaction as the lease, so a notifier killed
mid-send leaves a trace that the next claim of the row closes as `failed` ("worker lost").
Settling is conditional on the claim (`claimed_by`, `attempt`): a notifier whose lease expired
cannot overwrite what the one that retook the row decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import and_, bindparam, func, insert, or_, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.store.db import chunks, dialect_insert, on_postgres, row_dict
from defiwatch.store.schema import (
    alert_history,
    notification_attempts,
    notification_endpoints,
    notification_logs,
    notification_preferences,
    user_devices,
)

__all__ = [
    "NOTIFY_CHANNEL",
    "AttemptStart",
    "Device",
    "Endpoint",
    "EndpointKey",
    "OutboxRow",
    "Preferences",
    "Settlement",
    "claim_due",
    "close_lost_attempts",
    "disable_device",
    "disable_endpoints",
    "ensure_endpoints",
    "expand_push",
    "fold_digest",
    "load_devices",
    "load_endpoints",
    "load_preferences",
    "mark_endpoints",
    "queue_notifications",
    "recent_dispatches",
    "record_disabled",
    "release",
    "settle",
    "start_attempts",
    "wake_notifiers",
]

NOTIFY_CHANNEL = "defiwatch_notify"


async def wake_notifiers(conn: AsyncConnection) -> None:
    """On PostgreSQL, wake listening notifiers when this transaction commits."""
    if on_postgres(conn):
        await conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))


async def queue_notifications(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Queue notifications (status pending, attempt 0); a row already queued (same alert, kind,
    repeat, channel and target) is kept as is. Wakes the notifiers at commit."""
    if not rows:
        return
    stmt = dialect_insert(conn, notification_logs).on_conflict_do_nothing(
        index_elements=["alert_id", "kind", "seq", "channel", "target"])
    await conn.execute(stmt, list(rows))
    await wake_notifiers(conn)


# --- claiming --------------------------------------------------------------------------------


class OutboxRow(msgspec.Struct):
    """A claimed outbox row, as it was before the claim (`status` tells why it was due)."""

    id: int
    alert_id: int | None
    user_id: int
    rule_id: int | None
    kind: str
    seq: int
    channel: str
    target: str
    host: str
    config: dict[str, Any]
    payload: dict[str, Any]
    status: str
    attempt: int
    retry_from: int
    created_at: float
    dispatched_at: float | None


_ROW_COLUMNS = [notification_logs.c[name] for name in OutboxRow.__struct_fields__]




async def claim_due(
    conn: AsyncConnection, *, now: float, limit: int, exclude_hosts: Iterable[str] = ()
) -> list[OutboxRow]:
    """Lock up to `limit` due rows (pending or held past their time, or sending past their
    lease), oldest due first, skipping rows another notifier holds and the given hosts.

    The rows stay as they are until `start_attempts` / `release` / ... change them in the same
    transaction; a row locked but not changed is free again at commit."""
    t = notification_logs
    due = or_(
        and_(t.c.status.in_(("pending", "held")), t.c.next_attempt_at <= now),
        and_(t.c.status == "sending", t.c.lease_until < now),
    )
    stmt = select(*_ROW_COLUMNS).where(due)
    excluded = sorted(set(exclude_hosts))
    if excluded:
        stmt = stmt.where(t.c.host.not_in(excluded))
    stmt = stmt.order_by(t.c.next_attempt_at, t.c.id).limit(limit).with_for_update(skip_locked=True)
    rows = await conn.execute(stmt)
    return [msgspec.convert(row_dict(r), OutboxRow) for r in rows]


async def close_lost_attempts(conn: AsyncConnection, rows: Sequence[OutboxRow], now: float) -> None:
    """Rows retaken after their lease expired: their in-flight attempt ends as failed (the
    notifier that made it is gone; the receiver may or may not have the message)."""
    lost = [{"b_id": r.id, "b_attempt": r.attempt} for r in rows if r.status == "sending"]
    if not lost:
        return
    a = notification_attempts
    await conn.execute(
        update(a).where(a.c.notification_id == bindparam("b_id"),
                        a.c.attempt == bindparam("b_attempt"), a.c.status == "sending")
        .values(status="failed", error="worker lost: lease expired before the attempt settled",
                finished_at=now),
        lost,
    )


class AttemptStart(NamedTuple):
    id: int
    attempt: int  # the number of this attempt (the row's attempt count after it)
    first: bool  # the row's first dispatch (the per-user throttle counts it)


async def start_attempts(
    conn: AsyncConnection, starts: Sequence[AttemptStart], *, worker: str, now: float,
    lease_until: float,
) -> None:
    """Lease the rows to `worker` and record their attempts as `sending`."""
    if not starts:
        return
    t = notification_logs
    await conn.execute(
        update(t).where(t.c.id == bindparam("b_id")).values(
            status="sending", attempt=bindparam("b_attempt"), claimed_by=worker,
            lease_until=lease_until, updated_at=now,
            dispatched_at=func.coalesce(t.c.dispatched_at, now)),
        [{"b_id": s.id, "b_attempt": s.attempt} for s in starts],
    )
    await conn.execute(insert(notification_attempts), [
        {"notification_id": s.id, "attempt": s.attempt, "status": "sending", "worker": worker,
         "started_at": now} for s in starts])


async def release(conn: AsyncConnection, changes: Sequence[Mapping[str, Any]], now: float) -> None:
    """Put rows back without an attempt: `{"id", "status", "next_attempt_at", "last_error"}`
    (held for throttling or quiet hours, postponed by an open circuit, dead before sending)."""
    if not changes:
        return
    t = notification_logs
    await conn.execute(
        update(t).where(t.c.id == bindparam("b_id")).values(
            status=bindparam("b_status"), next_attempt_at=bindparam("b_next"),
            last_error=bindparam("b_error"), claimed_by=None, lease_until=None, updated_at=now),
        [{"b_id": c["id"], "b_status": c["status"], "b_next": c["next_attempt_at"],
          "b_error": c.get("last_error")} for c in changes],
    )


async def expand_push(
    conn: AsyncConnection, row: OutboxRow, devices: Sequence[str], now: float
) -> None:
    """A push to every device becomes one row per device (same alert, kind and repeat, so a
    repeated expansion adds nothing); the `*` row ends `expanded`."""
    children = [{
        "alert_id": row.alert_id, "user_id": row.user_id, "rule_id": row.rule_id,
        "kind": row.kind, "seq": row.seq, "channel": row.channel, "target": device,
        "host": "", "config": {**row.config, "device": device}, "payload": row.payload,
        "status": "pending", "attempt": 0, "next_attempt_at": now, "created_at": row.created_at,
        "updated_at": now, "parent_id": row.id,
    } for device in devices]
    if children:
        stmt = dialect_insert(conn, notification_logs).on_conflict_do_nothing(
            index_elements=["alert_id", "kind", "seq", "channel", "target"])
        await conn.execute(stmt, children)
    await release(conn, [{"id": row.id, "status": "expanded", "next_attempt_at": now}], now)


async def fold_digest(
    conn: AsyncConnection, rows: Sequence[OutboxRow], payload: Mapping[str, Any], now: float
) -> int:
    """Fold held rows of one (user, channel, target) into one digest row, due now; they end
    `digested` with `parent_id` the digest. Returns the digest's id."""
    first = rows[0]
    result = await conn.execute(insert(notification_logs).returning(notification_logs.c.id), [{
        "alert_id": None, "user_id": first.user_id, "rule_id": None, "kind": "digest",
        "seq": 0, "channel": first.channel, "target": first.target, "host": first.host,
        "config": first.config, "payload": dict(payload), "status": "pending", "attempt": 0,
        "next_attempt_at": now, "created_at": min(r.created_at for r in rows),
        "updated_at": now}])
    digest_id = int(result.scalar_one())
    t = notification_logs
    await conn.execute(
        update(t).where(t.c.id.in_([r.id for r in rows])).values(
            status="digested", parent_id=digest_id, claimed_by=None, lease_until=None,
            updated_at=now))
    return digest_id


# --- settling ----------------------------------------------------------------------------------


class Settlement(NamedTuple):
    """How one attempt ended, for the row and its attempt record."""

    id: int
    attempt: int
    status: str  # the row's: delivered | pending (retry) | dead
    attempt_status: str  # delivered | failed | dead
    next_attempt_at: float
    response_code: int | None
    error: str | None
    latency_ms: float
    finished_at: float


async def settle(conn: AsyncConnection, settlements: Sequence[Settlement], *, worker: str) -> int:
    """Write the outcome of finished attempts; returns how many rows were still this worker's
    (a row retaken after its lease expired is left to its new owner; its attempt row is still
    completed, so the log shows what this attempt did)."""
    if not settlements:
        return 0
    t = notification_logs
    result = await conn.execute(
        update(t).where(t.c.id == bindparam("b_id"), t.c.claimed_by == worker,
                        t.c.attempt == bindparam("b_attempt"), t.c.status == "sending")
        .values(status=bindparam("b_status"), next_attempt_at=bindparam("b_next"),
                last_error=bindparam("b_error"), response_code=bindparam("b_code"),
                sent_at=bindparam("b_sent"), claimed_by=None, lease_until=None,
                updated_at=bindparam("b_now")),
        [{"b_id": s.id, "b_attempt": s.attempt, "b_status": s.status,
          "b_next": s.next_attempt_at, "b_error": s.error, "b_code": s.response_code,
          "b_sent": s.finished_at if s.status == "delivered" else None,
          "b_now": s.finished_at} for s in settlements],
    )
    a = notification_attempts
    await conn.execute(
        update(a).where(a.c.notification_id == bindparam("b_id"),
                        a.c.attempt == bindparam("b_attempt"))
        .values(status=bindparam("b_status"), response_code=bindparam("b_code"),
                error=bindparam("b_error"), latency_ms=bindparam("b_latency"),
                finished_at=bindparam("b_finished")),
        [{"b_id": s.id, "b_attempt": s.attempt, "b_status": s.attempt_status,
          "b_code": s.response_code, "b_error": s.error, "b_latency": s.latency_ms,
          "b_finished": s.finished_at} for s in settlements],
    )
    return max(0, int(result.rowcount or 0))


# --- endpoints, devices, preferences ------------------------------------------------------------


class Endpoint(msgspec.Struct):
    """A notification_endpoints row; `secrets` holds the webhook secrets in clear (they sign;
    never shown after the answer that created them)."""

    id: int
    user_id: int
    channel: str
    target: str
    secrets: list[dict[str, Any]]
    failing_since: float | None
    last_error: str | None
    disabled_at: float | None
    disabled_reason: str | None
    created_at: float
    updated_at: float

    def status(self) -> str:
        """active, failing (failures since `failing_since`) or disabled."""
        if self.disabled_at is not None:
            return "disabled"
        return "failing" if self.failing_since is not None else "active"


EndpointKey = tuple[int, str, str]  # (user_id, channel, target)


async def load_endpoints(conn: AsyncConnection, keys: Iterable[EndpointKey]) -> dict[EndpointKey, Endpoint]:
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    e = notification_endpoints
    cols = [e.c[name] for name in Endpoint.__struct_fields__]
    out: dict[EndpointKey, Endpoint] = {}
    for chunk in chunks(wanted, 300):
        rows = await conn.execute(select(*cols).where(
            tuple_(e.c.user_id, e.c.channel, e.c.target).in_(chunk)))
        for r in rows:
            endpoint = msgspec.convert(row_dict(r), Endpoint)
            out[(endpoint.user_id, endpoint.channel, endpoint.target)] = endpoint
    return out


async def ensure_endpoints(
    conn: AsyncConnection, keys: Iterable[EndpointKey], *, now: float,
    new_secret: Any,
) -> dict[EndpointKey, Endpoint]:
    """The endpoints of `keys`, creating missing ones (webhooks get a secret from
    `new_secret()`): rules written through the API create theirs, rows queued otherwise
    (older rules, tools) still get a signing secret, which the owner can rotate to see."""
    keys = set(keys)
    found = await load_endpoints(conn, keys)
    missing = [k for k in keys if k not in found]
    if missing:
        e = notification_endpoints
        stmt = dialect_insert(conn, e).on_conflict_do_nothing(
            index_elements=["user_id", "channel", "target"])
        await conn.execute(stmt, [
            {"user_id": u, "channel": c, "target": t, "created_at": now, "updated_at": now,
             "secrets": [{"secret": new_secret(), "expires_at": None}] if c == "webhook" else []}
            for u, c, t in missing])
        found.update(await load_endpoints(conn, missing))
    return found


async def mark_endpoints(
    conn: AsyncConnection, *, ok: Iterable[int], failed: Mapping[int, str], now: float
) -> None:
    """Start or stop the failure clock of endpoints: a success stops it, a failure starts it
    (keeping the start of a run of failures)."""
    e = notification_endpoints
    ok_ids = sorted(set(ok) - set(failed))
    if ok_ids:
        await conn.execute(update(e).where(e.c.id.in_(ok_ids), e.c.failing_since.is_not(None))
                           .values(failing_since=None, last_error=None, updated_at=now))
    if failed:
        await conn.execute(
            update(e).where(e.c.id == bindparam("b_id")).values(
                failing_since=func.coalesce(e.c.failing_since, now),
                last_error=bindparam("b_error"), updated_at=now),
            [{"b_id": i, "b_error": err} for i, err in sorted(failed.items())])


async def disable_endpoints(
    conn: AsyncConnection, ids: Iterable[int], *, failing_before: float, reason: str, now: float
) -> list[Endpoint]:
    """Disable those of the endpoints `ids` failing since `failing_before` or earlier; return
    the ones this call disabled."""
    e = notification_endpoints
    candidates = sorted(set(ids))
    if not candidates:
        return []
    cols = [e.c[name] for name in Endpoint.__struct_fields__]
    rows = await conn.execute(
        update(e).where(e.c.id.in_(candidates), e.c.disabled_at.is_(None),
                        e.c.failing_since <= failing_before)
        .values(disabled_at=now, updated_at=now,
                disabled_reason=reason)
        .returning(*cols))
    return [msgspec.convert(row_dict(r), Endpoint) for r in rows]


async def record_disabled(
    conn: AsyncConnection, endpoint: Endpoint, *, rule_name: str | None,
    event: Mapping[str, Any], now: float,
) -> None:
    """The owner's history entry for a disabled endpoint (listed with their alerts; about an
    endpoint, not one rule: `rule_name` only says which rule's delivery found it dead)."""
    await conn.execute(insert(alert_history), [{
        "rule_id": None, "user_id": endpoint.user_id,
        "rule_name": rule_name or "delivery", "severity": "warning",
        "instance": f"endpoint:{endpoint.id}", "metric": "delivery", "subject": endpoint.channel,
        "chain": "", "state": "disabled", "reason": "endpoint_failing",
        "event": dict(event), "fired_at": now,
        "dedup_key": f"endpoint_disabled:{endpoint.id}:{int(now)}", "updated_at": now,
    }])


class Device(msgspec.Struct):
    """A user_devices row (`auth` is the subscription's secret: never shown)."""

    id: int
    user_id: int
    device: str
    endpoint: str
    p256dh: str
    auth: str
    user_agent: str | None
    created_at: float
    updated_at: float
    disabled_at: float | None
    disabled_reason: str | None


async def load_devices(conn: AsyncConnection, user_ids: Iterable[int]) -> dict[int, list[Device]]:
    """Every device (enabled or not) of the users, by user."""
    wanted = sorted(set(user_ids))
    out: dict[int, list[Device]] = {u: [] for u in wanted}
    d = user_devices
    cols = [d.c[name] for name in Device.__struct_fields__]
    for chunk in chunks(wanted, 500):
        for r in await conn.execute(select(*cols).where(d.c.user_id.in_(chunk)).order_by(d.c.id)):
            device = msgspec.convert(row_dict(r), Device)
            out[device.user_id].append(device)
    return out


async def disable_device(conn: AsyncConnection, user_id: int, device: str, reason: str,
                         now: float) -> None:
    d = user_devices
    await conn.execute(update(d).where(d.c.user_id == user_id, d.c.device == device,
                                       d.c.disabled_at.is_(None))
                       .values(disabled_at=now, disabled_reason=reason, updated_at=now))


class Preferences(msgspec.Struct):
    """A user's delivery preferences; the defaults are what a user without a row gets."""

    user_id: int
    timezone: str = "UTC"
    quiet_start: str | None = None
    quiet_end: str | None = None
    quiet_allow_critical: bool = True
    max_per_minute: dict[str, int] = msgspec.field(default_factory=dict)
    updated_at: float | None = None


async def load_preferences(conn: AsyncConnection, user_ids: Iterable[int]) -> dict[int, Preferences]:
    """The users' stored preferences (users without a row are absent: defaults apply)."""
    wanted = sorted(set(user_ids))
    p = notification_preferences
    cols = [p.c[name] for name in Preferences.__struct_fields__]
    out: dict[int, Preferences] = {}
    for chunk in chunks(wanted, 500):
        for r in await conn.execute(select(*cols).where(p.c.user_id.in_(chunk))):
            prefs = msgspec.convert(row_dict(r), Preferences)
            out[prefs.user_id] = prefs
    return out


async def recent_dispatches(
    conn: AsyncConnection, limits: Mapping[tuple[int, str], int], *, since: float
) -> dict[tuple[int, str], list[float]]:
    """Per (user, channel) with a per-minute `limit`, its newest first dispatches since
    `since`, at most `limit` of them, oldest first: the limit is spent when there are `limit`,
    and the window has room again `WINDOW` after the oldest of them. On PostgreSQL the pairs
    are locked for the transaction first, so two notifiers cannot both spend the last unit."""
    wanted = sorted(k for k, limit in limits.items() if limit > 0)
    out: dict[tuple[int, str], list[float]] = {k: [] for k in wanted}
    if not wanted:
        return out
    if on_postgres(conn):
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
                 "FROM unnest(CAST(:keys AS text[])) AS k ORDER BY k"),
            {"keys": [f"notify:{u}:{c}" for u, c in wanted]})
    t = notification_logs
    newest = func.row_number().over(partition_by=(t.c.user_id, t.c.channel),
                                    order_by=t.c.dispatched_at.desc()).label("n")
    cap = max(limits[k] for k in wanted)
    for chunk in chunks(wanted, 300):
        ranked = (select(t.c.user_id, t.c.channel, t.c.dispatched_at, newest)
                  .where(tuple_(t.c.user_id, t.c.channel).in_(chunk), t.c.dispatched_at >= since)
                  .subquery())
        rows = await conn.execute(select(ranked).where(ranked.c.n <= cap)
                                  .order_by(ranked.c.dispatched_at))
        for r in rows:
            key = (int(r.user_id), str(r.channel))
            if r.n <= limits[key]:
                out[key].append(float(r.dispatched_at))
    return out

