"""Notification delivery: the building blocks of the notifier role.

    Notification (message.py) ──> Sender.send (senders/) ──> SendResult
                                        │                        │
           CircuitBreaker.admit (breaker.py)            decide (retry.py) ──> done / retry at /
                                                                              give up / disable

Senders make one attempt and classify it; the retry policy and the circuit breaker are pure and
live once, for the outbox worker to consult. Outgoing HTTP goes through the SSRF guard
(ssrf.py). See docs/notify-notes.md.
"""

from defiwatch.notify.breaker import (
    Admission,
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    breaker_key,
)
from defiwatch.notify.factory import Senders, build_senders, retry_policy
from defiwatch.notify.message import (
    ChannelKind,
    ChatFlavour,
    ChatTarget,
    EmailTarget,
    Notification,
    NotificationKind,
    PushTarget,
    RuleRef,
    Target,
    WebhookTarget,
    alert_notification,
)
from defiwatch.notify.observed import observed
from defiwatch.notify.redact import redact_target, redact_url
from defiwatch.notify.retry import Action, Decision, RetryPolicy, decide
from defiwatch.notify.senders.base import Outcome, Reason, Sender, SendResult
from defiwatch.notify.senders.webhook import generate_webhook_secret, rotate_webhook_secrets
from defiwatch.notify.senders.webpush import VapidKey
from defiwatch.notify.ssrf import AddressGuard, AllowList, BlockedDestination

__all__ = [
    "Action",
    "AddressGuard",
    "Admission",
    "AllowList",
    "BlockedDestination",
    "BreakerPolicy",
    "ChannelKind",
    "ChatFlavour",
    "ChatTarget",
    "CircuitBreaker",
    "CircuitState",
    "Decision",
    "EmailTarget",
    "Notification",
    "NotificationKind",
    "Outcome",
    "PushTarget",
    "Reason",
    "RetryPolicy",
    "RuleRef",
    "SendResult",
    "Sender",
    "Senders",
    "Target",
    "VapidKey",
    "WebhookTarget",
    "alert_notification",
    "breaker_key",
    "build_senders",
    "decide",
    "generate_webhook_secret",
    "observed",
    "redact_target",
    "redact_url",
    "retry_policy",
    "rotate_webhook_secrets",
]
