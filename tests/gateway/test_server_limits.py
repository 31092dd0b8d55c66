"""Limits: subscriptions per connection, inbound rate (4029), connections per key (4030), the
node's connection and connect-rate caps (503 + Retry-After), slow consumers (4008), heartbeat."""

from __future__ import annotations

import os

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.rig import WAIT, Rig, embedded_settings, open_rig, small_receive_buffer_socket, synthetic, until


def free_tier(**limits: int) -> dict[str, dict[str, int]]:
    return {"free": limits}


async def test_subscriptions_per_connection(tmp_path: os.PathLike[str]) -> None:
    async with open_rig(embedded_settings(tmp_path, tiers=free_tier(ws_subscriptions=2))) as rig:
        key, _ = await rig.key(tier="free")
        client = await rig.connect(key)
        assert client.welcome["limits"]["subscriptions"] == 2
        await client.subscribe("protocol:aave")
        await client.subscribe("alerts")
        refused = await client.request({"type": "subscribe", "channel": "tvl_changes"})
        assert refused["error"]["code"] == "too_many_subscriptions"
        assert refused["error"]["field"] == "channel"
        await client.subscribe("protocol:AAVE", max_rate_ms=10)  # the same channel: replaces
        await client.request({"type": "unsubscribe", "channel": "alerts"})
        await client.subscribe("tvl_changes")


async def test_inbound_rate_errors_then_closes_with_4029(tmp_path: os.PathLike[str]) -> None:
    from defiwatch.gateway.limits import ABUSE_STRIKES

    async with open_rig(embedded_settings(tmp_path,
                                          tiers=free_tier(ws_messages_per_minute=5))) as rig:
        key, _ = await rig.key(tier="free")
        client = await rig.connect(key)
        for i in range(5):
            assert (await client.request({"type": "ping", "id": i}))["type"] == "pong"
        limited = await client.request({"type": "ping", "id": "over"})
        assert limited["error"]["code"] == "rate_limited" and limited["error"]["temporary"]
        for i in range(ABUSE_STRIKES - 1):
            await client.send({"type": "ping", "id": i})
        errors = [await client.recv() for _ in range(ABUSE_STRIKES - 1)]
        assert {e["error"]["code"] for e in errors} == {"rate_limited"}
        assert await client.close_code() == 4029


async def test_connections_per_key_close_with_4030(tmp_path: os.PathLike[str]) -> None:
    async with open_rig(embedded_settings(tmp_path, tiers=free_tier(ws_connections=2))) as rig:
        key, _ = await rig.key(tier="free")
        other_key, _ = await rig.key("bob", tier="free")
        first = await rig.connect(key)
        await rig.connect(key)
        third = await rig.connect(key, welcome=False)
        frame = await third.recv()
        assert frame["error"]["code"] == "too_many_connections"
        assert await third.close_code() == 4030
        await rig.connect(other_key)  # the limit is per key
        await first.close()
        await until(lambda: rig.gateway.connection_count == 2)
        await rig.connect(key)  # a slot was freed


async def test_node_connection_cap_refuses_with_503(tmp_path: os.PathLike[str]) -> None:
    async with open_rig(embedded_settings(tmp_path, gateway_max_connections=1)) as rig:
        key, _ = await rig.key()
        await rig.connect(key)
        with pytest.raises(InvalidStatus) as info:
            await rig.connect(key)
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) >= 1


async def test_connect_rate_cap_refuses_with_503(tmp_path: os.PathLike[str]) -> None:
    async with open_rig(embedded_settings(tmp_path, gateway_connect_rate=0.01)) as rig:
        key, _ = await rig.key()
        await rig.connect(key)  # the bucket holds one token
        with pytest.raises(InvalidStatus) as info:
            await rig.connect(key)
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) == 100


async def test_unknown_path_is_404(rig: Rig) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(rig.gateway.url.replace("/v1/realtime", "/v2/other"), open_timeout=WAIT)
    assert info.value.response.status_code == 404


async def test_a_slow_consumer_is_closed_with_4008_and_slows_no_one(
    tmp_path: os.PathLike[str],
) -> None:
    async with open_rig(embedded_settings(tmp_path, gateway_send_queue=10)) as rig:
        key, _ = await rig.key()
        fast = await rig.connect(key)
        # The slow client never reads: its library stops taking frames off the socket after one
        # (max_queue), and its tiny receive buffer pushes back on the server at once.
        slow = await rig.connect(key, sock=small_receive_buffer_socket(rig.gateway.port),
                                 max_queue=1)
        await fast.subscribe("tvl_changes")
        await slow.subscribe("tvl_changes")
        padding = "x" * 4096
        total, batch = 3000, 20  # ~12 MB: more than any kernel buffer between the two ends
        got, published = [], []
        for start in range(0, total, batch):
            sent = await rig.platform.stream.publish([
                synthetic(i, subject=f"p{i}", detail={"padding": padding})  # distinct series:
                for i in range(start + 1, start + batch + 1)])             # nothing to conflate
            # The fast client keeps up (client and server share this test's event loop, so it
            # reads between batches, as a remote client would read all along).
            last = sent[-1].offset
            got += await fast.events_until(lambda f: f["offset"] == last)  # noqa: B023
            published += sent
        assert [f["offset"] for f in got] == [e.offset for e in published]
        assert await slow.close_code(timeout=WAIT * 4) == 4008


async def test_a_silent_peer_is_dropped_by_the_heartbeat(tmp_path: os.PathLike[str]) -> None:
    settings = embedded_settings(tmp_path, gateway_ping_interval_s=0.1,
                                 gateway_ping_timeout_s=0.1, gateway_close_timeout_s=0.1)
    async with open_rig(settings) as rig:
        key, _ = await rig.key()
        client = await rig.connect(key)
        await client.subscribe("tvl_changes")
        # Stop reading: the client no longer sees the server's pings, so it answers none.
        client.ws.transport.pause_reading()
        await until(lambda: rig.gateway.connection_count == 0)
        assert rig.gateway.hub.subscription_count == 0
        client.ws.transport.resume_reading()
        assert await client.close_code() in (1011, 1006)  # keepalive timeout, or TCP dropped
        await rig.platform.stream.publish([synthetic(1)])  # nothing left to deliver to
