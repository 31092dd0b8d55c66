"""The sans-I/O protocol: client frames in, typed commands or rejections out; server frames.
Table-driven, no event loop (STYLE.md 9)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defiwatch.domain import Event, Latest
from defiwatch.gateway.protocol import (
    Auth,
    Channel,
    ChannelKind,
    ErrorCode,
    Filter,
    Ping,
    Rejection,
    Subscribe,
    Unsubscribe,
    ack_frame,
    alert_recipient,
    api_key_from_request,
    channel_matches,
    encode_event,
    error_frame,
    event_frame,
    latest_belongs,
    latest_frame,
    parse_channel,
    parse_client_frame,
    pong_frame,
    route,
    welcome_frame,
)
from defiwatch.jsondepth import MAX_JSON_DEPTH


def ev(type_: str = "tvl_change", metric: str = "tvl", subject: str = "aave",
       chain: str = "ethereum", change_pct: float | None = 2.0, offset: int = 7,
       detail: dict[str, Any] | None = None) -> Event:
    return Event(type=type_, metric=metric, subject=subject, chain=chain, value=1.0, previous=1.0,
                 change_abs=0.0, change_pct=change_pct, change_1h=None, change_24h=None,
                 change_7d=None, ts=1_710_115_200, emitted_at=1_710_115_200.5, source="test",
                 offset=offset, detail=detail)


# --- channels -----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "kind", "canonical"), [
    ("protocol:aave", ChannelKind.PROTOCOL, "protocol:aave"),
    ("  Protocol:Aave ", ChannelKind.PROTOCOL, "protocol:aave"),
    ("protocol:uniswap-v3:Ethereum", ChannelKind.PROTOCOL_CHAIN, "protocol:uniswap-v3:ethereum"),
    ("protocol:aave:BSC", ChannelKind.PROTOCOL_CHAIN, "protocol:aave:bsc"),
    ("chain:Binance", ChannelKind.CHAIN, "chain:bsc"),
    ("chain:arbitrum", ChannelKind.CHAIN, "chain:arbitrum"),
    ("token:ethereum", ChannelKind.TOKEN, "token:coingecko:ethereum"),
    ("token:coingecko:bitcoin", ChannelKind.TOKEN, "token:coingecko:bitcoin"),
    ("tvl_changes", ChannelKind.TVL_CHANGES, "tvl_changes"),
    ("price_changes", ChannelKind.PRICE_CHANGES, "price_changes"),
    ("alerts", ChannelKind.ALERTS, "alerts"),
])
def test_channels_parse_to_canonical_names(name: str, kind: ChannelKind, canonical: str) -> None:
    channel = parse_channel(name)
    assert isinstance(channel, Channel)
    assert (channel.kind, channel.name) == (kind, canonical)


@pytest.mark.parametrize(("name", "code"), [
    ("", ErrorCode.INVALID_REQUEST),
    (42, ErrorCode.INVALID_REQUEST),
    (None, ErrorCode.INVALID_REQUEST),
    ("x" * 300, ErrorCode.INVALID_REQUEST),
    ("protocol:", ErrorCode.UNKNOWN_CHANNEL),
    ("protocol:aave:-", ErrorCode.UNKNOWN_CHANNEL),
    ("protocol:aave:ethereum:x", ErrorCode.UNKNOWN_CHANNEL),
    ("chain:", ErrorCode.UNKNOWN_CHANNEL),
    ("chain:-", ErrorCode.UNKNOWN_CHANNEL),
    ("token:", ErrorCode.UNKNOWN_CHANNEL),
    ("token::eth", ErrorCode.UNKNOWN_CHANNEL),
    ("token:a:b:c", ErrorCode.UNKNOWN_CHANNEL),
    ("prices", ErrorCode.UNKNOWN_CHANNEL),
    ("user:alerts", ErrorCode.UNKNOWN_CHANNEL),
    # a subject or chain longer than any stored: refused, not cut to another name
    ("protocol:" + "a" * 121, ErrorCode.INVALID_REQUEST),
    ("protocol:aave:" + "c" * 121, ErrorCode.INVALID_REQUEST),
    ("token:coingecko:" + "e" * 111, ErrorCode.INVALID_REQUEST),
])
def test_bad_channels_are_rejected_with_the_field(name: object, code: ErrorCode) -> None:
    rejection = parse_channel(name)
    assert isinstance(rejection, Rejection)
    assert (rejection.code, rejection.field) == (code, "channel")


@pytest.mark.parametrize(("event", "channels"), [
    (ev(), ["protocol:aave", "protocol:aave:ethereum", "chain:ethereum", "tvl_changes"]),
    (ev(chain="-"), ["protocol:aave", "tvl_changes"]),
    (ev(metric="tvl_borrowed"), ["protocol:aave", "protocol:aave:ethereum", "chain:ethereum",
                                 "tvl_changes"]),
    (ev(metric="chain_tvl", subject="base", chain="base"), ["chain:base", "tvl_changes"]),
    (ev("price_change", "price", "coingecko:ethereum", "-"),
     ["token:coingecko:ethereum", "price_changes"]),
    (ev("protocol_update", "protocol", "aave", "-", None), ["protocol:aave"]),
    (ev("alert_fired", detail={"user_id": 1}), []),
])
def test_route(event: Event, channels: list[str]) -> None:
    assert route(event) == channels
    for name in channels:
        channel = parse_channel(name)
        assert isinstance(channel, Channel) and channel.name == name
        assert channel_matches(channel, event)


@pytest.mark.parametrize(("detail", "user"), [
    ({"user_id": 7, "rule_id": 3}, 7),
    ({"user_id": "7"}, None),
    ({"user_id": True}, None),
    ({}, None),
    (None, None),
])
def test_alert_recipient(detail: dict[str, Any] | None, user: int | None) -> None:
    event = ev("alert_fired", detail=detail)
    assert alert_recipient(event) == user
    alerts = parse_channel("alerts")
    assert isinstance(alerts, Channel)
    assert channel_matches(alerts, event, 7) is (user == 7)
    assert channel_matches(alerts, event, None) is False


# --- client frames ------------------------------------------------------------------------

AAVE = Channel(ChannelKind.PROTOCOL, "protocol:aave", subject="aave")


@pytest.mark.parametrize(("frame", "command"), [
    ({"type": "ping", "id": 1}, Ping(1)),
    ({"type": "ping", "id": "a"}, Ping("a")),
    ({"type": "auth", "api_key": " k "}, Auth(None, "k")),
    ({"type": "unsubscribe", "id": 2, "channel": "protocol:Aave"}, Unsubscribe(2, AAVE)),
    ({"type": "subscribe", "id": 3, "channel": "protocol:aave"}, Subscribe(3, AAVE)),
    ({"type": "subscribe", "id": 3, "channel": "protocol:aave", "since": 0, "epoch": "e",
      "max_rate_ms": 250, "filter": {"min_change_pct": 1, "chains": ["Ethereum", "BSC"]},
      "future_field": True},
     Subscribe(3, AAVE, Filter(1.0, frozenset({"ethereum", "bsc"})), 0, "e", 250)),
    ({"type": "subscribe", "id": 3, "channel": "protocol:aave", "filter": {}, "max_rate_ms": 0},
     Subscribe(3, AAVE)),
    ({"type": "subscribe", "id": 4, "channel": "alerts", "filter": {}},
     Subscribe(4, Channel(ChannelKind.ALERTS, "alerts"))),
])
def test_valid_frames_become_commands(frame: dict[str, Any], command: object) -> None:
    assert parse_client_frame(json.dumps(frame)) == command
    assert parse_client_frame(json.dumps(frame).encode()) == command  # binary frames too


@pytest.mark.parametrize(("raw", "code", "field", "request_id"), [
    ("not json", ErrorCode.INVALID_REQUEST, None, None),
    ("", ErrorCode.INVALID_REQUEST, None, None),
    ("[1, 2]", ErrorCode.INVALID_REQUEST, None, None),
    ('{"type": "ping", "id": true}', ErrorCode.INVALID_REQUEST, "id", None),
    ('{"type": "ping", "id": [1]}', ErrorCode.INVALID_REQUEST, "id", None),
    ('{"type": "ping"}', ErrorCode.INVALID_REQUEST, "id", None),
    ('{"id": 1}', ErrorCode.INVALID_REQUEST, "type", 1),
    ('{"type": "publish", "id": 1}', ErrorCode.INVALID_REQUEST, "type", 1),
    ('{"type": "subscribe", "channel": "tvl_changes"}', ErrorCode.INVALID_REQUEST, "id", None),
    ('{"type": "subscribe", "id": 1}', ErrorCode.INVALID_REQUEST, "channel", 1),
    ('{"type": "subscribe", "id": 1, "channel": "nope"}', ErrorCode.UNKNOWN_CHANNEL, "channel", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": 3}',
     ErrorCode.INVALID_REQUEST, "filter", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"min_pct": 1}}',
     ErrorCode.INVALID_REQUEST, "filter.min_pct", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"min_change_pct": -1}}',
     ErrorCode.INVALID_REQUEST, "filter.min_change_pct", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"min_change_pct": "1"}}',
     ErrorCode.INVALID_REQUEST, "filter.min_change_pct", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"chains": []}}',
     ErrorCode.INVALID_REQUEST, "filter.chains", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"chains": ["a", 2]}}',
     ErrorCode.INVALID_REQUEST, "filter.chains[1]", 1),
    ('{"type": "subscribe", "id": 1, "channel": "price_changes", "filter": {"chains": ["a"]}}',
     ErrorCode.INVALID_REQUEST, "filter.chains", 1),
    ('{"type": "subscribe", "id": 1, "channel": "alerts", "filter": {"min_change_pct": 1}}',
     ErrorCode.INVALID_REQUEST, "filter", 1),
    ('{"type": "subscribe", "id": 1, "channel": "alerts", "max_rate_ms": 100}',
     ErrorCode.INVALID_REQUEST, "max_rate_ms", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "max_rate_ms": 60001}',
     ErrorCode.INVALID_REQUEST, "max_rate_ms", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "max_rate_ms": 1.5}',
     ErrorCode.INVALID_REQUEST, "max_rate_ms", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "since": -1}',
     ErrorCode.INVALID_REQUEST, "since", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "since": "5"}',
     ErrorCode.INVALID_REQUEST, "since", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "epoch": 5}',
     ErrorCode.INVALID_REQUEST, "epoch", 1),
    ('{"type": "unsubscribe", "id": 1, "channel": "x:y"}', ErrorCode.UNKNOWN_CHANNEL, "channel", 1),
    ('{"type": "auth"}', ErrorCode.UNAUTHORIZED, "api_key", None),
    ('{"type": "auth", "api_key": 5, "id": "a"}', ErrorCode.UNAUTHORIZED, "api_key", "a"),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "since": 9223372036854775808}',
     ErrorCode.INVALID_REQUEST, "since", 1),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"chains": ["e\\u0000"]}}',
     ErrorCode.INVALID_REQUEST, "filter.chains[0]", 1),
    # Nested deeper than the decoder can follow: refused before decoding, id still echoed.
    ('{"type": "subscribe", "id": "deep", "filter": ' + '{"not": ' * 5000 + "1" + "}" * 5000
     + "}", ErrorCode.INVALID_REQUEST, "filter" + ".not" * (MAX_JSON_DEPTH - 1), "deep"),
    ("[" * 100_000, ErrorCode.INVALID_REQUEST, "[0]" * MAX_JSON_DEPTH, None),
    ('{"id": true, "x": ' + "[" * 5000 + "]" * 5000 + "}", ErrorCode.INVALID_REQUEST,
     "x" + "[0]" * (MAX_JSON_DEPTH - 1), None),
])
def test_bad_frames_become_rejections(raw: str, code: ErrorCode, field: str | None,
                                      request_id: object) -> None:
    rejection = parse_client_frame(raw)
    assert isinstance(rejection, Rejection), rejection
    assert (rejection.code, rejection.field, rejection.id) == (code, field, request_id)
    assert rejection.message


@pytest.mark.parametrize(("flt", "event", "passes"), [
    (Filter(min_change_pct=1.0), ev(change_pct=2.0), True),
    (Filter(min_change_pct=1.0), ev(change_pct=-1.0), True),
    (Filter(min_change_pct=1.0), ev(change_pct=0.5), False),
    (Filter(min_change_pct=1.0), ev(change_pct=None), False),
    (Filter(chains=frozenset({"ethereum"})), ev(), True),
    (Filter(chains=frozenset({"base"})), ev(), False),
    (Filter(chains=frozenset({"-"})), ev(chain="-"), True),
    (Filter(1.0, frozenset({"ethereum"})), ev(change_pct=0.1), False),
])
def test_filters(flt: Filter, event: Event, passes: bool) -> None:
    assert flt.matches(event) is passes


@pytest.mark.parametrize(("headers", "path", "key"), [
    ({"authorization": "Bearer k1"}, "/v1/realtime?apiKey=k3", "k1"),
    ({"authorization": "bearer  k1 "}, "/v1/realtime", "k1"),
    ({"authorization": "Basic xyz", "x-api-key": "k2"}, "/v1/realtime", "k2"),
    ({"x-api-key": "k2"}, "/v1/realtime?apiKey=k3", "k2"),
    ({}, "/v1/realtime?apiKey=k3&x=1", "k3"),
    ({}, "/v1/realtime?apiKey=", None),
    ({"authorization": "Bearer "}, "/v1/realtime", None),
    ({}, "/v1/realtime", None),
])
def test_api_key_from_request(headers: dict[str, str], path: str, key: str | None) -> None:
    assert api_key_from_request(headers, path) == key


# --- server frames ------------------------------------------------------------------------

def test_event_frame_splices_the_encoded_event() -> None:
    event = ev(offset=42)
    frame = json.loads(event_frame("protocol:aave", 42, encode_event(event)))
    assert frame == {"type": "event", "channel": "protocol:aave", "offset": 42,
                     "data": msgspec.to_builtins(event)}
    assert frame["data"]["offset"] == 42


def test_control_frames() -> None:
    assert json.loads(ack_frame(1)) == {"type": "ack", "id": 1}
    assert json.loads(ack_frame("s", channel="alerts")) == {"type": "ack", "id": "s",
                                                            "channel": "alerts"}
    assert json.loads(ack_frame(2, channel="tvl_changes", recovered=True, replayed=3)) == {
        "type": "ack", "id": 2, "channel": "tvl_changes", "recovered": True, "replayed": 3}
    assert json.loads(pong_frame(5, 1.5)) == {"type": "pong", "id": 5, "ts": 1.5}
    assert json.loads(error_frame(Rejection(ErrorCode.RATE_LIMITED, "slow down", None, 9,
                                            temporary=True))) == {
        "type": "error", "id": 9,
        "error": {"code": "rate_limited", "message": "slow down", "field": None,
                  "temporary": True}}
    latest = Latest("tvl", "aave", "ethereum", 10, 2.0)
    assert json.loads(latest_frame("protocol:aave", [latest], truncated=False)) == {
        "type": "latest", "channel": "protocol:aave", "truncated": False,
        "data": [msgspec.to_builtins(latest)]}
    welcome = json.loads(welcome_frame(
        connection_id="c", user="alice", tier="pro",
        limits={"subscriptions": 1, "messages_per_minute": 2, "connections": 3},
        stream={"epoch": "e", "last_offset": 4}, alerts_stream=None, node="n"))
    assert welcome["type"] == "welcome" and welcome["protocol"] == 1
    assert welcome["stream"] == {"epoch": "e", "last_offset": 4}


@pytest.mark.parametrize(("channel", "item", "flt", "belongs"), [
    ("protocol:aave", Latest("tvl", "aave", "-", 1, 1.0), None, True),
    ("protocol:ethereum", Latest("chain_tvl", "ethereum", "ethereum", 1, 1.0), None, False),
    ("chain:base", Latest("chain_tvl", "base", "base", 1, 1.0), None, True),
    ("token:ethereum", Latest("price", "coingecko:ethereum", "-", 1, 1.0), None, True),
    ("tvl_changes", Latest("tvl", "aave", "base", 1, 1.0), Filter(chains=frozenset({"base"})),
     True),
    ("tvl_changes", Latest("tvl", "aave", "-", 1, 1.0), Filter(chains=frozenset({"base"})),
     False),
])
def test_latest_belongs(channel: str, item: Latest, flt: Filter | None, belongs: bool) -> None:
    parsed = parse_channel(channel)
    assert isinstance(parsed, Channel)
    assert latest_belongs(parsed, item, flt) is belongs


# Frames a client could send: any text, and JSON of any shape and nesting around a subscribe.
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(text=st.text() | st.binary().map(lambda b: b.decode("latin-1")),
       wrap=st.integers(min_value=0, max_value=3_000), value=_JSON)
def test_any_frame_is_parsed_or_refused_never_raises(text: str, wrap: int, value: Any) -> None:
    frames = [text, '{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": '
              + "[" * wrap + json.dumps(value) + "]" * wrap + "}"]
    for frame in frames:
        assert isinstance(parse_client_frame(frame), Rejection | Subscribe | Unsubscribe | Ping
                          | Auth)
