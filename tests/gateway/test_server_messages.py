"""Client messages over a real socket: acks, pongs, and typed errors that never close the
connection (or crash it) for a bad message."""

from __future__ import annotations

import pytest

from gateway.rig import Rig, synthetic


async def test_subscribe_unsubscribe_ping(rig: Rig) -> None:
    key, _ = await rig.key()
    client = await rig.connect(key)
    ack = await client.request({"type": "subscribe", "id": "s1", "channel": "Protocol:AAVE"})
    assert ack == {"type": "ack", "id": "s1", "channel": "protocol:aave"}
    pong = await client.request({"type": "ping", "id": 7})
    assert pong["type"] == "pong" and pong["id"] == 7 and isinstance(pong["ts"], float)
    assert await client.request({"type": "unsubscribe", "id": "u1", "channel": "protocol:aave"}) \
        == {"type": "ack", "id": "u1", "channel": "protocol:aave"}
    again = await client.request({"type": "unsubscribe", "id": "u2", "channel": "protocol:aave"})
    assert again["error"]["code"] == "not_subscribed" and again["error"]["field"] == "channel"


async def test_no_events_after_unsubscribe(rig: Rig) -> None:
    key, _ = await rig.key()
    client = await rig.connect(key)
    await client.subscribe("protocol:aave")
    await client.subscribe("protocol:curve")
    await rig.platform.stream.publish([synthetic(1, "aave")])
    assert (await client.event())["data"]["subject"] == "aave"
    await client.request({"type": "unsubscribe", "channel": "protocol:aave"})
    await rig.platform.stream.publish([synthetic(2, "aave"), synthetic(3, "curve")])
    # curve was published after aave: once it is here, aave would have been too.
    assert (await client.event())["data"]["subject"] == "curve"


@pytest.mark.parametrize(("raw", "code", "field"), [
    ("{not json", "invalid_request", None),
    ('"just a string"', "invalid_request", None),
    ('{"type": "publish", "id": 1}', "invalid_request", "type"),
    ('{"type": "subscribe", "id": 1, "channel": "protocol"}', "unknown_channel", "channel"),
    ('{"type": "subscribe", "id": 1, "channel": "weather:paris"}', "unknown_channel", "channel"),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"min_pct": 1}}',
     "invalid_request", "filter.min_pct"),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "filter": {"chains": "eth"}}',
     "invalid_request", "filter.chains"),
    ('{"type": "subscribe", "id": 1, "channel": "tvl_changes", "since": "yesterday"}',
     "invalid_request", "since"),
    ('{"type": "ping"}', "invalid_request", "id"),
    # deeper than the decoder recurses: an error frame, not a 1011 close
    ('{"type": "ping", "id": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}", "invalid_request",
     "x" + "[0]" * 63),
])
async def test_bad_messages_get_error_frames_and_the_connection_lives_on(
    rig: Rig, raw: str, code: str, field: str | None
) -> None:
    key, _ = await rig.key()
    client = await rig.connect(key)
    await client.send(raw)
    frame = await client.recv()
    assert frame["type"] == "error"
    assert (frame["error"]["code"], frame["error"]["field"]) == (code, field)
    assert frame["error"]["message"] and frame["error"]["temporary"] is False
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_binary_frames_are_read_as_json_too(rig: Rig) -> None:
    key, _ = await rig.key()
    client = await rig.connect(key)
    await client.ws.send(b'{"type": "ping", "id": 3}')
    assert (await client.recv())["type"] == "pong"
