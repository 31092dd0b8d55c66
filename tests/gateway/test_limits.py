"""Pure limit decisions: values and `now` in, named outcomes out."""

from __future__ import annotations

import pytest

from defiwatch.gateway.limits import (
    ABUSE_STRIKES,
    Admission,
    ConnectionCounter,
    InboundLimiter,
    TokenBucket,
)


def test_token_bucket_bursts_then_refills() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(0.0) == 1
    assert bucket.take(0.5) is True  # one token per 0.5 s
    assert bucket.take(0.5) is False
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_token_bucket_retry_after_is_whole_seconds() -> None:
    bucket = TokenBucket(rate=0.1, capacity=1, now=0.0)
    assert bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.retry_after(0.0) == 10
    assert bucket.retry_after(9.5) == 1


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (1, 0.5), (-1, 5)])
def test_token_bucket_refuses_nonsense(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity, 0.0)


def test_inbound_limiter_rejects_then_calls_it_abuse() -> None:
    limiter = InboundLimiter(per_minute=5, now=0.0)
    assert [limiter.admit(0.0) for _ in range(5)] == [Admission.ACCEPT] * 5
    outcomes = [limiter.admit(0.0) for _ in range(ABUSE_STRIKES)]
    assert outcomes == [Admission.REJECT] * (ABUSE_STRIKES - 1) + [Admission.ABUSE]


def test_inbound_limiter_forgives_a_client_that_slows_down() -> None:
    limiter = InboundLimiter(per_minute=60, now=0.0, abuse_after=3)
    for _ in range(60):
        assert limiter.admit(0.0) is Admission.ACCEPT
    assert [limiter.admit(0.0), limiter.admit(0.0)] == [Admission.REJECT] * 2
    assert limiter.admit(1.0) is Admission.ACCEPT  # a token came back: strikes reset
    assert [limiter.admit(1.0), limiter.admit(1.0)] == [Admission.REJECT] * 2
    assert limiter.admit(1.0) is Admission.ABUSE


def test_inbound_limiter_zero_accepts_nothing() -> None:
    limiter = InboundLimiter(per_minute=0, now=0.0, abuse_after=2)
    assert [limiter.admit(9.0), limiter.admit(99.0)] == [Admission.REJECT, Admission.ABUSE]


def test_connection_counter() -> None:
    counter = ConnectionCounter()
    assert counter.acquire("k", 2) and counter.acquire("k", 2)
    assert not counter.acquire("k", 2)
    assert counter.acquire("other", 2)
    counter.release("k")
    assert counter.count("k") == 1 and counter.acquire("k", 2)
    counter.release("k")
    counter.release("k")
    counter.release("k")  # extra releases never go negative
    assert counter.count("k") == 0
    assert not counter.acquire("none", 0)
