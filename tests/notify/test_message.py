"""The notification value: built from an alert engine outbox row; targets redacted for logs."""

from __future__ import annotations

import msgspec
import pytest

from defiwatch.alerts.events import AlertEventType, build_alert_event, event_dict
from defiwatch.notify.message import (
    ChannelKind,
    ChatTarget,
    EmailTarget,
    NotificationKind,
    PushTarget,
    RuleRef,
    Target,
    WebhookTarget,
    alert_notification,
)
from defiwatch.notify.redact import redact_target, redact_url


def test_from_an_alert_engine_payload() -> None:
    event = build_alert_event(
        AlertEventType.FIRED,
        source={"metric": "tvl", "subject": "aave", "chain": "arbitrum", "value": 1.0e9,
                "previous": 1.2e9, "change_pct": -16.7, "ts": 1_700_000_000},
        series="tvl|aave|arbitrum", ts=1_700_000_000, now=1_700_000_001.0,
        detail={"user_id": 3, "rule_id": 9, "rule_name": "Aave on Arbitrum", "severity": "info",
                "alert_id": 4, "instance": "", "state": "firing"})
    target = EmailTarget("ops@example.org")
    n = alert_notification(id="ntf_5", kind="alert_fired", target=target, payload=event_dict(event),
                           created_at=1_700_000_002.0, attempt=2)
    assert n.kind is NotificationKind.ALERT_FIRED and n.channel is ChannelKind.EMAIL
    assert n.rule == RuleRef(9, "Aave on Arbitrum", "info")
    assert n.event == event and n.attempt == 2


def test_a_payload_that_is_not_an_event_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        alert_notification(id="x", kind="alert_fired", target=EmailTarget("a@b.example"),
                           payload={"nope": 1}, created_at=0.0)


def test_push_target_from_a_browser_subscription() -> None:
    target = PushTarget.from_subscription(
        {"endpoint": "https://push.example/x", "keys": {"p256dh": "BPk", "auth": "c2VjcmV0"}}, "dev")
    assert (target.endpoint, target.p256dh, target.auth, target.device_id) == (
        "https://push.example/x", "BPk", "c2VjcmV0", "dev")
    assert "c2VjcmV0" not in repr(target)


def test_secrets_stay_out_of_repr() -> None:
    assert "whsec_abc" not in repr(WebhookTarget("https://x.example", ("whsec_abc",)))


@pytest.mark.parametrize(
    ("url", "keep_path", "shown"),
    [
        ("https://hooks.example/in", True, "https://hooks.example/in"),
        ("https://u:p@hooks.example:8443/in?token=1#frag", True, "https://***@hooks.example:8443/in?…"),
        ("https://hooks.slack.com/services/T/B/secret", False, "https://hooks.slack.com/…"),
        ("https://hooks.example", False, "https://hooks.example"),
        ("http://[::1]:80/x", True, "http://[::1]:80/x"),
        ("http://host:99999/x", True, "<invalid url>"),
    ],
)
def test_redact_url(url: str, keep_path: bool, shown: str) -> None:
    assert redact_url(url, keep_path=keep_path) == shown


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        (WebhookTarget("https://a:b@hooks.example/in?x=1", ()), "https://***@hooks.example/in?…"),
        (ChatTarget("https://discord.com/api/webhooks/1/token"), "https://discord.com/…"),
        (PushTarget("https://fcm.googleapis.com/fcm/send/tok", "k", "a"), "https://fcm.googleapis.com/…"),
        (EmailTarget("alice@example.org"), "a***@example.org"),
        (EmailTarget("no-at-sign"), "***"),
    ],
)
def test_redact_target(target: Target, shown: str) -> None:
    assert redact_target(target) == shown
