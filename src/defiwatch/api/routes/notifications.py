"""The caller's delivery log and delivery preferences (scope `alerts`).

One notification per (alert, kind, repeat, channel target), plus test sends and digests; each
lists its delivery attempts. Statuses (the notifier's contract): `pending` (due at
`next_attempt_at`), `held` (throttled or quiet hours), `sending`, `delivered`, `dead` (gave up;
`last_error` says why), `digested` (folded into the digest `parent_id`), `expanded` (a push to
every device, split into one notification per device).
"""

from __future__ import annotations

import re
import time
import zoneinfo
from typing import Annotated, Any, Literal

import msgspec
from annotated_types import Ge, Le
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from defiwatch.api.auth import require
from defiwatch.api.params import EpochFloat, RowId, Text
from defiwatch.api.responses import json_response
from defiwatch.api.routes.endpoints import display_target, notify_settings
from defiwatch.domain.channels import CHANNEL_TYPES
from defiwatch.errors import DefiwatchError, NotFoundError, ValidationError
from defiwatch.store import endpoints as endpoint_store
from defiwatch.store import notifications as store
from defiwatch.store.keys import Principal

__all__ = ["NotificationStateError", "notification_out", "router"]

router = APIRouter(prefix="/v1/notifications", tags=["delivery"])

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_MAX_PER_MINUTE = 1_000_000  # a per-channel ceiling beyond any real rate: "unlimited" is 0

Auth = Annotated[Principal, Depends(require("alerts"))]
NotificationId = Annotated[RowId, Path(description="the notification's id")]
Status = Literal["pending", "held", "sending", "delivered", "dead", "digested", "expanded"]
Kind = Literal["alert_fired", "alert_resolved", "test", "digest", "endpoint_disabled"]
Channel = Literal["webhook", "email", "push", "chat"]


class NotificationStateError(DefiwatchError):
    """The notification is not in a state the operation applies to (HTTP 409)."""

    code = "invalid_state"
    http_status = 409


# --- models ----------------------------------------------------------------------------------


class AttemptOut(BaseModel):
    attempt: int = Field(description="1-based")
    status: Literal["sending", "delivered", "failed", "dead"] = Field(
        description="failed: a retry follows; dead: the last one")
    response_code: int | None = Field(description="HTTP or SMTP status")
    error: str | None
    latency_ms: float | None
    started_at: float
    finished_at: float | None


class NotificationOut(BaseModel):
    id: int
    alert_id: int | None = Field(description="null for test and digest notifications")
    rule_id: int | None
    kind: Kind
    seq: int = Field(description="0 for the first notification, n for the n-th repeat")
    channel: Channel
    target: str = Field(description="webhook URL without userinfo and query, chat URL origin, "
                                    "email address, or push device (`*`: every device)")
    status: Status
    attempt: int = Field(description="attempts made so far")
    retry_from: int = Field(description="attempts made before the last redelivery")
    next_attempt_at: float
    last_error: str | None
    response_code: int | None
    parent_id: int | None = Field(description="the digest it was folded into, or the push "
                                              "notification it was expanded from")
    created_at: float
    updated_at: float
    sent_at: float | None
    attempts: list[AttemptOut]
    payload: dict[str, Any] | None = Field(
        default=None, description="the event delivered (only on GET /v1/notifications/{id})")


class NotificationPage(BaseModel):
    data: list[NotificationOut]
    meta: dict[str, Any] = Field(description="count, and next_before: pass as `before` for the "
                                             "next page (null: last page)")


class Redelivery(BaseModel):
    id: int
    status: Literal["pending"]
    next_attempt_at: float


class PreferencesIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "timezone": "Europe/Paris", "quiet_start": "22:00", "quiet_end": "07:30",
        "quiet_allow_critical": True, "max_per_minute": {"email": 5, "push": 0},
    }]})

    timezone: Text = Field(default="UTC", max_length=64,
                          description="IANA time zone of the quiet hours, e.g. Europe/Paris")
    quiet_start: str | None = Field(default=None, description="HH:MM local; give both or "
                                                               "neither")
    quiet_end: str | None = Field(default=None, description="HH:MM local (may be before "
                                                             "quiet_start: over midnight)")
    quiet_allow_critical: bool = Field(default=True, description="critical alerts are "
                                                                 "delivered during quiet hours")
    max_per_minute: dict[str, Annotated[int, Ge(0), Le(_MAX_PER_MINUTE)]] = Field(
        default_factory=dict, description="per channel (webhook, email, push, chat): at most "
        "this many notifications a minute, the rest held and sent as a digest; 0: unlimited; "
        "a missing channel: the server default")


class PreferencesOut(PreferencesIn):
    default_max_per_minute: int = Field(description="the server default per channel")
    updated_at: float | None = Field(description="null: never set (defaults)")


def notification_out(row: store.NotificationRow) -> dict[str, Any]:
    """A notification as the API shows it (its target redacted like endpoints')."""
    out: dict[str, Any] = msgspec.to_builtins(row)
    out["target"] = display_target(row.channel, row.target)
    if row.payload is None:
        out.pop("payload", None)
    return out



