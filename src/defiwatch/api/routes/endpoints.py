"""Delivery endpoints of the caller's rules: webhook, chat and email targets (scope `alerts`).

An endpoint row exists per (user, channel, target); it is created when a rule naming the target
is saved (a webhook gets its signing secret then, shown once in that response). Here users see
each endpoint's health (the notifier disables one after `notify_disable_after_s` of continuous
failure), rotate a webhook's secret and re-enable a disabled endpoint. Secrets are never listed:
only a fingerprint and when each stops signing.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.api.auth import require
from defiwatch.api.params import RowId
from defiwatch.api.responses import json_response
from defiwatch.config import Settings
from defiwatch.errors import NotFoundError, ValidationError
from defiwatch.notify.redact import redact_url
from defiwatch.store import endpoints as store
from defiwatch.store.keys import Principal

__all__ = ["display_target", "notify_settings", "router"]

router = APIRouter(prefix="/v1/endpoints", tags=["delivery"])


Auth = Annotated[Principal, Depends(require("alerts"))]
EndpointId = Annotated[RowId, Path(description="the endpoint's id")]


def notify_settings(request: Request) -> Settings:
    """The settings the delivery routes read (the context's, else the environment's)."""
    ctx = request.app.state.ctx
    if ctx.settings is None:
        ctx.settings = Settings()
    settings: Settings = ctx.settings
    return settings


def display_target(channel: str, target: str) -> str:
    """A target as the API shows it: webhook URLs without userinfo and query, chat URLs as
    their origin (Slack and Discord carry the token in the path), email and device as is."""
    if channel == "webhook":
        return redact_url(target)
    if channel == "chat":
        return redact_url(target, keep_path=False)
    return target



# --- models ----------------------------------------------------------------------------------


class SecretOut(BaseModel):
    fingerprint: str = Field(description="first 8 hex digits of the secret's SHA-256")
    expires_at: float | None = Field(
        description="when it stops signing (epoch s); null: the current secret")


class EndpointOut(BaseModel):
    id: int
    channel: Literal["webhook", "chat", "email"]
    target: str = Field(description="webhook URL without userinfo and query; chat URL origin; "
                                    "email address")
    status: Literal["active", "failing", "disabled"] = Field(
        description="failing: deliveries fail since `failing_since`; disabled: the notifier "
        "stopped delivering (notifications go dead with 'endpoint disabled') until re-enabled")
    failing_since: float | None
    last_error: str | None
    disabled_at: float | None
    disabled_reason: str | None
    secrets_count: int = Field(description="signing secrets in use (2 during a rotation)")
    secrets: list[SecretOut] = Field(description="fingerprints and expiries, never the secrets")
    created_at: float
    updated_at: float


class EndpointList(BaseModel):
    data: list[EndpointOut]


class RotatedSecret(BaseModel):
    endpoint: EndpointOut
    secret: str = Field(description="the new `whsec_` secret: shown only now")
    previous_expires_at: float | None = Field(
        description="the previous secret keeps signing until then (epoch s); null: there was "
        "none")


class EnableResult(BaseModel):
    endpoint: EndpointOut
    redelivered: int = Field(description="dead notifications requeued (with ?redeliver=true)")


def _endpoint_out(row: store.Endpoint, now: float) -> EndpointOut:
    secrets = store.secret_infos(row, now)
    return EndpointOut.model_validate({
        "id": row.id, "channel": row.channel, "target": display_target(row.channel, row.target),
        "status": row.status(), "failing_since": row.failing_since, "last_error": row.last_error,
        "disabled_at": row.disabled_at, "disabled_reason": row.disabled_reason,
        "secrets_count": len(secrets), "secrets": [msgspec.to_builtins(s) for s in secrets],
        "created_at": row.created_at, "updated_at": row.updated_at})


# --- routes ----------------------------------------------------------------------------------


@router.get("", summary="Your delivery endpoints (webhook, chat, email) and their health",
            response_model=EndpointList)
async def list_endpoints(request: Request, principal: Auth) -> Response:
    now = time.time()
    async with request.app.state.ctx.engine.connect() as conn:
        rows = await store.list_endpoints(conn, principal.user_id)
    return json_response(EndpointList(data=[_endpoint_out(r, now) for r in rows]).model_dump())


@router.post(
    "/{endpoint_id}/rotate-secret",
    summary="Rotate a webhook endpoint's signing secret",
    description="Returns the new `whsec_` secret once. Deliveries are signed with both the new "
    "and the previous secret (two `v1,` signatures in `webhook-signature`) until "
    "`previous_expires_at` (now + `notify_secret_grace_s`), so receivers can switch without "
    "losing a delivery; a second rotation drops the secret before the previous one.",
    response_model=RotatedSecret,
    responses={400: {"description": "not a webhook endpoint (field `id`)"},
               404: {"description": "no such endpoint of yours"}},
)
async def rotate_secret(endpoint_id: EndpointId, request: Request, principal: Auth) -> Response:
    grace = notify_settings(request).notify_secret_grace_s
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        row = await _owned(conn, principal, endpoint_id, lock=True)
        if row.channel != "webhook":
            raise ValidationError(f"only webhook endpoints have a signing secret; endpoint "
                                  f"{endpoint_id} is {row.channel}", field="id")
        had_secret = bool(store.live_secrets(row.secrets, now))
        secret = await store.rotate_endpoint_secret(conn, row, now=now, grace_s=grace)
        row = await _owned(conn, principal, endpoint_id)
    out = RotatedSecret(endpoint=_endpoint_out(row, now), secret=secret,
                        previous_expires_at=now + grace if had_secret and grace > 0 else None)
    return json_response(out.model_dump())


@router.post(
    "/{endpoint_id}/enable",
    summary="Re-enable a disabled or failing endpoint",
    description="Clears `disabled_at` and `failing_since`. With `redeliver=true`, the "
    "endpoint's notifications that went dead because it was disabled are queued again (due "
    "now, with a fresh retry budget).",
    response_model=EnableResult,
    responses={404: {"description": "no such endpoint of yours"}},
)
async def enable_endpoint(
    endpoint_id: EndpointId,
    request: Request,
    principal: Auth,
    redeliver: Annotated[bool, Query(description="also requeue the notifications dropped "
                                                 "while it was disabled")] = False,
) -> Response:
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        row = await _owned(conn, principal, endpoint_id, lock=True)
        count = await store.enable_endpoint(conn, row, now=now, redeliver=redeliver)
        row = await _owned(conn, principal, endpoint_id)
    return json_response(EnableResult(endpoint=_endpoint_out(row, now), redelivered=count).model_dump())


async def _owned(conn: AsyncConnection, principal: Principal, endpoint_id: int, *,
                 lock: bool = False) -> store.Endpoint:
    row = await store.get_endpoint(conn, principal.user_id, endpoint_id, lock=lock)
    if row is None:
        raise NotFoundError(f"no endpoint {endpoint_id}", field="id")
    return row
