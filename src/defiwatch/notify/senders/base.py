"""The sender interface: one method, one result that says whether to try again.

A sender knows one channel's wire format. It does not decide *when* to retry, does not count
attempts and does not consult the circuit breaker: the retry policy (`notify.retry`) and the
breaker (`notify.breaker`) live once, in the delivery pipeline that calls `send`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from defiwatch.notify.message import ChannelKind, Notification

__all__ = ["Closer", "Outcome", "Reason", "SendResult", "Sender"]


class Outcome(enum.StrEnum):
    """What the pipeline should do with a notification after one attempt."""

    DELIVERED = "delivered"  # the receiver accepted it: done
    RETRY = "retry"  # a temporary failure: try again later (bounded by the retry policy)
    FAILED_FINAL = "failed_final"  # retrying cannot help: record the failure, stop
    GONE = "gone"  # the target no longer exists (push 404/410): stop and disable the device


class Reason(enum.StrEnum):
    """Why an attempt ended as it did (logs, `notification_logs.last_error`, breaker input)."""

    ACCEPTED = "accepted"  # 2xx, or the SMTP server queued the message
    HTTP_STATUS = "http_status"  # a non-2xx answer; see `status_code`
    REDIRECT = "redirect"  # a 3xx: redirects are not followed (they could lead anywhere)
    TIMEOUT = "timeout"  # connect, write, read or pool timeout
    NETWORK = "network"  # DNS, refused, reset, TLS handshake
    PROTOCOL = "protocol"  # the peer broke HTTP or SMTP
    BLOCKED = "blocked"  # the SSRF guard refused the destination address
    INVALID_TARGET = "invalid_target"  # malformed URL, subscription or address
    SMTP_REJECTED = "smtp_rejected"  # the SMTP server answered 4xx/5xx; see `status_code`
    NOT_CONFIGURED = "not_configured"  # the channel lacks settings (SMTP, VAPID key)
    INTERNAL = "internal"  # a bug on our side (logged with its traceback)


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one attempt.

    Attributes:
        outcome: what to do next.
        reason: why, as a named reason.
        status_code: the HTTP status or SMTP reply code, when the peer answered.
        error: a one-line description without secrets or full URLs; None when delivered.
        latency_s: wall time of the attempt's I/O, seconds.
        retry_after_s: how long the receiver asked us to wait (HTTP Retry-After on 429/503),
            seconds from the end of the attempt; None when it did not say.
    """

    outcome: Outcome
    reason: Reason
    status_code: int | None = None
    error: str | None = None
    latency_s: float = 0.0
    retry_after_s: float | None = None

    @property
    def retryable(self) -> bool:
        return self.outcome is Outcome.RETRY

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.DELIVERED


@runtime_checkable
class Sender(Protocol):
    """Delivers notifications of one channel kind.

    Guarantees:
        - `send` makes one attempt (no retries inside) and never blocks the event loop.
        - Whatever the receiver, the network or the target does, `send` returns a SendResult;
          it raises only on cancellation and on bugs (`observed()` turns a bug into
          `failed_final`/`internal` and logs its traceback).
        - It never logs or returns secrets, and names URLs only redacted.
        - It is safe to call concurrently.
    """

    @property
    def channel(self) -> ChannelKind:
        """The channel kind this sender delivers."""
        ...

    async def send(self, notification: Notification) -> SendResult:
        """Attempt delivery of `notification` once.

        Args:
            notification: its `target` must be of this sender's channel kind.

        Returns:
            The outcome, with reason, status code, latency and any Retry-After.
        """
        ...


@runtime_checkable
class Closer(Protocol):
    """Optional capability: a sender holding connections releases them on `aclose`."""

    async def aclose(self) -> None: ...
