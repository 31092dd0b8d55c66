"""What the notifier does with each claimed outbox row, decided without I/O.

For every due row, in this order:

1. a push to every device (`*`) is split into one row per enabled device;
2. a row for a disabled endpoint or device ends `dead` (kept, and redeliverable once enabled);
3. held rows of one (user, channel, target) that come due together are folded into one digest;
4. a first dispatch inside the user's quiet hours is held until they end (critical alerts may
   pass), and one over the user's per-minute limit for the channel is held until the window
   has room; tests bypass both, retries are never held again;
5. an open circuit for the receiving host postpones the row (not an attempt);
6. what is left is sent if this notifier has room, overall and for the host, and otherwise
   left for the next claim.

Nothing is dropped: a held row is sent later or in a digest, a dead row stays in the log.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from defiwatch.domain.events import Event
from defiwatch.notify.breaker import breaker_key
from defiwatch.notify.message import (
    ChatTarget,
    EmailTarget,
    Notification,
    NotificationKind,
    PushTarget,
    Target,
    WebhookTarget,
    alert_notification,
)
from defiwatch.notify.senders.chat import flavour_for
from defiwatch.store.delivery import Device, Endpoint, OutboxRow, Preferences
from defiwatch.store.endpoints import live_secrets

__all__ = [
    "BYPASS_KINDS",
    "WINDOW_S",
    "Plan",
    "PlanInput",
    "Send",
    "build_notification",
    "digest_payload",
    "per_minute",
    "plan",
    "quiet_until",
]

WINDOW_S = 60.0  # the per-minute limit's window
BYPASS_KINDS = frozenset({"test", "endpoint_disabled"})  # never held: someone is waiting for them


@dataclass(frozen=True, slots=True)
class Send:
    row: OutboxRow
    attempt: int  # the number of this attempt, 1-based
    target: Target
    endpoint_id: int | None = None  # its failure clock (webhook, chat, email)


@dataclass
class Plan:
    sends: list[Send] = field(default_factory=list)
    # Rows put back without an attempt: {"id", "status", "next_attempt_at", "last_error"}.
    releases: list[dict[str, Any]] = field(default_factory=list)
    expansions: list[tuple[OutboxRow, list[str]]] = field(default_factory=list)
    digests: list[list[OutboxRow]] = field(default_factory=list)
    deferred: int = 0  # left for a later claim: no room in this notifier


@dataclass(frozen=True)
class PlanInput:
    """What the claim transaction read, and this notifier's room."""

    now: float
    preferences: Mapping[int, Preferences]
    endpoints: Mapping[tuple[int, str, str], Endpoint]
    devices: Mapping[int, Sequence[Device]]
    dispatched: Mapping[tuple[int, str], Sequence[float]]  # recent first dispatches, oldest first
    default_per_minute: int
    free: int  # sends this notifier may still start
    host_free: Callable[[str], int]  # ... of which to this host
    admit: Callable[[str], float | None]  # the breaker: None = go, else when to try again


def plan(rows: Sequence[OutboxRow], given: PlanInput) -> Plan:
    out = Plan()
    now = given.now
    spent = {key: [t for t in times if t > now - WINDOW_S] for key, times in given.dispatched.items()}
    free = given.free
    taken: dict[str, int] = defaultdict(int)
    for row in _fold_held(rows, out):
        if row.channel == "push" and row.target == "*":
            _expand(row, given, out)
            continue
        target, dead = _target(row, given)
        endpoint = given.endpoints.get((row.user_id, row.channel, row.target))
        if target is None:
            out.releases.append(_release(row, "dead", now, dead))
            continue
        held = _held_until(row, given, spent)
        if held is not None:
            out.releases.append(_release(row, "held", held[0], held[1]))
            continue
        host = row.host or breaker_key(target)
        if free <= 0 or given.host_free(host) - taken[host] <= 0:
            out.deferred += 1
            continue
        retry_at = given.admit(host)
        if retry_at is not None:
            out.releases.append(_release(row, "pending", retry_at,
                                         f"circuit open for {host}: receiver failing"))
            continue
        if row.dispatched_at is None and row.kind not in BYPASS_KINDS:
            spent.setdefault((row.user_id, row.channel), []).append(now)
        free -= 1
        taken[host] += 1
        out.sends.append(Send(row, row.attempt + 1, target,
                              endpoint.id if endpoint is not None else None))
    return out


def _release(row: OutboxRow, status: str, at: float, why: str | None) -> dict[str, Any]:
    return {"id": row.id, "status": status, "next_attempt_at": at, "last_error": why}


def _fold_held(rows: Sequence[OutboxRow], out: Plan) -> list[OutboxRow]:
    """Rows to plan one by one; held rows due together for one target become a digest."""
    groups: dict[tuple[int, str, str], list[OutboxRow]] = defaultdict(list)
    single: list[OutboxRow] = []
    for row in rows:
        if row.status == "held":
            groups[(row.user_id, row.channel, row.target)].append(row)
        else:
            single.append(row)
    for group in groups.values():
        if len(group) > 1:
            out.digests.append(group)
        else:
            single.append(group[0])
    return single


