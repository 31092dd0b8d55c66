"""Webhooks: Standard Webhooks signatures verified by the reference `standardwebhooks` package,
secret rotation, the payload, and delivery to a real receiver on loopback."""

from __future__ import annotations

import base64
import json

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from defiwatch.errors import ValidationError
from defiwatch.notify.message import Notification, NotificationKind, RuleRef, WebhookTarget
from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.http import HttpClient
from defiwatch.notify.senders.webhook import (
    WebhookSender,
    generate_webhook_secret,
    rotate_webhook_secrets,
    sign_webhook,
    webhook_body,
    webhook_secret_key,
)
from notify.factories import NOW, notification, tvl_event
from notify.receiver import Receiver, Reply


def verify(secret: str, body: bytes, headers: dict[str, str]) -> object:
    """As a receiver would, with the reference implementation (it checks the timestamp against
    its own clock, so the sender's clock is real time in these tests)."""
    return Webhook(secret).verify(body, headers)


def test_generated_secrets_are_whsec_and_random() -> None:
    a, b = generate_webhook_secret(), generate_webhook_secret()
    assert a.startswith("whsec_") and a != b
    assert len(webhook_secret_key(a)) == 32


@pytest.mark.parametrize(
    "secret",
    ["abc", "whsec_", "whsec_!!!notbase64", "whsec_" + base64.b64encode(b"short").decode(),
     "whsec_" + base64.b64encode(b"x" * 65).decode()],
)
def test_malformed_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValidationError) as caught:
        webhook_secret_key(secret)
    assert caught.value.field == "secret"
    assert secret not in caught.value.message  # never echoed


def test_signature_matches_the_spec_example() -> None:
    # The example of the Standard Webhooks specification (signing section).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign_webhook("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, [secret]) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


def test_rotation_signs_with_every_active_secret() -> None:
    old = generate_webhook_secret()
    new, active = rotate_webhook_secrets([old])
    assert active == (new, old)
    body = b'{"a":1}'
    header = sign_webhook("ntf_1", 1_700_000_000, body, active)
    parts = header.split(" ")
    assert len(parts) == 2 and all(p.startswith("v1,") for p in parts)
    _, active = rotate_webhook_secrets(active, keep=1)
    assert len(active) == 2 and old not in active  # the oldest drops out


def test_body_is_the_same_on_every_attempt() -> None:
    target = WebhookTarget("https://example.com/h", (generate_webhook_secret(),))
    assert webhook_body(notification(target, attempt=1)) == webhook_body(notification(target, attempt=5))


def test_payload_shape() -> None:
    target = WebhookTarget("https://example.com/h", (generate_webhook_secret(),))
    doc = json.loads(webhook_body(notification(target)))
    assert doc["type"] == "alert_fired"
    assert doc["timestamp"] == "2025-01-02T03:00:00Z"
    data = doc["data"]
    assert data["rule"] == {"id": 7, "name": "Uniswap TVL drop", "severity": "critical"}
    assert data["event"]["subject"] == "uniswap" and data["event"]["value"] == 3_680_000_000.0
    assert set(data["event"]) >= {"type", "metric", "subject", "chain", "value", "previous",
                                  "change_pct", "ts", "emitted_at", "source", "detail"}
    assert data["message"] == ('Rule "Uniswap TVL drop" fired: uniswap TVL on ethereum fell '
                               "12.38 % from $4.20B to $3.68B (2025-01-02 02:59:59 UTC).")
    assert "http" not in data["message"]


def test_payload_of_other_kinds() -> None:
    target = WebhookTarget("https://example.com/h", (generate_webhook_secret(),))
    events = (tvl_event(), tvl_event(subject="aave", value=9.0e9, previous=1.0e10, change_pct=-10.0))
    digest = json.loads(webhook_body(Notification(
        id="ntf_9", kind=NotificationKind.DIGEST, target=target, events=events, created_at=NOW,
        detail={"since": NOW - 3600, "until": NOW})))
    assert digest["type"] == "digest" and len(digest["data"]["events"]) == 2
    assert digest["data"]["message"].startswith("2 changes between 2025-01-02 02:00:00 UTC")
    disabled = json.loads(webhook_body(Notification(
        id="ntf_10", kind=NotificationKind.ENDPOINT_DISABLED, target=target, created_at=NOW,
        detail={"channel": "email", "target": "o***@example.org", "reason": "550 no such user"})))
    assert disabled["data"]["channel"] == "email" and disabled["data"]["rule"] is None
    assert "550 no such user" in disabled["data"]["message"]


async def test_delivery_is_signed_and_verifiable(receiver: Receiver, client: HttpClient) -> None:
    secret = generate_webhook_secret()
    sender = WebhookSender(client)
    result = await sender.send(notification(WebhookTarget(receiver.url("/in"), (secret,))))
    assert (result.outcome, result.status_code) == (Outcome.DELIVERED, 200)
    seen = receiver.requests[0]
    assert seen.path == "/in" and seen.headers["content-type"] == "application/json"
    assert seen.headers["webhook-id"] == "ntf_42"
    payload = verify(secret, seen.body, seen.headers)
    assert isinstance(payload, dict) and payload["type"] == "alert_fired"
    with pytest.raises(WebhookVerificationError):
        verify(generate_webhook_secret(), seen.body, seen.headers)
    with pytest.raises(WebhookVerificationError):
        verify(secret, seen.body.replace(b"uniswap", b"sushi"), seen.headers)


async def test_during_rotation_receivers_with_either_secret_verify(
        receiver: Receiver, client: HttpClient) -> None:
    old = generate_webhook_secret()
    new, active = rotate_webhook_secrets([old])
    result = await WebhookSender(client).send(notification(WebhookTarget(receiver.url(), active)))
    assert result.delivered
    seen = receiver.requests[0]
    verify(old, seen.body, seen.headers)
    verify(new, seen.body, seen.headers)


async def test_attempts_keep_the_id_and_refresh_the_timestamp(
        receiver: Receiver, client: HttpClient) -> None:
    secret = generate_webhook_secret()
    clock = iter([1_700_000_000.0, 1_700_000_000.0, 1_700_000_060.0, 1_700_000_060.0])
    sender = WebhookSender(client, clock=lambda: next(clock))
    target = WebhookTarget(receiver.url(), (secret,))
    await sender.send(notification(target, attempt=1))
    await sender.send(notification(target, attempt=2))
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "ntf_42"
    assert (first.headers["webhook-timestamp"], second.headers["webhook-timestamp"]) == (
        "1700000000", "1700000060")
    assert first.body == second.body
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]


async def test_receiver_failures_are_classified(receiver: Receiver, client: HttpClient) -> None:
    sender = WebhookSender(client)
    target = WebhookTarget(receiver.url(), (generate_webhook_secret(),))
    receiver.script(Reply(410, b"gone"), Reply(503, headers={"Retry-After": "30"}))
    final = await sender.send(notification(target))
    assert (final.outcome, final.status_code) == (Outcome.FAILED_FINAL, 410)  # gone is push-only
    later = await sender.send(notification(target))
    assert (later.outcome, later.retry_after_s) == (Outcome.RETRY, 30.0)


async def test_a_target_without_a_valid_secret_fails_for_good(
        receiver: Receiver, client: HttpClient) -> None:
    result = await WebhookSender(client).send(notification(WebhookTarget(receiver.url(), ())))
    assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)
    assert receiver.requests == []


def test_rule_ref_json() -> None:
    assert RuleRef(None, "x").as_json() == {"id": None, "name": "x", "severity": "warning"}
