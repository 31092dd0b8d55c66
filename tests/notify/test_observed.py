"""Metrics and logs around senders: counted by channel and outcome, timed, logged without
secrets; a sender's bug fails one notification, not the worker."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from defiwatch.notify.message import ChannelKind, Notification, WebhookTarget
from defiwatch.notify.observed import observed
from defiwatch.notify.senders.base import Outcome, Reason, Sender, SendResult
from notify.factories import notification

TARGET = WebhookTarget("https://user:hunter2@hooks.example/in?token=abc", ("whsec_secret",))


class Fixed:
    """A sender that answers what it is told (a one-line adapter around a result)."""

    def __init__(self, result: SendResult | Exception) -> None:
        self.result = result

    @property
    def channel(self) -> ChannelKind:
        return ChannelKind.WEBHOOK

    async def send(self, notification: Notification) -> SendResult:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def count(outcome: str) -> float:
    value = REGISTRY.get_sample_value("defiwatch_notify_sends_total",
                                      {"channel": "webhook", "outcome": outcome})
    return value or 0.0


def latency_count() -> float:
    return REGISTRY.get_sample_value("defiwatch_notify_send_seconds_count", {"channel": "webhook"}) or 0.0


def test_wrappers_are_senders() -> None:
    assert isinstance(observed(Fixed(SendResult(Outcome.DELIVERED, Reason.ACCEPTED))), Sender)


@pytest.mark.parametrize(
    ("result", "level"),
    [
        (SendResult(Outcome.DELIVERED, Reason.ACCEPTED, 200, latency_s=0.01), "debug"),
        (SendResult(Outcome.RETRY, Reason.HTTP_STATUS, 503, "HTTP 503"), "warning"),
        (SendResult(Outcome.FAILED_FINAL, Reason.HTTP_STATUS, 400, "HTTP 400"), "error"),
        (SendResult(Outcome.GONE, Reason.HTTP_STATUS, 410, "HTTP 410"), "info"),
    ],
)
async def test_sends_are_counted_timed_and_logged(result: SendResult, level: str) -> None:
    before, timed = count(result.outcome.value), latency_count()
    sender = observed(Fixed(result))
    with capture_logs() as logs:
        got = await sender.send(notification(TARGET, attempt=3))
    assert got == result
    assert count(result.outcome.value) == before + 1
    assert latency_count() == timed + 1
    [entry] = logs
    assert entry["event"] == "notify.send" and entry["log_level"] == level
    assert entry["notification_id"] == "ntf_42" and entry["attempt"] == 3
    assert entry["outcome"] == result.outcome.value and entry["status"] == result.status_code
    assert entry["target"] == "https://***@hooks.example/in?…"
    assert "hunter2" not in str(entry) and "token=abc" not in str(entry) and "whsec" not in str(entry)


async def test_a_bug_fails_one_notification() -> None:
    before = count("failed_final")
    with capture_logs() as logs:
        got = await observed(Fixed(KeyError("oops"))).send(notification(TARGET))
    assert (got.outcome, got.reason) == (Outcome.FAILED_FINAL, Reason.INTERNAL)
    assert count("failed_final") == before + 1
    assert logs[0]["log_level"] == "error" and logs[0]["exc_info"] is True


def test_observed_is_idempotent() -> None:
    once = observed(Fixed(SendResult(Outcome.DELIVERED, Reason.ACCEPTED)))
    assert observed(once) is once