def _expand(row: OutboxRow, given: PlanInput, out: Plan) -> None:
    devices = [d.device for d in given.devices.get(row.user_id, ()) if d.disabled_at is None]
    if devices:
        out.expansions.append((row, devices))
    else:
        out.releases.append(_release(row, "dead", given.now, "no push device registered "
                                     "(POST /v1/devices)"))


def _target(row: OutboxRow, given: PlanInput) -> tuple[Target | None, str]:
    """The row's target with its secrets or keys, or None and why it cannot be sent."""
    if row.channel == "push":
        device = next((d for d in given.devices.get(row.user_id, ()) if d.device == row.target),
                      None)
        if device is None:
            return None, f"push device {row.target!r} is not registered"
        if device.disabled_at is not None:
            return None, f"push device {row.target!r} is disabled"
        return PushTarget(endpoint=device.endpoint, p256dh=device.p256dh, auth=device.auth,
                          device_id=device.device), ""
    endpoint = given.endpoints.get((row.user_id, row.channel, row.target))
    if endpoint is not None and endpoint.disabled_at is not None:
        return None, "endpoint disabled: failing continuously (POST /v1/endpoints/{id}/enable)"
    if row.channel == "webhook":
        secrets = tuple(str(s["secret"]) for s in
                        live_secrets(endpoint.secrets if endpoint else [], given.now))
        if not secrets:
            return None, "webhook endpoint has no signing secret"
        return WebhookTarget(url=row.target, secrets=secrets), ""
    if row.channel == "chat":
        return ChatTarget(url=row.target, flavour=flavour_for(row.target,
                                                              row.config.get("platform"))), ""
    if row.channel == "email":
        return EmailTarget(address=row.target), ""
    return None, f"unknown channel {row.channel!r}"


def _held_until(row: OutboxRow, given: PlanInput, spent: dict[tuple[int, str], list[float]]
                ) -> tuple[float, str] | None:
    """When a first dispatch may go, if not now: after quiet hours, or when the per-minute
    window has room."""
    if row.dispatched_at is not None or row.kind in BYPASS_KINDS:
        return None
    prefs = given.preferences.get(row.user_id)
    if prefs is not None and not (prefs.quiet_allow_critical and _severity(row) == "critical"):
        until = quiet_until(prefs, given.now)
        if until is not None:
            return until, "held: quiet hours"
    limit = per_minute(prefs, row.channel, given.default_per_minute)
    times = spent.get((row.user_id, row.channel), [])
    if limit > 0 and len(times) >= limit:
        return times[-limit] + WINDOW_S, f"held: over {limit} {row.channel} notifications a minute"
    return None


def per_minute(prefs: Preferences | None, channel: str, default: int) -> int:
    """The user's limit for the channel (0 = unlimited)."""
    return prefs.max_per_minute.get(channel, default) if prefs is not None else default


def _severity(row: OutboxRow) -> str | None:
    detail = row.payload.get("detail")
    return detail.get("severity") if isinstance(detail, dict) else None


def quiet_until(prefs: Preferences, now: float) -> float | None:
    """The end of the quiet hours `now` falls in (epoch s), or None outside them."""
    if not prefs.quiet_start or not prefs.quiet_end or prefs.quiet_start == prefs.quiet_end:
        return None
    try:
        zone = ZoneInfo(prefs.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = dt.datetime.fromtimestamp(now, zone)
    start, end = _clock(prefs.quiet_start), _clock(prefs.quiet_end)
    t = local.time().replace(tzinfo=None)
    inside = start <= t < end if start < end else (t >= start or t < end)
    if not inside:
        return None
    day = local.date() if t < end else local.date() + dt.timedelta(days=1)
    return dt.datetime.combine(day, end, zone).timestamp()


def _clock(hhmm: str) -> dt.time:
    hours, _, minutes = hhmm.partition(":")
    return dt.time(int(hours), int(minutes))


def digest_payload(rows: Sequence[OutboxRow]) -> dict[str, Any]:
    """One message for held rows: their events in order (a digest folded again is flattened)."""
    events: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
        if row.kind == "digest":
            events.extend(row.payload.get("events", []))
        else:
            events.append(row.payload)
    return {"events": events, "since": min(r.created_at for r in rows),
            "until": max(r.created_at for r in rows)}


def build_notification(send: Send) -> Notification:
    """The message of one attempt; its id (`ntf_<row id>`) is the idempotency key."""
    row = send.row
    nid = f"ntf_{row.id}"
    if row.kind == "digest":
        events = tuple(msgspec.convert(e, Event) for e in row.payload.get("events", []))
        return Notification(id=nid, kind=NotificationKind.DIGEST, target=send.target,
                            events=events, created_at=row.created_at, attempt=send.attempt,
                            detail={"since": row.payload.get("since"),
                                    "until": row.payload.get("until")})
    return alert_notification(id=nid, kind=row.kind, target=send.target, payload=row.payload,
                              created_at=row.created_at, attempt=send.attempt)
