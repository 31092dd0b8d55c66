"""Webhooks in the Standard Webhooks scheme (standardwebhooks.com, spec v1).

Each request carries

    webhook-id:        the notification id, the same on every attempt (receivers dedupe on it)
    webhook-timestamp: the attempt's time, integer epoch seconds
    webhook-signature: `v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`, keyed with the
                       base64-decoded part of the endpoint's `whsec_...` secret; one signature per
                       active secret, space-separated, while a secret is being rotated

and a JSON body `{"type", "timestamp", "data"}`: `type` is the notification kind, `timestamp`
when it was queued (RFC 3339, so every attempt sends the same body), and `data` holds the rule,
the event (the one event shape) and a link-free `message`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _random
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from defiwatch.errors import ValidationError
from defiwatch.notify.message import ChannelKind, Notification, NotificationKind, WebhookTarget
from defiwatch.notify.render import iso_utc, summarize
from defiwatch.notify.senders.base import Outcome, Reason, SendResult
from defiwatch.notify.senders.http import HttpClient, post

__all__ = [
    "SECRET_PREFIX",
    "WebhookSender",
    "generate_webhook_secret",
    "rotate_webhook_secrets",
    "sign_webhook",
    "webhook_body",
    "webhook_data",
    "webhook_headers",
    "webhook_secret_key",
]

SECRET_PREFIX = "whsec_"
_MIN_KEY, _MAX_KEY = 24, 64  # bytes; the spec's bounds for a secret


def generate_webhook_secret(nbytes: int = 32) -> str:
    """A new signing secret, `whsec_` + base64 of `nbytes` random bytes. Show it to its owner
    once; store it where the notifier can read it (it is needed in clear to sign)."""
    if not _MIN_KEY <= nbytes <= _MAX_KEY:
        raise ValueError(f"a secret has {_MIN_KEY} to {_MAX_KEY} bytes")
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(nbytes)).decode("ascii")


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret (the base64-decoded part after the prefix).

    Raises:
        ValidationError: not a `whsec_` secret of 24 to 64 bytes (the secret is not echoed).
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValidationError(f"a webhook secret starts with {SECRET_PREFIX!r}", field="secret")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("a webhook secret is base64 after its prefix", field="secret") from exc
    if not _MIN_KEY <= len(key) <= _MAX_KEY:
        raise ValidationError(f"a webhook secret holds {_MIN_KEY} to {_MAX_KEY} bytes",
                              field="secret")
    return key


def rotate_webhook_secrets(current: Sequence[str], *, keep: int = 1) -> tuple[str, tuple[str, ...]]:
    """Start a rotation: a new secret, and the list to sign with from now on (new first, then up
    to `keep` previous ones, which the owner drops once every receiver verifies with the new one).

    Returns:
        (new secret, secrets to store).
    """
    new = generate_webhook_secret()
    return new, (new, *tuple(current)[:keep])


def sign_webhook(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> str:
    """The `webhook-signature` value: `v1,<sig>` per secret, space-separated.

    Raises:
        ValidationError: no secret, or a malformed one.
    """
    if not secrets:
        raise ValidationError("a webhook endpoint needs a signing secret", field="secret")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    signatures = []
    for secret in secrets:
        digest = hmac.new(webhook_secret_key(secret), signed, hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode("ascii"))
    return " ".join(signatures)


def webhook_headers(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_webhook(msg_id, timestamp, body, secrets),
    }


def webhook_data(notification: Notification) -> dict[str, Any]:
    """The `data` object of a notification's payload."""
    n = notification
    message = summarize(n).text
    data: dict[str, Any] = {"rule": n.rule.as_json() if n.rule else None}
    if n.kind is NotificationKind.DIGEST:
        data["events"] = [msgspec.to_builtins(e) for e in n.events]
        data["since"], data["until"] = n.detail.get("since"), n.detail.get("until")
    elif n.kind is NotificationKind.ENDPOINT_DISABLED:
        data.update({k: n.detail.get(k) for k in ("channel", "target", "reason")})
    else:
        data["event"] = msgspec.to_builtins(n.event) if n.event is not None else None
    data["message"] = message
    return data


def webhook_body(notification: Notification) -> bytes:
    """The JSON body: identical on every attempt of one notification."""
    return msgspec.json.encode({
        "type": notification.kind.value,
        "timestamp": iso_utc(notification.created_at),
        "data": webhook_data(notification),
    })


class WebhookSender:
    """Standard Webhooks over the shared guarded client.

    Args:
        client: from `create_http_client` (SSRF guard, no redirects, keep-alive).
        timeout_s: deadline of one attempt, seconds.
        clock: epoch seconds (the `webhook-timestamp` and Retry-After dates).
    """

    def __init__(self, client: HttpClient, *, timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._clock = clock

    @property
    def channel(self) -> ChannelKind:
        return ChannelKind.WEBHOOK

    async def send(self, notification: Notification) -> SendResult:
        target = notification.target
        if not isinstance(target, WebhookTarget):
            raise TypeError(f"WebhookSender cannot send to a {target.channel} target")
        body = webhook_body(notification)
        try:
            headers = webhook_headers(notification.id, int(self._clock()), body, target.secrets)
        except ValidationError as exc:
            return SendResult(Outcome.FAILED_FINAL, Reason.INVALID_TARGET, error=exc.message)
        return await post(self._client, target.url, content=body, headers=headers,
                          timeout_s=self._timeout_s, clock=self._clock)
