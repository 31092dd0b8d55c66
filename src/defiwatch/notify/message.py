"""The notification value: what one delivery attempt sends, to whom, and why.

A `Notification` is built by the outbox worker from a `notification_logs` row (and, for secrets
and device keys, from the tables that own them). Senders only read it. Its `id` is the
idempotency key: the same on every attempt of one row, so receivers can drop duplicates
(webhook `webhook-id`, email `Message-ID`, push `Topic` where it fits).

Targets are typed per channel; the channel kind of a notification is the kind of its target.
Secrets (webhook signing keys, push `auth`) are excluded from `repr`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from defiwatch.domain.events import Event

__all__ = [
    "ChannelKind",
    "ChatFlavour",
    "ChatTarget",
    "EmailTarget",
    "Notification",
    "NotificationKind",
    "PushTarget",
    "RuleRef",
    "Target",
    "WebhookTarget",
    "alert_notification",
]


class ChannelKind(enum.StrEnum):
    """The delivery channel; also the `channel` column of notification_logs."""

    WEBHOOK = "webhook"
    EMAIL = "email"
    PUSH = "push"
    CHAT = "chat"


class NotificationKind(enum.StrEnum):
    """Why a notification exists; the webhook payload `type` and the email template name."""

    ALERT_FIRED = "alert_fired"
    ALERT_RESOLVED = "alert_resolved"
    TEST = "test"  # a user asked to test a channel
    ENDPOINT_DISABLED = "endpoint_disabled"  # told on another channel when one is switched off
    DIGEST = "digest"  # several events in one message


class ChatFlavour(enum.StrEnum):
    """Message format of a chat incoming webhook. Slack's is also spoken by Mattermost,
    Rocket.Chat and others, so it is the fallback."""

    SLACK = "slack"
    DISCORD = "discord"


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """A Standard Webhooks endpoint.

    `secrets` are `whsec_...` signing secrets, current first. During a rotation the old ones
    stay listed until they expire: every listed secret signs (Standard Webhooks allows several
    space-separated signatures), so receivers verifying with either keep working.
    """

    channel: ClassVar[ChannelKind] = ChannelKind.WEBHOOK
    url: str
    secrets: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class EmailTarget:
    channel: ClassVar[ChannelKind] = ChannelKind.EMAIL
    address: str


@dataclass(frozen=True, slots=True)
class PushTarget:
    """A Web Push subscription (`PushSubscription.toJSON()` in the browser): the push service
    `endpoint` and the subscriber's keys, base64url (`p256dh`: P-256 public key, uncompressed
    point; `auth`: 16-byte secret). `device_id` names the user_devices row to disable on `gone`."""

    channel: ClassVar[ChannelKind] = ChannelKind.PUSH
    endpoint: str
    p256dh: str = field(repr=False)
    auth: str = field(repr=False)
    device_id: str | None = None

    @classmethod
    def from_subscription(cls, subscription: Mapping[str, Any], device_id: str | None = None
                          ) -> PushTarget:
        """From `{endpoint, keys: {p256dh, auth}}` as the browser gives it.

        Raises:
            KeyError, TypeError: the subscription lacks a field (validate it where it is stored).
        """
        keys = subscription["keys"]
        return cls(endpoint=str(subscription["endpoint"]), p256dh=str(keys["p256dh"]),
                   auth=str(keys["auth"]), device_id=device_id)


@dataclass(frozen=True, slots=True)
class ChatTarget:
    """A chat incoming-webhook URL. `flavour` None means: pick from the URL
    (`senders.chat.flavour_for`)."""

    channel: ClassVar[ChannelKind] = ChannelKind.CHAT
    url: str
    flavour: ChatFlavour | None = None


Target = WebhookTarget | EmailTarget | PushTarget | ChatTarget


@dataclass(frozen=True, slots=True)
class RuleRef:
    """The rule a notification is about, as shown to people and in webhook payloads."""

    id: int | None
    name: str
    severity: str = "warning"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "severity": self.severity}


@dataclass(frozen=True, slots=True)
class Notification:
    """One message to one target.

    Attributes:
        id: idempotency key, stable across attempts (e.g. `ntf_{notification_logs.id}`).
        kind: why it is sent (template and webhook `type`).
        target: where it goes; `channel` follows from it.
        rule: the rule it is about (None for some `test` and `digest` messages).
        events: the event(s) it reports, in the one event shape; one for alert_fired /
            alert_resolved / test, several for digest, none for endpoint_disabled.
        created_at: when the notification was queued, epoch seconds; the webhook payload
            `timestamp`, so every attempt sends the same body.
        attempt: 1-based number of this attempt (1 = first try).
        detail: kind-specific extras (endpoint_disabled: `channel`, `target`, `reason`;
            digest: `since`, `until` epoch seconds). JSON-ready values only.
    """

    id: str
    kind: NotificationKind
    target: Target
    rule: RuleRef | None = None
    events: tuple[Event, ...] = ()
    created_at: float = 0.0
    attempt: int = 1
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def channel(self) -> ChannelKind:
        return self.target.channel

    @property
    def event(self) -> Event | None:
        """The first (for all kinds but digest: the only) event."""
        return self.events[0] if self.events else None


def alert_notification(
    *,
    id: str,
    kind: NotificationKind | str,
    target: Target,
    payload: Mapping[str, Any],
    created_at: float,
    attempt: int = 1,
) -> Notification:
    """A notification from a notification_logs row written by the alert engine.

    Args:
        id: the idempotency key (e.g. `ntf_{row id}`).
        kind: the row's `kind` (alert_fired, alert_resolved).
        target: built by the worker from the row's `channel`/`target`/`config` plus the
            secrets or device keys it owns.
        payload: the row's `payload`: the alert event, whose `detail` names the rule
            (`rule_id`, `rule_name`, `severity`).
        created_at: the row's `created_at`, epoch seconds.
        attempt: 1-based number of this attempt (the row's `attempt` + 1).

    Raises:
        msgspec.ValidationError: the payload is not an event.
    """
    event = msgspec.convert(dict(payload), Event)
    detail = event.detail or {}
    rule = RuleRef(
        id=detail.get("rule_id"),
        name=str(detail.get("rule_name") or "unnamed rule"),
        severity=str(detail.get("severity") or "warning"),
    )
    return Notification(id=id, kind=NotificationKind(kind), target=target, rule=rule,
                        events=(event,), created_at=created_at, attempt=attempt)
