"""Delivery targets in the database: endpoints (webhook, chat, email), devices, preferences.

Repositories only: SQL in, rows out, on the caller's connection (its transaction). Ownership is
part of every lookup a caller's id reaches: another user's row reads as absent.

Webhook secrets (`notification_endpoints.secrets`) are `[{"secret": "whsec_...", "expires_at":
null | epoch s}]`, current first; the notifier signs with every unexpired one (Standard
Webhooks allows several signatures), so a rotation keeps the previous secret valid for a grace
period. Expired entries are dropped whenever the list is read or written here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from defiwatch.notify.senders.webhook import generate_webhook_secret, rotate_webhook_secrets
from defiwatch.store import delivery
from defiwatch.store.db import dialect_insert, on_postgres, row_dict
from defiwatch.store.delivery import Device, Endpoint, Preferences
from defiwatch.store.schema import (
    notification_endpoints,
    notification_logs,
    notification_preferences,
    user_devices,
)

__all__ = [
    "DISABLED_ERROR_PREFIX",
    "ENDPOINT_CHANNELS",
    "Device",
    "Endpoint",
    "Preferences",
    "SecretInfo",
    "count_devices",
    "delete_device",
    "enable_endpoint",
    "ensure_rule_endpoints",
    "get_device",
    "get_endpoint",
    "get_preferences",
    "list_devices",
    "list_endpoints",
    "live_secrets",
    "put_preferences",
    "rotate_endpoint_secret",
    "secret_infos",
    "upsert_device",
]

ENDPOINT_CHANNELS = ("webhook", "chat", "email")  # the channels with a notification_endpoints row
DISABLED_ERROR_PREFIX = "endpoint disabled"  # last_error of notifications dropped while disabled




# --- endpoints ---------------------------------------------------------------------------------


class SecretInfo(msgspec.Struct, frozen=True):
    """What may be shown of a webhook secret: a fingerprint (first 8 hex digits of its
    SHA-256, to tell secrets apart) and when it stops signing (None: current)."""

    fingerprint: str
    expires_at: float | None


def secret_infos(endpoint: Endpoint, now: float) -> list[SecretInfo]:
    """What may be shown of the endpoint's live secrets."""
    return [SecretInfo(hashlib.sha256(s["secret"].encode()).hexdigest()[:8], s.get("expires_at"))
            for s in live_secrets(endpoint.secrets, now)]


