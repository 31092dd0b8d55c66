"""Prometheus metrics of the gateway. Process-global, defined once, shared by every Gateway
and Hub in the process (several in tests; one per process in production).

Per-frame work on the hot path updates no metric: the hub counts the frames of one event and
adds them in one `inc`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CLOSES",
    "CONNECTIONS",
    "CONNECTIONS_OPENED",
    "EVENTS_ROUTED",
    "EVENT_LATENCY",
    "FRAMES_CONFLATED",
    "FRAMES_DROPPED",
    "FRAMES_SENT",
    "HANDSHAKES_REFUSED",
    "INBOUND",
    "READER_GAPS",
    "SUBSCRIPTIONS",
]

CONNECTIONS = Gauge("defiwatch_gateway_connections", "Open WebSocket connections (authenticated).")
CONNECTIONS_OPENED = Counter(
    "defiwatch_gateway_connections_opened", "WebSocket connections authenticated and welcomed.")
HANDSHAKES_REFUSED = Counter(
    "defiwatch_gateway_refused",
    "Connections refused: at the handshake (node_full, connect_rate, not_found: HTTP status) or "
    "after it (unauthorized, forbidden, too_many_connections: close frame).",
    ["reason"],
)
SUBSCRIPTIONS = Gauge("defiwatch_gateway_subscriptions", "Active channel subscriptions.")
FRAMES_SENT = Counter(
    "defiwatch_gateway_frames_sent",
    "Frames handed to connections: event (stream events), control (welcome, ack, pong, error, "
    "latest).",
    ["kind"],
)
FRAMES_CONFLATED = Counter(
    "defiwatch_gateway_frames_conflated",
    "Event frames replaced by a newer one of the same series: rate (a subscription's "
    "max_rate_ms) or buffer (a slow connection's full send buffer).",
    ["cause"],
)
FRAMES_DROPPED = Counter(
    "defiwatch_gateway_frames_dropped",
    "Frames discarded unsent because their connection was closed (slow consumer, shutdown).",
)
EVENTS_ROUTED = Counter(
    "defiwatch_gateway_events", "Stream events fanned out by the hub.", ["stream"])
EVENT_LATENCY = Histogram(
    "defiwatch_gateway_event_latency_seconds",
    "From an event's emitted_at (processor) to its frames handed to every connection of this "
    "gateway, in seconds (clock skew between hosts included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CLOSES = Counter("defiwatch_gateway_closes", "Closed connections by close code.", ["code"])
INBOUND = Counter(
    "defiwatch_gateway_inbound_messages",
    "Client messages by outcome: ok, invalid (error frame), rate_limited, abuse (closed 4029).",
    ["outcome"],
)
READER_GAPS = Counter(
    "defiwatch_gateway_reader_gaps",
    "Times a stream reader found its position trimmed or the stream restarted; every "
    "connection is then closed with 1012 to recover.",
    ["stream"],
)
