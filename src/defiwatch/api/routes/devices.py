"""Web Push devices of the caller (scope `alerts`): the browsers a `push` channel reaches.

A browser subscribes with `PushManager.subscribe({applicationServerKey})` (the key from
`GET /v1/devices/vapid-public-key`) and posts `subscription.toJSON()` here under a device name.
A push channel `{"type": "push"}` reaches every enabled device of the rule's owner,
`{"type": "push", "device": "x"}` one. The push service's 404/410 disables a device
(`disabled_reason` "gone: 410"); posting the device again re-enables it.

The subscription's `auth` secret is never shown back, and its endpoint only as an origin (the
path is the credential to push to that browser). The endpoint is SSRF-checked when saved
(RFC 8030 endpoints come from browsers, i.e. from users) and again at each send.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import re
import secrets
import time
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from defiwatch.api.auth import require
from defiwatch.api.params import Text
from defiwatch.api.responses import json_response
from defiwatch.api.routes.endpoints import notify_settings
from defiwatch.domain.channels import validate_url
from defiwatch.errors import DefiwatchError, NotFoundError, ValidationError
from defiwatch.notify.factory import address_guard
from defiwatch.notify.senders.webpush import VapidKey
from defiwatch.store import endpoints as store
from defiwatch.store.keys import Principal

__all__ = ["MAX_DEVICES", "DeviceLimitError", "PushNotConfigured", "router"]

router = APIRouter(prefix="/v1/devices", tags=["delivery"])

MAX_DEVICES = 20  # per user
_DEVICE_PATTERN = r"^[A-Za-z0-9._:-]{1,120}$"  # what a push channel's `device` accepts
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_P256_POINT = 65  # bytes of an uncompressed P-256 point (0x04, x, y): RFC 8291 3.1
_AUTH_SECRET = 16  # bytes of the authentication secret: RFC 8291 3.2

Auth = Annotated[Principal, Depends(require("alerts"))]
DeviceName = Annotated[str, Path(pattern=_DEVICE_PATTERN, description="the device's name")]


class DeviceLimitError(DefiwatchError):
    """The user has MAX_DEVICES devices (HTTP 403, code `device_limit_reached`)."""

    code = "device_limit_reached"
    http_status = 403


class PushNotConfigured(DefiwatchError):
    """The server has no VAPID key (HTTP 503, code `push_not_configured`)."""

    code = "push_not_configured"
    http_status = 503


# --- models ----------------------------------------------------------------------------------


class PushKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p256dh: str = Field(max_length=200, description="the browser's P-256 public key, base64url "
                                                     "(65-byte uncompressed point)")
    auth: str = Field(max_length=100, description="the 16-byte authentication secret, base64url")


class PushSubscription(BaseModel):
    """`PushSubscription.toJSON()` as the browser gives it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    endpoint: Text = Field(min_length=1, max_length=2000,
                           description="the push service URL (https)")
    expiration_time: float | None = Field(default=None, alias="expirationTime",
                                          description="ignored (browsers send null)")
    keys: PushKeys


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "device": "laptop-firefox",
        "subscription": {"endpoint": "https://updates.push.services.mozilla.com/wpush/v2/gAAA",
                         "keys": {"p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0"
                                            "VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM",
                                  "auth": "tBHItJI5svbpez7KI4CCXg"}},
        "user_agent": "Firefox 133 on Linux",
    }]})

    device: str | None = Field(
        default=None, pattern=_DEVICE_PATTERN,
        description="a name for this browser (letters, digits, ._:-); posting an existing name "
        "replaces its subscription and re-enables it. Omitted: the device already holding this "
        "endpoint, else a new `dev_<8 hex>`")
    subscription: PushSubscription
    user_agent: Text | None = Field(default=None, max_length=300,
                                    description="shown in the device list to tell devices apart")


class DeviceOut(BaseModel):
    device: str
    endpoint_origin: str = Field(description="scheme://host of the push service (the path is "
                                             "a credential and is not shown)")
    user_agent: str | None
    status: Literal["enabled", "disabled"]
    disabled_at: float | None
    disabled_reason: str | None = Field(description="e.g. 'gone: 410' (the browser "
                                                     "unsubscribed)")
    created_at: float
    updated_at: float


class DeviceList(BaseModel):
    data: list[DeviceOut]
    meta: dict[str, int] = Field(description="count, and max: devices allowed per user")


class VapidPublicKey(BaseModel):
    public_key: str = Field(description="`applicationServerKey` for PushManager.subscribe(): "
                                        "the VAPID public key, base64url uncompressed point")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def _device_out(row: store.Device) -> dict[str, Any]:
    return DeviceOut(
        device=row.device, endpoint_origin=_origin(row.endpoint), user_agent=row.user_agent,
        status="disabled" if row.disabled_at is not None else "enabled",
        disabled_at=row.disabled_at, disabled_reason=row.disabled_reason,
        created_at=row.created_at, updated_at=row.updated_at).model_dump()



# --- validation --------------------------------------------------------------------------------


def _b64url(value: str, field: str) -> bytes:
    if not _B64URL.fullmatch(value):
        raise ValidationError("must be base64url (A-Z a-z 0-9 - _, as toJSON() gives)",
                              field=field)
    text = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("must be base64url (A-Z a-z 0-9 - _, as toJSON() gives)",
                              field=field) from exc