def live_secrets(secrets: Sequence[Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
    """The secrets still signing at `now`, current first (expired ones dropped)."""
    return [dict(s) for s in secrets
            if s.get("expires_at") is None or float(s["expires_at"]) > now]


def _endpoint(row: Any) -> Endpoint:
    return msgspec.convert(row_dict(row), Endpoint)


async def ensure_rule_endpoints(
    conn: AsyncConnection, user_id: int, targets: Iterable[tuple[str, str]], now: float
) -> dict[str, str]:
    """Make sure each (channel, target) of a rule has its endpoint row (channels other than
    webhook, chat and email have none); existing rows and their secrets are kept.

    Returns:
        target URL -> `whsec_` secret of each webhook endpoint created now (to be shown to its
        owner once).
    """
    keys = {(user_id, c, t) for c, t in targets if c in ENDPOINT_CHANNELS}
    if not keys:
        return {}
    existing = await delivery.load_endpoints(conn, keys)
    found = await delivery.ensure_endpoints(conn, keys, now=now,
                                            new_secret=generate_webhook_secret)
    return {t: found[(u, c, t)].secrets[0]["secret"] for u, c, t in sorted(keys - set(existing))
            if c == "webhook" and (u, c, t) in found and found[(u, c, t)].secrets}


async def list_endpoints(conn: AsyncConnection, user_id: int) -> list[Endpoint]:
    rows = await conn.execute(select(notification_endpoints)
                              .where(notification_endpoints.c.user_id == user_id)
                              .order_by(notification_endpoints.c.id))
    return [_endpoint(r) for r in rows]


async def get_endpoint(
    conn: AsyncConnection, user_id: int, endpoint_id: int, *, lock: bool = False
) -> Endpoint | None:
    """The user's endpoint, or None (also for another user's)."""
    stmt: Select[Any] = select(notification_endpoints).where(
        notification_endpoints.c.id == endpoint_id, notification_endpoints.c.user_id == user_id)
    if lock and on_postgres(conn):
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    return None if row is None else _endpoint(row)


async def rotate_endpoint_secret(
    conn: AsyncConnection, endpoint: Endpoint, *, now: float, grace_s: float
) -> str:
    """Give a webhook endpoint a new current secret; the previous current one keeps signing
    until `now + grace_s` (older ones in their grace period are dropped: one rotation at a
    time). Call with the row locked (`get_endpoint(lock=True)`).

    Returns:
        The new secret, to be shown once.
    """
    live = live_secrets(endpoint.secrets, now)
    new, keep = rotate_webhook_secrets([s["secret"] for s in live], keep=1)
    stored: list[dict[str, Any]] = [{"secret": new, "expires_at": None}]
    stored += [{"secret": s, "expires_at": now + grace_s} for s in keep[1:]]
    await conn.execute(update(notification_endpoints)
                       .where(notification_endpoints.c.id == endpoint.id)
                       .values(secrets=live_secrets(stored, now), updated_at=now))
    return new


async def enable_endpoint(
    conn: AsyncConnection, endpoint: Endpoint, *, now: float, redeliver: bool
) -> int:
    """Re-enable an endpoint (clears disabled_at, disabled_reason and failing_since); with
    `redeliver`, requeue its notifications that went dead because it was disabled.

    Returns:
        How many notifications were requeued (the notifier is woken on PostgreSQL).
    """
    await conn.execute(update(notification_endpoints)
                       .where(notification_endpoints.c.id == endpoint.id)
                       .values(disabled_at=None, disabled_reason=None, failing_since=None,
                               updated_at=now))
    if not redeliver:
        return 0
    n = notification_logs.c
    result = await conn.execute(
        update(notification_logs)
        .where(n.user_id == endpoint.user_id, n.channel == endpoint.channel,
               n.target == endpoint.target, n.status == "dead",
               n.last_error.startswith(DISABLED_ERROR_PREFIX, autoescape=True))
        .values(status="pending", next_attempt_at=now, retry_from=n.attempt, last_error=None,
                claimed_by=None, lease_until=None, updated_at=now))
    count = int(result.rowcount or 0)
    if count:
        await delivery.wake_notifiers(conn)
    return count


# --- devices -------------------------------------------------------------------------------------


def _device(row: Any) -> Device:
    return msgspec.convert(row_dict(row), Device)


async def count_devices(conn: AsyncConnection, user_id: int) -> int:
    return int((await conn.execute(select(func.count()).select_from(user_devices)
                                   .where(user_devices.c.user_id == user_id))).scalar_one())


async def get_device(conn: AsyncConnection, user_id: int, device: str) -> Device | None:
    row = (await conn.execute(select(user_devices).where(
        user_devices.c.user_id == user_id, user_devices.c.device == device))).first()
    return None if row is None else _device(row)


async def upsert_device(
    conn: AsyncConnection, user_id: int, device: str, *, endpoint: str, p256dh: str, auth: str,
    user_agent: str | None, now: float,
) -> Device:
    """Save a push subscription under `device`; an existing device of that name gets the new
    subscription and is enabled again."""
    stmt = dialect_insert(conn, user_devices).values(
        user_id=user_id, device=device, endpoint=endpoint, p256dh=p256dh, auth=auth,
        user_agent=user_agent, created_at=now, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=["user_id", "device"],
        set_={"endpoint": endpoint, "p256dh": p256dh, "auth": auth, "user_agent": user_agent,
              "updated_at": now, "disabled_at": None, "disabled_reason": None})
    await conn.execute(stmt)
    saved = await get_device(conn, user_id, device)
    assert saved is not None
    return saved


async def list_devices(conn: AsyncConnection, user_id: int) -> list[Device]:
    rows = await conn.execute(select(user_devices).where(user_devices.c.user_id == user_id)
                              .order_by(user_devices.c.id))
    return [_device(r) for r in rows]


async def delete_device(conn: AsyncConnection, user_id: int, device: str) -> bool:
    """Forget a device; False if the user has none of that name."""
    result = await conn.execute(delete(user_devices).where(
        user_devices.c.user_id == user_id, user_devices.c.device == device))
    return bool(result.rowcount)


# --- preferences ---------------------------------------------------------------------------------


async def get_preferences(conn: AsyncConnection, user_id: int) -> Preferences:
    """The user's preferences, or the defaults if they never set any."""
    stored = await delivery.load_preferences(conn, [user_id])
    return stored.get(user_id) or Preferences(user_id)


async def put_preferences(conn: AsyncConnection, prefs: Preferences, now: float) -> Preferences:
    """Replace the user's preferences (validated by the caller)."""
    values = {"timezone": prefs.timezone, "quiet_start": prefs.quiet_start,
              "quiet_end": prefs.quiet_end, "quiet_allow_critical": prefs.quiet_allow_critical,
              "max_per_minute": prefs.max_per_minute, "updated_at": now}
    stmt = dialect_insert(conn, notification_preferences).values(user_id=prefs.user_id, **values)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["user_id"], set_=values))
    return msgspec.structs.replace(prefs, updated_at=now)
