"""Circuit breaker: transitions as a table, then the per-key registry."""

from __future__ import annotations

import pytest

from defiwatch.notify.breaker import (
    Admission,
    BreakerPolicy,
    Circuit,
    CircuitBreaker,
    CircuitState,
    Signal,
    admit,
    breaker_key,
    record,
    signal_for,
)
from defiwatch.notify.message import ChatTarget, EmailTarget, PushTarget, Target, WebhookTarget
from defiwatch.notify.senders.base import Outcome, Reason, SendResult

POLICY = BreakerPolicy(failure_threshold=3, open_s=60.0, max_open_s=200.0, probe_timeout_s=30.0)
CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
S, F, N = Signal.SUCCESS, Signal.FAILURE, Signal.NEUTRAL


@pytest.mark.parametrize(
    ("before", "signal", "now", "after"),
    [
        (Circuit(), S, 0, Circuit()),
        (Circuit(), N, 0, Circuit()),
        (Circuit(), F, 0, Circuit(CLOSED, 1)),
        (Circuit(CLOSED, 1), F, 5, Circuit(CLOSED, 2)),
        (Circuit(CLOSED, 2), F, 5, Circuit(OPEN, 3, 60.0, 65.0)),  # threshold reached
        (Circuit(CLOSED, 2), S, 5, Circuit()),  # consecutive failures only
        (Circuit(CLOSED, 2), N, 5, Circuit(CLOSED, 2)),  # a 429 neither opens nor heals
        (Circuit(OPEN, 3, 60.0, 65.0), F, 10, Circuit(OPEN, 4, 60.0, 65.0)),  # straggler
        (Circuit(OPEN, 3, 60.0, 65.0), S, 10, Circuit()),  # a straggler got through: alive
        (Circuit(HALF, 3, 60.0, 65.0, 95.0), S, 70, Circuit()),  # probe succeeded
        (Circuit(HALF, 3, 60.0, 65.0, 95.0), F, 70, Circuit(OPEN, 4, 120.0, 190.0)),  # doubled
        (Circuit(HALF, 4, 120.0, 190.0, 220.0), F, 200, Circuit(OPEN, 5, 200.0, 400.0)),  # capped
        (Circuit(HALF, 3, 60.0, 65.0, 95.0), N, 70, Circuit(HALF, 3, 60.0, 65.0, None)),
    ],
)
def test_record(before: Circuit, signal: Signal, now: float, after: Circuit) -> None:
    assert record(before, POLICY, signal, now) == after


@pytest.mark.parametrize(
    ("before", "now", "admission", "after"),
    [
        (Circuit(), 0, Admission.ALLOW, Circuit()),
        (Circuit(CLOSED, 2), 0, Admission.ALLOW, Circuit(CLOSED, 2)),
        (Circuit(OPEN, 3, 60.0, 65.0), 64.9, Admission.REJECT, Circuit(OPEN, 3, 60.0, 65.0)),
        (Circuit(OPEN, 3, 60.0, 65.0), 65, Admission.PROBE, Circuit(HALF, 3, 60.0, 65.0, 95.0)),
        (Circuit(HALF, 3, 60.0, 65.0, 95.0), 80, Admission.REJECT, Circuit(HALF, 3, 60.0, 65.0, 95.0)),
        # the probe never reported: after its lease another one goes
        (Circuit(HALF, 3, 60.0, 65.0, 95.0), 95, Admission.PROBE, Circuit(HALF, 3, 60.0, 65.0, 125.0)),
        (Circuit(HALF, 3, 60.0, 65.0, None), 96, Admission.PROBE, Circuit(HALF, 3, 60.0, 65.0, 126.0)),
    ],
)
def test_admit(before: Circuit, now: float, admission: Admission, after: Circuit) -> None:
    assert admit(before, POLICY, now) == (admission, after)


@pytest.mark.parametrize(
    ("result", "signal"),
    [
        (SendResult(Outcome.DELIVERED, Reason.ACCEPTED, 200), S),
        (SendResult(Outcome.FAILED_FINAL, Reason.HTTP_STATUS, 404), S),  # it answered
        (SendResult(Outcome.GONE, Reason.HTTP_STATUS, 410), S),
        (SendResult(Outcome.RETRY, Reason.HTTP_STATUS, 503), F),
        (SendResult(Outcome.RETRY, Reason.HTTP_STATUS, 408), F),
        (SendResult(Outcome.RETRY, Reason.TIMEOUT), F),
        (SendResult(Outcome.RETRY, Reason.NETWORK), F),
        (SendResult(Outcome.RETRY, Reason.HTTP_STATUS, 429), N),
        (SendResult(Outcome.FAILED_FINAL, Reason.BLOCKED), N),
        (SendResult(Outcome.FAILED_FINAL, Reason.INVALID_TARGET), N),
        (SendResult(Outcome.FAILED_FINAL, Reason.NOT_CONFIGURED), N),
        (SendResult(Outcome.FAILED_FINAL, Reason.INTERNAL), N),
    ],
)
def test_signal_for(result: SendResult, signal: Signal) -> None:
    assert signal_for(result) is signal


@pytest.mark.parametrize(
    ("target", "key"),
    [
        (WebhookTarget("https://Hooks.Example.com/a?b=c", ("whsec_x",)), "hooks.example.com"),
        (WebhookTarget("http://10.0.0.1:8080/x", ()), "10.0.0.1:8080"),
        (ChatTarget("https://hooks.slack.com/services/T/B/C"), "hooks.slack.com"),
        (PushTarget("https://fcm.googleapis.com/fcm/send/abc", "k", "a"), "fcm.googleapis.com"),
        (EmailTarget("ops@example.com"), "smtp"),
    ],
)
def test_breaker_key(target: Target, key: str) -> None:
    assert breaker_key(target) == key


def test_registry_opens_probes_and_closes_per_host() -> None:
    breaker = CircuitBreaker(POLICY)
    down = SendResult(Outcome.RETRY, Reason.TIMEOUT)
    for t in range(3):
        assert breaker.admit("a", t) is Admission.ALLOW
        breaker.record("a", down, t)
    assert breaker.state("a") is OPEN and breaker.retry_at("a") == 62.0
    assert breaker.admit("a", 10) is Admission.REJECT
    assert breaker.admit("b", 10) is Admission.ALLOW  # other hosts are not affected
    assert breaker.admit("a", 62) is Admission.PROBE
    assert breaker.admit("a", 63) is Admission.REJECT  # one probe at a time
    assert breaker.retry_at("a") == 92.0
    assert breaker.record("a", SendResult(Outcome.DELIVERED, Reason.ACCEPTED, 200), 64) is CLOSED
    assert breaker.admit("a", 64) is Admission.ALLOW
    assert len(breaker) == 0  # healthy hosts are not kept
    assert breaker.retry_at("a") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"open_s": 0}, {"open_s": 10, "max_open_s": 5},
     {"probe_timeout_s": 0}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]