def _keys(keys: PushKeys) -> tuple[str, str]:
    """The subscription's keys, checked (RFC 8291 3) and without padding."""
    field = "subscription.keys.p256dh"
    point = _b64url(keys.p256dh, field)
    if len(point) != _P256_POINT or point[0] != 0x04:
        raise ValidationError(f"must decode to a {_P256_POINT}-byte uncompressed P-256 point",
                              field=field)
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise ValidationError("is not a point on the P-256 curve", field=field) from exc
    if len(_b64url(keys.auth, "subscription.keys.auth")) != _AUTH_SECRET:
        raise ValidationError(f"must decode to {_AUTH_SECRET} bytes",
                              field="subscription.keys.auth")
    return keys.p256dh.rstrip("="), keys.auth.rstrip("=")


async def _check_endpoint(request: Request, url: str) -> str:
    """https, or http to a destination the operator allow-listed; then the SSRF check.

    Raises:
        ValidationError: any of it fails (`destination_blocked` for an SSRF refusal).
    """
    field = "subscription.endpoint"
    url = validate_url(url, field)
    guard = address_guard(notify_settings(request))
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "http" and host:
        listed = guard.allow.allows_host(host)
        with contextlib.suppress(ValueError):  # ValueError: a name, not an address
            listed = listed or guard.allow.allows_address(ipaddress.ip_address(host))
        if not listed:
            raise ValidationError("a push endpoint must be https:// (http only to destinations "
                                  "on the operator's DEFIWATCH_NOTIFY_SSRF_ALLOW)", field=field)
    elif parts.scheme != "https" or not host:
        raise ValidationError("a push endpoint must be an absolute https:// URL", field=field)
    try:
        await guard.check_url(url, field=field)
    except OSError as exc:
        raise ValidationError(f"the push endpoint's host {host!r} does not resolve",
                              field=field) from exc
    return url


# --- routes ----------------------------------------------------------------------------------


@router.get("/vapid-public-key", summary="The server's VAPID public key (applicationServerKey)",
            response_model=VapidPublicKey,
            responses={503: {"description": "push is not configured on this server "
                                            "(code push_not_configured)"}})
async def vapid_public_key(request: Request, principal: Auth) -> Response:
    try:
        key = VapidKey.from_settings(notify_settings(request))
    except (OSError, ValueError) as exc:
        raise PushNotConfigured("push is misconfigured on this server: its VAPID key cannot be "
                                "read; ask the operator to fix DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY"
                                ) from exc
    if key is None:
        raise PushNotConfigured("push is not configured on this server: the operator must set "
                                "DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY (or ..._FILE)")
    return json_response({"public_key": key.application_server_key})


@router.post(
    "",
    status_code=201,
    summary="Register (or update) a Web Push device",
    description="Body: a device name and `PushSubscription.toJSON()`. 201 when the device is "
    "new, 200 when a device of that name was updated (and re-enabled). The endpoint must be "
    "https and resolve to a public address (`destination_blocked` otherwise). At most "
    f"{MAX_DEVICES} devices per user.",
    response_model=DeviceOut,
    responses={200: {"description": "an existing device updated", "model": DeviceOut},
               400: {"description": "invalid subscription; `field` is the JSON path at fault "
                                    "(e.g. subscription.keys.p256dh)"},
               403: {"description": f"{MAX_DEVICES} devices already (device_limit_reached)"}},
)
async def register_device(body: DeviceCreate, request: Request, principal: Auth) -> Response:
    p256dh, auth = _keys(body.subscription.keys)
    endpoint = await _check_endpoint(request, body.subscription.endpoint)
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        devices = await store.list_devices(conn, principal.user_id)
        name = body.device or next((d.device for d in devices if d.endpoint == endpoint),
                                   f"dev_{secrets.token_hex(4)}")
        exists = any(d.device == name for d in devices)
        if not exists and len(devices) >= MAX_DEVICES:
            raise DeviceLimitError(f"you have {MAX_DEVICES} devices, the most allowed; delete "
                                   "one (DELETE /v1/devices/{device}) first", field="device")
        row = await store.upsert_device(conn, principal.user_id, name, endpoint=endpoint,
                                        p256dh=p256dh, auth=auth, user_agent=body.user_agent,
                                        now=now)
    return json_response(_device_out(row), 200 if exists else 201)


@router.get("", summary="Your Web Push devices, disabled ones included", response_model=DeviceList)
async def list_devices(request: Request, principal: Auth) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        rows = await store.list_devices(conn, principal.user_id)
    return json_response({"data": [_device_out(r) for r in rows],
                  "meta": {"count": len(rows), "max": MAX_DEVICES}})


@router.delete("/{device}", status_code=204, summary="Forget a device",
               responses={404: {"description": "no device of yours by that name"}})
async def delete_device(device: DeviceName, request: Request, principal: Auth) -> Response:
    async with request.app.state.ctx.engine.begin() as conn:
        if not await store.delete_device(conn, principal.user_id, device):
            raise NotFoundError(f"no device {device!r}", field="device")
    return Response(status_code=204)
