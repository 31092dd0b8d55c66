"""Fired and resolved alerts as events on the `alerts` stream (and as notification payloads).

An alert event has the one event shape (`domain/events.py`): the series fields and values are
those of the observation that decided the transition; `type` is `alert_fired` or
`alert_resolved`; `detail` says whose alert it is and why (the gateway routes it to
`detail.user_id` only)::

    detail = {user_id, rule_id, rule_name, alert_id, instance, state, reason, dedup_key,
              severity, fired_at, resolved_at, suppressed, trigger}

`trigger` is `{type, offset}` of the stream event that decided the transition (None when a
timer decided it without one): the alert event's own `type` and `offset` are those of the
alert, so without it a webhook receiver could not tell which tvl_change or price_change fired
the rule, nor fetch it (`GET /v1/events?since=<offset - 1>&limit=1`).

The alerts stream deduplicates per (rule, instance) on `ts` (`alert_stream_key`), so republishing
an event after a crash adds nothing twice. `ts` is the observation time, bumped by one second
when two transitions of one instance would share it (a tick-decided fire reuses the observation
of its pending start), so that the per-instance dedup keeps both.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from defiwatch.domain.events import Event

__all__ = [
    "AlertEventType",
    "alert_dedup_key",
    "alert_stream_key",
    "build_alert_event",
    "event_dict",
]


class AlertEventType(enum.StrEnum):
    FIRED = "alert_fired"
    RESOLVED = "alert_resolved"


def alert_dedup_key(rule_id: int, instance: str, series: str, ts: int) -> str:
    """The identity of one fired alert: rule, instance, and the observation (series, ts) that
    started its episode. alert_history has a unique constraint on it."""
    return f"{rule_id}:{instance}:{series}:{ts}"


def alert_stream_key(event: Event) -> str:
    """The alerts stream's dedup identity: (rule, instance). Pass as `dedup_key=` when creating
    the stream named "alerts"."""
    detail = event.detail or {}
    return f"{detail.get('rule_id')}|{detail.get('instance')}"


def build_alert_event(
    kind: AlertEventType,
    *,
    source: dict[str, Any] | None,
    series: str,
    ts: int,
    now: float,
    detail: dict[str, Any],
) -> Event:
    """An alert event from the observation (`source`, an event as a dict) that decided it."""
    src = source or {}
    trigger = {"type": src.get("type"), "offset": src.get("offset")} if src else None
    metric, _, rest = series.partition("|")
    subject, _, chain = rest.partition("|")
    return Event(
        type=kind.value,
        metric=src.get("metric", metric),
        subject=src.get("subject", subject),
        chain=src.get("chain", chain),
        value=src.get("value"),
        previous=src.get("previous"),
        change_abs=src.get("change_abs"),
        change_pct=src.get("change_pct"),
        change_1h=src.get("change_1h"),
        change_24h=src.get("change_24h"),
        change_7d=src.get("change_7d"),
        ts=ts,
        emitted_at=now,
        source="alerts",
        detail={**detail, "trigger": trigger},
    )


def event_dict(event: Event) -> dict[str, Any]:
    """An event as plain JSON-ready data (stored with states and history rows)."""
    out: dict[str, Any] = msgspec.to_builtins(event)
    return out
