"""Prometheus metrics of notification delivery. Process-global, defined once; updated by
`observed()` around every sender, so each channel is counted the same way."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["SENDS", "SEND_SECONDS"]

SENDS = Counter(
    "defiwatch_notify_sends",
    "Notification send attempts by channel (webhook, email, push, chat) and outcome "
    "(delivered, retry, failed_final, gone).",
    ["channel", "outcome"],
)
SEND_SECONDS = Histogram(
    "defiwatch_notify_send_seconds",
    "Duration of one send attempt's I/O by channel, seconds (DNS, connect, TLS, request, answer).",
    ["channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
