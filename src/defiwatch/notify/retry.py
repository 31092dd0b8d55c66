"""Retry policy and status classification, in one place for every channel. Pure: no I/O, no
clock (`now` and the jitter draw `u` are arguments).

Classification (HTTP, RFC 9110):

    2xx                      delivered
    3xx                      failed_final  (redirects are not followed: they could lead anywhere)
    408, 429, 5xx            retry         (429 and 503 honour Retry-After: seconds or HTTP-date)
    other 4xx                failed_final  (the request will not get better by repeating it)
    `gone` statuses          gone          (Web Push: 404 and 410 mean the subscription expired)

SMTP (RFC 5321 4.2.1): 2xx/3xx accepted, 4xx transient (retry), 5xx permanent (failed_final).

Backoff: exponential ceilings with *full jitter* (the wait is uniform in [0, ceiling], AWS
Architecture Blog, "Exponential Backoff And Jitter"): receivers recovering from an outage are not
hit by every sender at once. Defaults: 8 attempts; ceilings 10 s, 1 min, 6 min, 36 min, 3.6 h,
10 h, 10 h: at most ~24 h from the first attempt to the last (mean ~12 h), close to the Standard
Webhooks reference schedule.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from defiwatch.notify.senders.base import Outcome, Reason, SendResult

__all__ = [
    "RETRY_AFTER_STATUSES",
    "Action",
    "Classification",
    "Decision",
    "RetryPolicy",
    "classify_http",
    "classify_smtp",
    "decide",
    "parse_retry_after",
]

RETRY_AFTER_STATUSES = frozenset({429, 503})
_RETRY_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Classification:
    outcome: Outcome
    reason: Reason
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 10.2.3), never negative.

    Args:
        value: the header: delay-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`).
        now: the current time, epoch seconds (for an HTTP-date).

    Returns:
        Seconds, or None when absent or unparseable (then the backoff schedule applies).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def classify_http(
    status: int,
    *,
    retry_after: str | None = None,
    now: float = 0.0,
    gone: Collection[int] = (),
) -> Classification:
    """The outcome of an HTTP answer.

    Args:
        status: the response status code.
        retry_after: the Retry-After header, honoured for 429 and 503 only.
        now: current time, epoch seconds (for an HTTP-date Retry-After).
        gone: statuses that mean the target no longer exists (Web Push: 404, 410).
    """
    if 200 <= status < 300:
        return Classification(Outcome.DELIVERED, Reason.ACCEPTED)
    if status in gone:
        return Classification(Outcome.GONE, Reason.HTTP_STATUS)
    if 300 <= status < 400:
        return Classification(Outcome.FAILED_FINAL, Reason.REDIRECT)
    if status in RETRY_AFTER_STATUSES:
        return Classification(Outcome.RETRY, Reason.HTTP_STATUS, parse_retry_after(retry_after, now))
    if status in _RETRY_4XX or status >= 500:
        return Classification(Outcome.RETRY, Reason.HTTP_STATUS)
    # 4xx, and 1xx which a final response never is: the receiver will not change its mind.
    return Classification(Outcome.FAILED_FINAL, Reason.HTTP_STATUS)


def classify_smtp(code: int) -> Outcome:
    """The outcome of an SMTP reply code (RFC 5321 4.2.1); -1 (no code) means the connection
    broke, which is transient."""
    if 200 <= code < 400:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.FAILED_FINAL
    return Outcome.RETRY


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter.

    Attributes:
        max_attempts: attempts in all, the first included (1 = never retry).
        base_delay_s: ceiling of the wait after the first attempt, seconds.
        multiplier: growth of the ceiling per attempt.
        max_delay_s: cap of every wait (Retry-After included), seconds.
        min_delay_s: floor of every wait, seconds, so that a jitter draw near 0 does not retry
            a failing receiver at once.
    """

    max_attempts: int = 8
    base_delay_s: float = 10.0
    multiplier: float = 6.0
    max_delay_s: float = 36_000.0
    min_delay_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.min_delay_s <= self.base_delay_s <= self.max_delay_s:
            raise ValueError("need 0 <= min_delay_s <= base_delay_s <= max_delay_s")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the wait after attempt number `attempt` (1-based), seconds."""
        exponent = min(max(0, attempt - 1), 1_000)
        try:
            return min(self.max_delay_s, self.base_delay_s * self.multiplier**exponent)
        except OverflowError:  # a huge multiplier: the cap was reached long before
            return self.max_delay_s

    def delay(self, attempt: int, u: float) -> float:
        """The wait after attempt `attempt`: `u` in [0, 1) scales the ceiling (full jitter)."""
        return min(self.max_delay_s, max(self.min_delay_s, u * self.ceiling(attempt)))

    def ceilings(self) -> tuple[float, ...]:
        """The ceilings of every wait in order (max_attempts - 1 of them)."""
        return tuple(self.ceiling(n) for n in range(1, self.max_attempts))


class Action(enum.StrEnum):
    DONE = "done"  # delivered: mark sent
    RETRY = "retry"  # schedule attempt + 1 after `delay_s`
    GIVE_UP = "give_up"  # failed for good: mark failed
    DISABLE = "disable"  # the target is gone: mark failed and disable the target


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float | None = None  # for RETRY: seconds from now until the next attempt
    why: str = ""  # short, for logs and last_error


def decide(result: SendResult, attempt: int, policy: RetryPolicy, u: float) -> Decision:
    """What to do after attempt number `attempt` (1-based) ended with `result`.

    Args:
        result: the sender's result.
        attempt: which attempt it was.
        policy: bounds and growth of the waits.
        u: a uniform draw in [0, 1) for the jitter (`random.random()`).
    """
    if result.outcome is Outcome.DELIVERED:
        return Decision(Action.DONE, why="delivered")
    if result.outcome is Outcome.GONE:
        return Decision(Action.DISABLE, why="target gone")
    if result.outcome is Outcome.FAILED_FINAL:
        return Decision(Action.GIVE_UP, why=f"final failure ({result.reason})")
    if attempt >= policy.max_attempts:
        return Decision(Action.GIVE_UP, why=f"gave up after {attempt} attempts ({result.reason})")
    wait = policy.delay(attempt, u)
    if result.retry_after_s is not None:
        # The receiver's Retry-After is a floor; the jittered wait may exceed it, which spreads
        # the senders it told to come back at the same moment. Both stay under the cap.
        wait = min(policy.max_delay_s, max(wait, result.retry_after_s))
    return Decision(Action.RETRY, delay_s=wait, why=f"retry ({result.reason})")
