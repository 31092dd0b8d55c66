"""Retry policy and status classification: values in, values out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from defiwatch.notify.retry import (
    Action,
    RetryPolicy,
    classify_http,
    classify_smtp,
    decide,
    parse_retry_after,
)
from defiwatch.notify.senders.base import Outcome, Reason, SendResult

NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("status", "retry_after", "outcome", "reason", "wait"),
    [
        (200, None, Outcome.DELIVERED, Reason.ACCEPTED, None),
        (201, None, Outcome.DELIVERED, Reason.ACCEPTED, None),
        (204, None, Outcome.DELIVERED, Reason.ACCEPTED, None),
        (301, None, Outcome.FAILED_FINAL, Reason.REDIRECT, None),
        (302, None, Outcome.FAILED_FINAL, Reason.REDIRECT, None),
        (307, None, Outcome.FAILED_FINAL, Reason.REDIRECT, None),
        (400, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (401, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (403, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (404, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (410, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (413, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (408, None, Outcome.RETRY, Reason.HTTP_STATUS, None),
        (429, None, Outcome.RETRY, Reason.HTTP_STATUS, None),
        (429, "120", Outcome.RETRY, Reason.HTTP_STATUS, 120.0),
        (429, "Wed, 21 Oct 2015 07:30:00 GMT", Outcome.RETRY, Reason.HTTP_STATUS, 120.0),
        (503, "7", Outcome.RETRY, Reason.HTTP_STATUS, 7.0),
        (503, "soon", Outcome.RETRY, Reason.HTTP_STATUS, None),
        (500, "30", Outcome.RETRY, Reason.HTTP_STATUS, None),  # honoured on 429/503 only
        (502, None, Outcome.RETRY, Reason.HTTP_STATUS, None),
        (504, None, Outcome.RETRY, Reason.HTTP_STATUS, None),
        (599, None, Outcome.RETRY, Reason.HTTP_STATUS, None),
        (100, None, Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
    ],
)
def test_http_classification(status: int, retry_after: str | None, outcome: Outcome,
                             reason: Reason, wait: float | None) -> None:
    got = classify_http(status, retry_after=retry_after, now=NOW)
    assert (got.outcome, got.reason, got.retry_after_s) == (outcome, reason, wait)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(404, Outcome.GONE), (410, Outcome.GONE), (201, Outcome.DELIVERED), (400, Outcome.FAILED_FINAL),
     (429, Outcome.RETRY), (500, Outcome.RETRY)],
)
def test_gone_statuses_for_push(status: int, outcome: Outcome) -> None:
    assert classify_http(status, gone={404, 410}).outcome is outcome


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("  42 ", 42.0),
        ("-5", None),
        ("1.5", None),  # delay-seconds is an integer
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 08:28:00 GMT", 3600.0),
        ("Tue, 20 Oct 2015 07:28:00 GMT", 0.0),  # in the past: now
        ("Wednesday, 21-Oct-15 07:29:00 GMT", 60.0),  # RFC 850, obsolete but allowed
        ("not a date", None),
    ],
)
def test_retry_after_parsing(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(250, Outcome.DELIVERED), (354, Outcome.DELIVERED), (421, Outcome.RETRY), (450, Outcome.RETRY),
     (451, Outcome.RETRY), (452, Outcome.RETRY), (550, Outcome.FAILED_FINAL),
     (552, Outcome.FAILED_FINAL), (554, Outcome.FAILED_FINAL), (-1, Outcome.RETRY)],
)
def test_smtp_classification(code: int, outcome: Outcome) -> None:
    assert classify_smtp(code) is outcome


def test_default_schedule_is_eight_attempts_over_about_a_day() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 8
    assert policy.ceilings() == (10.0, 60.0, 360.0, 2160.0, 12960.0, 36000.0, 36000.0)
    assert 20 * 3600 <= sum(policy.ceilings()) <= 28 * 3600


@pytest.mark.parametrize(
    ("attempt", "u", "delay"),
    [(1, 0.0, 1.0), (1, 0.5, 5.0), (1, 0.999, 9.99), (2, 0.5, 30.0), (3, 0.25, 90.0),
     (7, 0.5, 18_000.0), (50, 0.5, 18_000.0), (10_000, 0.999, 35_964.0)],
)
def test_full_jitter_delay(attempt: int, u: float, delay: float) -> None:
    assert RetryPolicy().delay(attempt, u) == pytest.approx(delay)


@given(attempt=st.integers(1, 10_000), u=st.floats(0, 1, exclude_max=True),
       multiplier=st.floats(1, 1e6), base=st.floats(1, 1e4))
def test_delay_is_bounded(attempt: int, u: float, multiplier: float, base: float) -> None:
    policy = RetryPolicy(base_delay_s=base, multiplier=multiplier, max_delay_s=base * 100)
    delay = policy.delay(attempt, u)
    assert policy.min_delay_s <= delay <= policy.max_delay_s
    assert delay <= max(policy.min_delay_s, policy.ceiling(attempt))


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"multiplier": 0.5}, {"base_delay_s": 10, "max_delay_s": 5},
     {"min_delay_s": 20, "base_delay_s": 10}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def result(outcome: Outcome, *, retry_after: float | None = None, status: int | None = None
           ) -> SendResult:
    reason = Reason.ACCEPTED if outcome is Outcome.DELIVERED else Reason.HTTP_STATUS
    return SendResult(outcome, reason, status_code=status, retry_after_s=retry_after)


@pytest.mark.parametrize(
    ("outcome", "attempt", "retry_after", "action", "delay"),
    [
        (Outcome.DELIVERED, 1, None, Action.DONE, None),
        (Outcome.DELIVERED, 8, None, Action.DONE, None),
        (Outcome.GONE, 1, None, Action.DISABLE, None),
        (Outcome.FAILED_FINAL, 1, None, Action.GIVE_UP, None),
        (Outcome.RETRY, 1, None, Action.RETRY, 5.0),
        (Outcome.RETRY, 3, None, Action.RETRY, 180.0),
        (Outcome.RETRY, 7, None, Action.RETRY, 18_000.0),
        (Outcome.RETRY, 8, None, Action.GIVE_UP, None),  # bounded: the 8th attempt was the last
        (Outcome.RETRY, 1, 120.0, Action.RETRY, 120.0),  # Retry-After is a floor
        (Outcome.RETRY, 5, 120.0, Action.RETRY, 6_480.0),  # ... not a ceiling
        (Outcome.RETRY, 1, 10 * 86_400.0, Action.RETRY, 36_000.0),  # capped at max_delay_s
        (Outcome.RETRY, 8, 120.0, Action.GIVE_UP, None),
    ],
)
def test_decide(outcome: Outcome, attempt: int, retry_after: float | None, action: Action,
                delay: float | None) -> None:
    decision = decide(result(outcome, retry_after=retry_after), attempt, RetryPolicy(), 0.5)
    assert decision.action is action
    assert decision.delay_s == (pytest.approx(delay) if delay is not None else None)
    assert decision.why
