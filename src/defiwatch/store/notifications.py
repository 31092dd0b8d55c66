"""The notification log (outbox) as users see it: listing with attempts, redelivery, test sends.

Repositories only, on the caller's connection. Every lookup by a caller's id also filters by
their user id. Whoever makes rows due (insert, requeue) wakes the notifier with
`delivery.wake_notifiers` in the same transaction: on PostgreSQL `NOTIFY defiwatch_notify` is delivered
at commit, so the notifier never looks before the rows are visible (elsewhere it polls).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from defiwatch.store.db import on_postgres, row_dict
from defiwatch.store.delivery import wake_notifiers
from defiwatch.store.schema import alert_rules, notification_attempts, notification_logs

__all__ = [
    "REDELIVERABLE",
    "AttemptRow",
    "NotificationRow",
    "get_notification",
    "last_test_at",
    "list_notifications",
    "queue_notifications",
    "redeliver_notification",
]

REDELIVERABLE = ("delivered", "dead")  # final statuses a user may send again


class AttemptRow(msgspec.Struct):
    """One delivery attempt (notification_attempts)."""

    attempt: int
    status: str
    response_code: int | None
    error: str | None
    latency_ms: float | None
    started_at: float
    finished_at: float | None


class NotificationRow(msgspec.Struct):
    """A notification_logs row as the API shows it (without config and payload, which
    `get_notification` adds), with its attempts, oldest first."""

    id: int
    alert_id: int | None
    rule_id: int | None
    kind: str
    seq: int
    channel: str
    target: str
    status: str
    attempt: int
    retry_from: int
    next_attempt_at: float
    last_error: str | None
    response_code: int | None
    parent_id: int | None
    created_at: float
    updated_at: float
    sent_at: float | None
    attempts: list[AttemptRow] = msgspec.field(default_factory=list)
    payload: dict[str, Any] | None = None


_COLUMNS = [notification_logs.c[name] for name in NotificationRow.__struct_fields__
            if name not in ("attempts", "payload")]
_ATTEMPT_COLUMNS = [notification_attempts.c[name] for name in AttemptRow.__struct_fields__]




async def _with_attempts(conn: AsyncConnection, rows: list[NotificationRow]) -> None:
    """Fill in the attempts of `rows` with one query."""
    if not rows:
        return
    by_id = {r.id: r for r in rows}
    result = await conn.execute(
        select(notification_attempts.c.notification_id, *_ATTEMPT_COLUMNS)
        .where(notification_attempts.c.notification_id.in_(list(by_id)))
        .order_by(notification_attempts.c.notification_id, notification_attempts.c.attempt))
    for r in result:
        values = row_dict(r)
        by_id[values.pop("notification_id")].attempts.append(
            msgspec.convert(values, AttemptRow))


async def list_notifications(
    conn: AsyncConnection,
    user_id: int,
    *,
    status: str | None = None,
    channel: str | None = None,
    kind: str | None = None,
    rule_id: int | None = None,
    alert_id: int | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 50,
    before: int | None = None,
) -> list[NotificationRow]:
    """The user's notifications newest first (id < `before`), created in [since, until),
    each with its attempts (one query for the page)."""
    n = notification_logs.c
    stmt = select(*_COLUMNS).where(n.user_id == user_id)
    for column, value in ((n.status, status), (n.channel, channel), (n.kind, kind),
                          (n.rule_id, rule_id), (n.alert_id, alert_id)):
        if value is not None:
            stmt = stmt.where(column == value)
    if since is not None:
        stmt = stmt.where(n.created_at >= since)
    if until is not None:
        stmt = stmt.where(n.created_at < until)
    if before is not None:
        stmt = stmt.where(n.id < before)
    rows = [msgspec.convert(row_dict(r), NotificationRow)
            for r in await conn.execute(stmt.order_by(n.id.desc()).limit(limit))]
    await _with_attempts(conn, rows)
    return rows


async def get_notification(
    conn: AsyncConnection, user_id: int, notification_id: int, *, lock: bool = False
) -> NotificationRow | None:
    """The user's notification with payload and attempts, or None (also for another
    user's)."""
    n = notification_logs.c
    stmt: Select[Any] = select(*_COLUMNS, n.payload).where(n.id == notification_id,
                                                          n.user_id == user_id)
    if lock and on_postgres(conn):
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    out = msgspec.convert(row_dict(row), NotificationRow)
    await _with_attempts(conn, [out])
    return out


async def redeliver_notification(conn: AsyncConnection, notification_id: int, now: float) -> bool:
    """Make a delivered or dead notification pending again, due now, with a fresh retry budget
    (`retry_from` = attempts so far) and wake the notifier.

    Returns:
        False when its status is not one of REDELIVERABLE (nothing changed): the check is in
        the UPDATE, so a notifier settling it meanwhile cannot be overwritten.
    """
    n = notification_logs.c
    result = await conn.execute(
        update(notification_logs)
        .where(n.id == notification_id, n.status.in_(REDELIVERABLE))
        .values(status="pending", next_attempt_at=now, retry_from=n.attempt, last_error=None,
                claimed_by=None, lease_until=None, updated_at=now))
    if not result.rowcount:
        return False
    await wake_notifiers(conn)
    return True


async def queue_notifications(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Insert notification rows (test sends: alert_id NULL, never conflicting) and wake the
    notifier. Returns their ids, in order."""
    if not rows:
        return []
    ids = []
    for row in rows:  # one by one: RETURNING of a multi-row insert has no order guarantee
        result = await conn.execute(notification_logs.insert().values(**row)
                                    .returning(notification_logs.c.id))
        ids.append(int(result.scalar_one()))
    await wake_notifiers(conn)
    return ids


async def last_test_at(
    conn: AsyncConnection, user_id: int, rule_id: int, *, lock: bool = False
) -> float | None:
    """When the newest test notification of the rule was queued (epoch s), or None. With
    `lock` (PostgreSQL), the rule's row is locked first, so that concurrent test sends of one
    rule serialise on it and the caller's rate check holds (SQLite serialises writers)."""
    if lock and on_postgres(conn):
        await conn.execute(select(alert_rules.c.id).where(alert_rules.c.id == rule_id)
                           .with_for_update())
    n = notification_logs.c
    result = await conn.execute(select(func.max(n.created_at)).where(
        n.user_id == user_id, n.rule_id == rule_id, n.kind == "test"))
    value = result.scalar_one_or_none()
    return None if value is None else float(value)
