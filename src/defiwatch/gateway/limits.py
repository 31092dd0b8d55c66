"""Limits of the gateway as pure decisions: values in (with `now`), named outcomes out.

- `TokenBucket`: the node's connect-rate cap (and the arithmetic of the inbound limit).
- `InboundLimiter`: a connection's inbound messages per minute, with a named escalation
  (`Admission.ABUSE`) once a client keeps sending after being told it is limited.
- `ConnectionCounter`: open connections per API key on this node.

No clock is read here: callers pass `now` (monotonic seconds), so tests need no event loop.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable

__all__ = ["ABUSE_STRIKES", "Admission", "ConnectionCounter", "InboundLimiter", "TokenBucket"]

# Rejected messages in a row (no accepted one between) after which the connection is closed
# with 4029: a client that ignores ten `rate_limited` errors is not going to slow down.
ABUSE_STRIKES = 10


class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate` tokens per second.

    Args:
        rate: tokens per second (> 0).
        capacity: the most tokens held, i.e. the largest burst (>= 1).
        now: the current monotonic time, in seconds; the bucket starts full.
    """

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError(f"need rate > 0 and capacity >= 1, got {rate}, {capacity}")
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def retry_after(self, now: float) -> int:
        """Whole seconds until a token is available (>= 1): the HTTP `Retry-After` value."""
        self._refill(now)
        return max(1, math.ceil((1 - self._tokens) / self.rate))


class Admission(enum.Enum):
    """What to do with one inbound message."""

    ACCEPT = "accept"
    REJECT = "reject"  # over the limit: drop it and answer `rate_limited`
    ABUSE = "abuse"  # over the limit ABUSE_STRIKES times in a row: close with 4029


class InboundLimiter:
    """Inbound messages per minute of one connection: a bucket of `per_minute` tokens (so a
    client may spend a minute's allowance in a burst), refilled at `per_minute / 60` per second.

    Args:
        per_minute: messages per minute; 0 accepts none.
        now: monotonic seconds.
        abuse_after: rejected messages in a row that make the next outcome ABUSE.
    """

    def __init__(self, per_minute: int, now: float, *, abuse_after: int = ABUSE_STRIKES) -> None:
        self._bucket = (
            TokenBucket(per_minute / 60.0, float(per_minute), now) if per_minute > 0 else None
        )
        self._abuse_after = abuse_after
        self._strikes = 0

    def admit(self, now: float) -> Admission:
        if self._bucket is not None and self._bucket.take(now):
            self._strikes = 0
            return Admission.ACCEPT
        self._strikes += 1
        return Admission.ABUSE if self._strikes >= self._abuse_after else Admission.REJECT


class ConnectionCounter:
    """Open connections per key on this node (a per-node count: two gateways each allow the
    tier's number; docs/gateway-notes.md says why that is acceptable)."""

    def __init__(self) -> None:
        self._open: dict[Hashable, int] = {}

    def acquire(self, key: Hashable, limit: int) -> bool:
        """Count one more connection of `key` unless it already has `limit` open."""
        current = self._open.get(key, 0)
        if current >= limit:
            return False
        self._open[key] = current + 1
        return True

    def release(self, key: Hashable) -> None:
        current = self._open.get(key, 0)
        if current <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] = current - 1

    def count(self, key: Hashable) -> int:
        return self._open.get(key, 0)