def _preferences_out(request: Request, prefs: endpoint_store.Preferences) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(prefs)
    del out["user_id"]
    out["default_max_per_minute"] = notify_settings(request).notify_max_per_minute
    return out


# --- preferences (static paths first: not captured by /{notification_id}) ----------------------


@router.get("/preferences", summary="Your delivery preferences (quiet hours, rate limits)",
            response_model=PreferencesOut)
async def get_preferences(request: Request, principal: Auth) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        prefs = await endpoint_store.get_preferences(conn, principal.user_id)
    return json_response(_preferences_out(request, prefs))


@router.put(
    "/preferences",
    summary="Replace your delivery preferences",
    description="Quiet hours hold non-critical notifications (critical ones too when "
    "`quiet_allow_critical` is false) until `quiet_end`, then deliver them as a digest. "
    "Absent fields get their defaults.",
    response_model=PreferencesOut,
    responses={400: {"description": "invalid preferences; `field` names the one at fault"}},
)
async def put_preferences(body: PreferencesIn, request: Request, principal: Auth) -> Response:
    try:
        zoneinfo.ZoneInfo(body.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"unknown time zone {body.timezone!r}; use an IANA name such as "
                              "Europe/Paris or UTC", field="timezone") from exc
    for name in ("quiet_start", "quiet_end"):
        value = getattr(body, name)
        if value is not None and not _HHMM.fullmatch(value):
            raise ValidationError("must be HH:MM (24 h, local time)", field=name)
    if (body.quiet_start is None) != (body.quiet_end is None):
        missing = "quiet_end" if body.quiet_end is None else "quiet_start"
        raise ValidationError("give both quiet_start and quiet_end, or neither", field=missing)
    if body.quiet_start is not None and body.quiet_start == body.quiet_end:
        raise ValidationError("quiet_end must differ from quiet_start", field="quiet_end")
    for channel in body.max_per_minute:
        if channel not in CHANNEL_TYPES:
            raise ValidationError(f"unknown channel {channel!r}; known: "
                                  f"{', '.join(CHANNEL_TYPES)}", field=f"max_per_minute.{channel}")
    prefs = endpoint_store.Preferences(
        principal.user_id, timezone=body.timezone, quiet_start=body.quiet_start, quiet_end=body.quiet_end,
        quiet_allow_critical=body.quiet_allow_critical, max_per_minute=dict(body.max_per_minute))
    async with request.app.state.ctx.engine.begin() as conn:
        saved = await endpoint_store.put_preferences(conn, prefs, time.time())
    return json_response(_preferences_out(request, saved))


# --- the log -----------------------------------------------------------------------------------


@router.get(
    "",
    summary="Your notifications, newest first, with their delivery attempts",
    description="Page with `before=meta.next_before`. `since`/`until` filter on when the "
    "notification was queued (epoch s).",
    response_model=NotificationPage,
)
async def list_notifications(
    request: Request,
    principal: Auth,
    status: Status | None = None,
    channel: Channel | None = None,
    kind: Kind | None = None,
    rule_id: RowId | None = None,
    alert_id: RowId | None = None,
    since: Annotated[EpochFloat | None, Query(description="queued at or after (epoch s)")] = None,
    until: Annotated[EpochFloat | None, Query(description="queued before (epoch s)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[RowId | None, Query(description="id of the oldest one seen")] = None,
) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        rows = await store.list_notifications(
            conn, principal.user_id, status=status, channel=channel, kind=kind, rule_id=rule_id,
            alert_id=alert_id, since=since, until=until, limit=limit, before=before)
    return json_response({"data": [notification_out(r) for r in rows], "meta": {
        "count": len(rows), "next_before": rows[-1].id if len(rows) == limit else None}})


@router.get("/{notification_id}", summary="One notification with its payload and attempts",
            response_model=NotificationOut)
async def get_notification(notification_id: NotificationId, request: Request,
                           principal: Auth) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        row = await store.get_notification(conn, principal.user_id, notification_id)
    if row is None:
        raise NotFoundError(f"no notification {notification_id}", field="id")
    return json_response(notification_out(row))


@router.post(
    "/{notification_id}/redeliver",
    status_code=202,
    summary="Send a delivered or dead notification again",
    description="Queues it again, due now, with a fresh retry budget; the attempts so far stay "
    "listed. Only `delivered` and `dead` notifications can be redelivered (409 "
    "`invalid_state` otherwise: it is still on its way).",
    response_model=Redelivery,
    responses={404: {"description": "no notification of yours"},
               409: {"description": "not delivered or dead (code invalid_state)"}},
)
async def redeliver(notification_id: NotificationId, request: Request,
                    principal: Auth) -> Response:
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        row = await store.get_notification(conn, principal.user_id, notification_id, lock=True)
        if row is None:
            raise NotFoundError(f"no notification {notification_id}", field="id")
        if not await store.redeliver_notification(conn, notification_id, now):
            raise NotificationStateError(
                f"notification {notification_id} is {row.status}; only delivered or dead "
                "notifications can be redelivered", field="status")
    return json_response({"id": notification_id, "status": "pending", "next_attempt_at": now}, 202)
