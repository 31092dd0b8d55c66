"""Alerts in the database: rules, instance states, series cursors and the consumer group's
position, history and the outboxes.

Repositories only: SQL in, rows out. Decisions are made by alerts/ (pure core) and applied by the
engine and the API, each in its own transaction (the caller's connection). The concurrency story
(who locks what, in which order) is in alerts/engine.py and docs/alerts.md.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import Integer, and_, bindparam, case, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from defiwatch.store.db import chunks, dialect_insert, on_postgres, row_dict
from defiwatch.store.schema import (
    alert_history,
    alert_rule_revision,
    alert_rules,
    alert_series,
    alert_states,
    alert_stream_outbox,
    stream_group_positions,
)

__all__ = [
    "AlertRow",
    "Cursor",
    "StateRow",
    "StoredRule",
    "alert_ids",
    "bump_revision",
    "close_rule_alerts",
    "count_rules",
    "current_revision",
    "delete_stream_events",
    "enqueue_stream_events",
    "get_alert",
    "get_rule",
    "get_rule_any",
    "get_state",
    "insert_alerts",
    "insert_rule",
    "list_alerts",
    "list_rules",
    "load_cursors",
    "load_due_states",
    "load_group_position",
    "load_states",
    "lock_series",
    "pending_stream_events",
    "reset_states",
    "resolve_alerts",
    "rules_changed_since",
    "save_cursors",
    "save_group_position",
    "save_states",
    "soft_delete_rule",
    "update_alert",
    "update_rule",
]

# pg_advisory_xact_lock(int4, int4): this constant namespaces the alert engine's series locks.
_LOCK_NAMESPACE = 0x616C7274  # "alrt"


# --- rules -----------------------------------------------------------------------------------


class StoredRule(msgspec.Struct):
    """An alert_rules row."""

    id: int
    user_id: int
    name: str
    description: str | None
    condition: dict[str, Any]
    channels: list[dict[str, Any]]
    for_seconds: float
    throttle_minutes: float
    repeat_minutes: float | None
    notify_on_resolve: bool
    severity: str
    paused: bool
    kind: str
    revision: int
    created_at: float
    updated_at: float
    deleted_at: float | None = None


def _rule(row: Any) -> StoredRule:
    m = row._mapping
    return StoredRule(
        id=m["id"], user_id=m["user_id"], name=m["name"], description=m["description"],
        condition=m["condition"], channels=m["channels"], for_seconds=m["for_seconds"],
        throttle_minutes=m["throttle_minutes"], repeat_minutes=m["repeat_minutes"],
        notify_on_resolve=bool(m["notify_on_resolve"]), severity=m["severity"],
        paused=bool(m["paused"]), kind=m["kind"], revision=m["revision"],
        created_at=m["created_at"], updated_at=m["updated_at"], deleted_at=m["deleted_at"],
    )


async def bump_revision(conn: AsyncConnection) -> int:
    """Take the next rule revision. The row lock (held to commit) serialises rule writers, so
    revisions become visible in order and a tier limit check after it cannot be raced."""
    result = await conn.execute(
        update(alert_rule_revision).where(alert_rule_revision.c.id == 1)
        .values(revision=alert_rule_revision.c.revision + 1)
        .returning(alert_rule_revision.c.revision)
    )
    return int(result.scalar_one())


async def current_revision(conn: AsyncConnection) -> int:
    result = await conn.execute(
        select(alert_rule_revision.c.revision).where(alert_rule_revision.c.id == 1))
    return int(result.scalar_one_or_none() or 0)


async def count_rules(conn: AsyncConnection, user_id: int) -> int:
    result = await conn.execute(
        select(func.count()).select_from(alert_rules)
        .where(alert_rules.c.user_id == user_id, alert_rules.c.deleted_at.is_(None)))
    return int(result.scalar_one())


async def insert_rule(conn: AsyncConnection, values: Mapping[str, Any]) -> int:
    result = await conn.execute(alert_rules.insert().values(**values).returning(alert_rules.c.id))
    return int(result.scalar_one())


async def get_rule(conn: AsyncConnection, user_id: int, rule_id: int) -> StoredRule | None:
    """The user's rule, or None (also for another user's rule: callers answer 404 alike)."""
    row = (await conn.execute(
        select(alert_rules).where(alert_rules.c.id == rule_id, alert_rules.c.user_id == user_id,
                                  alert_rules.c.deleted_at.is_(None))
    )).first()
    return None if row is None else _rule(row)


async def get_rule_any(conn: AsyncConnection, rule_id: int) -> StoredRule | None:
    """A rule by id whoever owns it, deleted or not (internal use, never for a caller's id)."""
    row = (await conn.execute(select(alert_rules).where(alert_rules.c.id == rule_id))).first()
    return None if row is None else _rule(row)


async def list_rules(
    conn: AsyncConnection,
    user_id: int,
    *,
    paused: bool | None = None,
    severity: str | None = None,
    metric: str | None = None,
    subject: str | None = None,
    name: str | None = None,
    limit: int = 50,
    after: int = 0,
) -> tuple[list[StoredRule], int]:
    """A page of the user's rules by id (> `after`) and the total matching the filters."""
    cond = [alert_rules.c.user_id == user_id, alert_rules.c.deleted_at.is_(None)]
    if paused is not None:
        cond.append(alert_rules.c.paused == paused)
    if severity is not None:
        cond.append(alert_rules.c.severity == severity)
    if metric is not None:
        cond.append(alert_rules.c.watch.contains(f" {metric}|", autoescape=True))
    if subject is not None:
        cond.append(alert_rules.c.watch.contains(f"|{subject}|", autoescape=True))
    if name is not None:
        cond.append(func.lower(alert_rules.c.name).contains(name.lower(), autoescape=True))
    total = int((await conn.execute(
        select(func.count()).select_from(alert_rules).where(*cond))).scalar_one())
    rows = (await conn.execute(
        select(alert_rules).where(*cond, alert_rules.c.id > after)
        .order_by(alert_rules.c.id).limit(limit)
    )).all()
    return [_rule(r) for r in rows], total


async def update_rule(conn: AsyncConnection, rule_id: int, values: Mapping[str, Any]) -> None:
    await conn.execute(update(alert_rules).where(alert_rules.c.id == rule_id).values(**values))


async def soft_delete_rule(conn: AsyncConnection, rule_id: int, *, revision: int, now: float) -> None:
    """Mark deleted (the engine follows revisions and drops it) and forget its instances."""
    await conn.execute(
        update(alert_rules).where(alert_rules.c.id == rule_id)
        .values(deleted_at=now, updated_at=now, revision=revision))
    await conn.execute(delete(alert_states).where(alert_states.c.rule_id == rule_id))


async def close_rule_alerts(conn: AsyncConnection, rule_id: int, *, reason: str, now: float) -> int:
    """Resolve the rule's open alerts without notification (its condition changed or it was
    deleted: the engine will not evaluate the old condition again). Returns how many."""
    result = await conn.execute(
        update(alert_history)
        .where(alert_history.c.rule_id == rule_id, alert_history.c.state == "firing")
        .values(state="resolved", resolved_at=now, resolve_reason=reason, updated_at=now))
    return int(result.rowcount or 0)


async def reset_states(conn: AsyncConnection, rule_id: int, *, multi: bool, now: float) -> None:
    """Forget the rule's instances; a rule on several series gets its one row back (ok), which
    the engine locks to serialise workers that evaluate it from different series."""
    await conn.execute(delete(alert_states).where(alert_states.c.rule_id == rule_id))
    if multi:
        await conn.execute(alert_states.insert().values(
            rule_id=rule_id, instance="", series="", phase="ok", state={}, due_at=None,
            updated_at=now))


async def rules_changed_since(
    conn: AsyncConnection, revision: int, *, limit: int | None = None
) -> list[StoredRule]:
    """Rules (deleted ones too) changed after `revision`, oldest change first."""
    stmt = select(alert_rules).where(alert_rules.c.revision > revision).order_by(
        alert_rules.c.revision, alert_rules.c.id)
    if revision <= 0:
        # A full load: the deleted rules are of no interest.
        stmt = stmt.where(alert_rules.c.deleted_at.is_(None))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [_rule(r) for r in (await conn.execute(stmt)).all()]


# --- instance states and series cursors --------------------------------------------------------


class StateRow(NamedTuple):
    """An alert_states row; `state` is the lifecycle state as JSON (alerts/lifecycle.py
    InstanceState, converted by the caller: the store does not know the lifecycle)."""

    rule_id: int
    instance: str
    series: str
    state: dict[str, Any]


def _state_row(row: Any) -> StateRow:
    return StateRow(row.rule_id, row.instance, row.series, row.state)


def _lock_key(series: str) -> int:
    """A 32-bit signed key for pg_advisory_xact_lock: collisions only serialise a little more."""
    key = zlib.crc32(series.encode())
    return key - (1 << 32) if key >= 1 << 31 else key


async def lock_series(conn: AsyncConnection, series: Iterable[str]) -> None:
    """Take the engine's transaction-scoped lock on each series (PostgreSQL; a no-op on SQLite,
    whose BEGIN IMMEDIATE already serialises writers).

    Keys are locked in ascending order, one statement, so two workers locking overlapping sets
    cannot deadlock on them.
    """
    if not on_postgres(conn):
        return
    keys = sorted({_lock_key(s) for s in series})
    if not keys:
        return
    stmt = text(
        "SELECT count(pg_advisory_xact_lock(:ns, k)) FROM unnest(:keys) AS k"
    ).bindparams(bindparam("keys", type_=postgresql.ARRAY(Integer)))
    await conn.execute(stmt, {"ns": _LOCK_NAMESPACE, "keys": keys})


class Cursor(NamedTuple):
    """What the engine last applied of a series: observation ts and measures (window s ->
    value; 0 is the value itself)."""

    ts: int
    measures: dict[int, float | None] | None


async def load_cursors(conn: AsyncConnection, series: Sequence[str]) -> dict[str, Cursor]:
    out: dict[str, Cursor] = {}
    for chunk in chunks(series):
        rows = await conn.execute(
            select(alert_series.c.series, alert_series.c.last_ts, alert_series.c.measures)
            .where(alert_series.c.series.in_(chunk)))
        for r in rows:
            measures = ({int(k): v for k, v in r.measures.items()}
                        if isinstance(r.measures, dict) else None)
            out[r.series] = Cursor(int(r.last_ts), measures)
    return out


async def save_cursors(conn: AsyncConnection, cursors: Mapping[str, Cursor], now: float) -> None:
    """Upsert cursors. Callers hold the series locks and only move cursors forward."""
    if not cursors:
        return
    stmt = dialect_insert(conn, alert_series)
    stmt = stmt.on_conflict_do_update(
        index_elements=["series"],
        set_={"last_ts": stmt.excluded.last_ts, "measures": stmt.excluded.measures,
              "updated_at": stmt.excluded.updated_at},
    )
    await conn.execute(stmt, [
        {"series": k, "last_ts": c.ts, "updated_at": now,
         "measures": None if c.measures is None else {str(w): v for w, v in c.measures.items()}}
        for k, c in cursors.items()])


async def load_group_position(conn: AsyncConnection, group: str) -> tuple[str, int] | None:
    """(stream epoch, offset) the group's workers last committed, or None if they never did."""
    row = (await conn.execute(
        select(stream_group_positions.c.epoch, stream_group_positions.c.last_offset)
        .where(stream_group_positions.c.group_name == group))).first()
    return None if row is None else (str(row.epoch), int(row.last_offset))


async def save_group_position(
    conn: AsyncConnection, group: str, epoch: str, offset: int, now: float
) -> None:
    """Record that the group's entries up to `offset` of stream life `epoch` are applied.

    Within one epoch the position only moves forward (workers of the group commit batches out
    of order); a new epoch replaces it. A worker still finishing a batch of the old epoch may
    put the old one back: the next recreated group then starts at 0 of the new stream, which
    only re-delivers (the engine skips what its series cursors say is applied).
    """
    t = stream_group_positions
    stmt = dialect_insert(conn, t).values(group_name=group, epoch=epoch, last_offset=offset,
                                          updated_at=now)
    new = stmt.excluded
    stmt = stmt.on_conflict_do_update(index_elements=["group_name"], set_={
        "epoch": new.epoch,
        "last_offset": case((and_(t.c.epoch == new.epoch, t.c.last_offset > new.last_offset),
                             t.c.last_offset), else_=new.last_offset),
        "updated_at": new.updated_at,
    })
    await conn.execute(stmt)


async def load_states(
    conn: AsyncConnection, series: Sequence[str], multi_rule_ids: Sequence[int], *, lock: bool
) -> list[StateRow]:
    """The states events on `series` can touch: rows keyed by those series, and the rows of the
    rules on several series (`series` '') listed by id. With `lock` (PostgreSQL), FOR UPDATE in
    (rule_id, instance) order."""
    out: list[StateRow] = []
    wanted: list[Any] = []
    for chunk in chunks(series):
        wanted.append(alert_states.c.series.in_(chunk))
    for ids in chunks(sorted(set(multi_rule_ids))):
        wanted.append(and_(alert_states.c.series == "", alert_states.c.rule_id.in_(ids)))
    if not wanted:
        return out
    stmt: Select[Any] = select(alert_states).where(or_(*wanted)).order_by(
        alert_states.c.rule_id, alert_states.c.instance)
    if lock and on_postgres(conn):
        stmt = stmt.with_for_update()
    for row in await conn.execute(stmt):
        out.append(_state_row(row))
    return out


async def get_state(
    conn: AsyncConnection, rule_id: int, instance: str, *, lock: bool = False
) -> StateRow | None:
    stmt: Select[Any] = select(alert_states).where(
        alert_states.c.rule_id == rule_id, alert_states.c.instance == instance)
    if lock and on_postgres(conn):
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    return None if row is None else _state_row(row)


async def load_due_states(conn: AsyncConnection, now: float, limit: int) -> list[StateRow]:
    """States whose tick is due. On PostgreSQL FOR UPDATE SKIP LOCKED: two workers' ticks
    split the due rows instead of both acting on one."""
    stmt: Select[Any] = (
        select(alert_states).where(alert_states.c.due_at <= now)
        .order_by(alert_states.c.due_at).limit(limit)
    )
    if on_postgres(conn):
        stmt = stmt.with_for_update(skip_locked=True)
    return [_state_row(r) for r in await conn.execute(stmt)]


async def save_states(
    conn: AsyncConnection,
    rows: Sequence[tuple[int, str, str, str, dict[str, Any], float | None]],
    now: float,
) -> None:
    """Upsert (rule_id, instance, series, phase, state JSON, due_at) rows."""
    if not rows:
        return
    stmt = dialect_insert(conn, alert_states)
    stmt = stmt.on_conflict_do_update(
        index_elements=["rule_id", "instance"],
        set_={c: getattr(stmt.excluded, c) for c in ("series", "phase", "state", "due_at",
                                                       "updated_at")},
    )
    await conn.execute(stmt, [
        {"rule_id": rule_id, "instance": instance, "series": series, "phase": phase,
         "state": state, "due_at": due, "updated_at": now}
        for rule_id, instance, series, phase, state, due in rows
    ])


# --- history and outboxes ------------------------------------------------------------------------


async def insert_alerts(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Insert fired alerts; return dedup_key -> id of those inserted now. A row whose dedup key
    exists already (a transition replayed after a crash) is skipped and absent from the result."""
    if not rows:
        return {}
    stmt = (
        dialect_insert(conn, alert_history)
        .on_conflict_do_nothing(index_elements=["dedup_key"])
        .returning(alert_history.c.id, alert_history.c.dedup_key)
    )
    result = await conn.execute(stmt, list(rows))
    return {r.dedup_key: int(r.id) for r in result.all()}


async def alert_ids(conn: AsyncConnection, dedup_keys: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for chunk in chunks(dedup_keys):
        rows = await conn.execute(select(alert_history.c.id, alert_history.c.dedup_key)
                                  .where(alert_history.c.dedup_key.in_(chunk)))
        out.update({r.dedup_key: int(r.id) for r in rows})
    return out


async def resolve_alerts(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Mark firing alerts resolved (`id`, `resolved_at`, `resolve_reason`, `resolved_event`);
    return the ids that were still firing (a replayed resolve changes nothing)."""
    done: list[int] = []
    for row in rows:
        result = await conn.execute(
            update(alert_history)
            .where(alert_history.c.id == row["id"], alert_history.c.state == "firing")
            .values(state="resolved", resolved_at=row["resolved_at"],
                    resolve_reason=row["resolve_reason"], resolved_event=row.get("resolved_event"),
                    updated_at=row["resolved_at"])
        )
        if result.rowcount:
            done.append(int(row["id"]))
    return done


async def enqueue_stream_events(
    conn: AsyncConnection, payloads: Sequence[dict[str, Any]], now: float
) -> list[int]:
    if not payloads:
        return []
    result = await conn.execute(
        alert_stream_outbox.insert().returning(alert_stream_outbox.c.id),
        [{"payload": p, "created_at": now} for p in payloads],
    )
    return [int(r[0]) for r in result.all()]


async def pending_stream_events(
    conn: AsyncConnection, *, older_than: float, limit: int
) -> list[tuple[int, dict[str, Any]]]:
    rows = await conn.execute(
        select(alert_stream_outbox.c.id, alert_stream_outbox.c.payload)
        .where(alert_stream_outbox.c.created_at <= older_than)
        .order_by(alert_stream_outbox.c.id).limit(limit))
    return [(int(r.id), r.payload) for r in rows]


async def delete_stream_events(conn: AsyncConnection, ids: Sequence[int]) -> None:
    for chunk in chunks(ids):
        await conn.execute(delete(alert_stream_outbox).where(alert_stream_outbox.c.id.in_(chunk)))


# --- history for the API ---------------------------------------------------------------------


class AlertRow(msgspec.Struct):
    """An alert_history row as the API shows it."""

    id: int
    rule_id: int | None
    rule_name: str
    severity: str
    instance: str
    metric: str
    subject: str
    chain: str
    state: str
    reason: str
    suppressed: str | None
    value: float | None
    event: dict[str, Any] | None
    fired_at: float
    resolved_at: float | None
    resolve_reason: str | None
    resolved_event: dict[str, Any] | None
    acked_at: float | None
    acked_by: str | None
    snoozed_until: float | None
    dedup_key: str


_ALERT_COLUMNS = [c for c in alert_history.c if c.name not in ("user_id", "updated_at")]




def _alert(row: Any) -> AlertRow:
    return msgspec.convert(row_dict(row), AlertRow)


async def list_alerts(
    conn: AsyncConnection,
    user_id: int,
    *,
    rule_id: int | None = None,
    state: str | None = None,
    subject: str | None = None,
    since: float | None = None,
    until: float | None = None,
    acknowledged: bool | None = None,
    limit: int = 50,
    before: int | None = None,
) -> tuple[list[AlertRow], int]:
    """The user's alerts, newest first (id < `before`), and the total matching the filters."""
    cond = [alert_history.c.user_id == user_id]
    if rule_id is not None:
        cond.append(alert_history.c.rule_id == rule_id)
    if state is not None:
        cond.append(alert_history.c.state == state)
    if subject is not None:
        cond.append(alert_history.c.subject == subject)
    if since is not None:
        cond.append(alert_history.c.fired_at >= since)
    if until is not None:
        cond.append(alert_history.c.fired_at < until)
    if acknowledged is not None:
        cond.append(alert_history.c.acked_at.isnot(None) if acknowledged
                    else alert_history.c.acked_at.is_(None))
    total = int((await conn.execute(
        select(func.count()).select_from(alert_history).where(*cond))).scalar_one())
    page = select(*_ALERT_COLUMNS).where(*cond)
    if before is not None:
        page = page.where(alert_history.c.id < before)
    rows = (await conn.execute(page.order_by(alert_history.c.id.desc()).limit(limit))).all()
    return [_alert(r) for r in rows], total


async def get_alert(
    conn: AsyncConnection, user_id: int, alert_id: int, *, lock: bool = False
) -> AlertRow | None:
    stmt: Select[Any] = select(*_ALERT_COLUMNS).where(
        alert_history.c.id == alert_id, alert_history.c.user_id == user_id)
    if lock and on_postgres(conn):
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    return None if row is None else _alert(row)


async def update_alert(conn: AsyncConnection, alert_id: int, values: Mapping[str, Any]) -> None:
    await conn.execute(update(alert_history).where(alert_history.c.id == alert_id).values(**values))

