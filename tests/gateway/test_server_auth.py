"""Connecting: the four ways to present a key, refusals (4001, 4003), the welcome frame."""

from __future__ import annotations

import os

import pytest

from gateway.rig import Rig, embedded_settings, open_rig


@pytest.mark.parametrize("how", ["bearer", "x-api-key", "query", "message"])
async def test_each_way_to_present_a_key_is_welcomed(rig: Rig, how: str) -> None:
    key, _ = await rig.key("alice", tier="pro")
    client = await rig.connect(key, how=how)
    welcome = client.welcome
    assert welcome["protocol"] == 1 and welcome["user"] == "alice" and welcome["tier"] == "pro"
    assert welcome["limits"] == {"subscriptions": 100, "messages_per_minute": 1000,
                                 "connections": 50}
    assert len(welcome["connection_id"]) == 32
    assert welcome["stream"] == {"epoch": await rig.platform.stream.epoch(), "last_offset": 0}
    assert welcome["alerts_stream"]["epoch"] == await rig.alerts.epoch()
    assert welcome["node"] == rig.gateway.node_id
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    await client.close()


@pytest.mark.parametrize("how", ["bearer", "x-api-key", "query", "message"])
async def test_a_bad_key_gets_an_error_then_4001(rig: Rig, how: str) -> None:
    client = await rig.connect("dw_nope_nope", how=how, welcome=False)
    frame = await client.recv()
    assert frame["type"] == "error" and frame["error"]["code"] == "unauthorized"
    assert frame["error"]["temporary"] is False
    assert await client.close_code() == 4001


async def test_a_revoked_key_is_refused(rig: Rig) -> None:
    from defiwatch.store.keys import revoke_key

    key, _ = await rig.key()
    async with rig.platform.engine.begin() as conn:
        await revoke_key(conn, key)
    client = await rig.connect(key, welcome=False)
    assert (await client.recv())["error"]["code"] == "unauthorized"
    assert await client.close_code() == 4001


async def test_no_key_and_no_auth_message_times_out_with_4001(tmp_path: os.PathLike[str]) -> None:
    async with open_rig(embedded_settings(tmp_path, gateway_auth_timeout_s=0.2)) as rig:
        client = await rig.connect(None, how="none", welcome=False)
        frame = await client.recv()
        assert frame["error"]["code"] == "unauthorized" and frame["error"]["field"] == "api_key"
        assert "0.2 s" in frame["error"]["message"]
        assert await client.close_code() == 4001


async def test_a_first_message_other_than_auth_is_refused(rig: Rig) -> None:
    client = await rig.connect(None, how="none", welcome=False)
    await client.send({"type": "subscribe", "id": 1, "channel": "tvl_changes"})
    frame = await client.recv()
    assert frame["error"]["code"] == "unauthorized" and frame["id"] == 1
    assert await client.close_code() == 4001


async def test_a_key_without_the_read_scope_gets_4003(rig: Rig) -> None:
    key, _ = await rig.key(scopes=["ingest"])
    client = await rig.connect(key, welcome=False)
    frame = await client.recv()
    assert frame["error"]["code"] == "forbidden"
    assert await client.close_code() == 4003


async def test_auth_after_welcome_is_an_error_not_a_crash(rig: Rig) -> None:
    key, _ = await rig.key()
    client = await rig.connect(key)
    reply = await client.request({"type": "auth", "api_key": key, "id": "again"})
    assert reply["error"]["code"] == "invalid_request" and reply["error"]["field"] == "type"
    assert (await client.request({"type": "ping"}))["type"] == "pong"
