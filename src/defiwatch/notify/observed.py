"""Metrics and logs around any sender, written once for every channel.

Log events (structlog), all named `notify.send`, with `notification_id`, `channel`, `kind`,
`attempt`, `outcome`, `reason`, `status`, `latency_ms`, the redacted `target` and `error`:

    debug    delivered
    info     gone (a push subscription expired: expected churn)
    warning  retry (a temporary failure; the pipeline will try again)
    error    failed_final, and bugs (`internal`, with the traceback)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from defiwatch.notify.metrics import SEND_SECONDS, SENDS
from defiwatch.notify.redact import redact_target
from defiwatch.notify.senders.base import Closer, Outcome, Reason, Sender, SendResult

if TYPE_CHECKING:
    from defiwatch.notify.message import ChannelKind, Notification

__all__ = ["ObservedSender", "observed"]

log = structlog.get_logger("defiwatch.notify")

_LEVEL = {
    Outcome.DELIVERED: "debug",
    Outcome.GONE: "info",
    Outcome.RETRY: "warning",
    Outcome.FAILED_FINAL: "error",
}


class ObservedSender:
    """A sender that counts, times and logs each attempt of the sender it wraps."""

    def __init__(self, inner: Sender) -> None:
        self.inner = inner

    @property
    def channel(self) -> ChannelKind:
        return self.inner.channel

    async def send(self, notification: Notification) -> SendResult:
        started = time.perf_counter()
        try:
            result = await self.inner.send(notification)
        except Exception as exc:  # a bug: one notification fails, the worker goes on
            result = SendResult(Outcome.FAILED_FINAL, Reason.INTERNAL,
                                error=f"internal error ({type(exc).__name__})",
                                latency_s=time.perf_counter() - started)
            log.exception("notify.send", **_fields(notification, result))
        else:
            getattr(log, _LEVEL[result.outcome])("notify.send", **_fields(notification, result))
        SENDS.labels(self.channel.value, result.outcome.value).inc()
        SEND_SECONDS.labels(self.channel.value).observe(result.latency_s)
        return result

    async def aclose(self) -> None:
        if isinstance(self.inner, Closer):
            await self.inner.aclose()


def observed(sender: Sender) -> ObservedSender:
    """Wrap `sender` with metrics and logs (idempotent)."""
    return sender if isinstance(sender, ObservedSender) else ObservedSender(sender)


def _fields(notification: Notification, result: SendResult) -> dict[str, object]:
    return {
        "notification_id": notification.id,
        "channel": notification.channel.value,
        "kind": notification.kind.value,
        "attempt": notification.attempt,
        "outcome": result.outcome.value,
        "reason": result.reason.value,
        "status": result.status_code,
        "latency_ms": round(result.latency_s * 1000, 1),
        "target": redact_target(notification.target),
        "error": result.error,
    }
