"""Revoked keys: open connections are closed (error frame, then 4001 "api key revoked") by the
gateway's periodic re-check, and the key cache serves a revoked key no longer than until then."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY

from defiwatch.config import Settings
from defiwatch.gateway.server import REVOKED_REASON
from defiwatch.store.keys import revoke_key
from gateway.rig import Client, Rig, embedded_settings, open_rig


async def revoke(rig: Rig, key: str) -> None:
    async with rig.platform.engine.begin() as conn:
        await revoke_key(conn, key)


async def assert_closed_as_revoked(client: Client) -> None:
    frame = await client.recv()  # waits for the server's error frame (bounded by WAIT)
    assert frame["type"] == "error", frame
    assert frame["error"]["code"] == "unauthorized" and frame["error"]["field"] == "api_key"
    assert "revoked" in frame["error"]["message"] and frame["error"]["temporary"] is False
    assert await client.close_code() == 4001
    assert client.ws.close_reason == REVOKED_REASON


async def test_the_periodic_check_closes_every_connection_of_a_revoked_key(both: Settings
                                                                          ) -> None:
    async with open_rig(both, gateway=False) as rig:
        await rig.start_gateway(options={"revalidate_interval_s": 0.05})
        key, _ = await rig.key("alice")
        other, _ = await rig.key("bob")
        first, second = await rig.connect(key), await rig.connect(key)
        await first.subscribe("tvl_changes")
        kept = await rig.connect(other)
        before = REGISTRY.get_sample_value("defiwatch_gateway_closes_total",
                                           {"code": "4001"}) or 0.0

        await revoke(rig, key)

        await assert_closed_as_revoked(first)
        await assert_closed_as_revoked(second)
        # Another key's connection is untouched.
        assert (await kept.request({"type": "ping"}))["type"] == "pong"
        # The revoked key left the cache with the same check: a new connect is refused.
        again = await rig.connect(key, welcome=False)
        assert (await again.recv())["error"]["code"] == "unauthorized"
        assert await again.close_code() == 4001
        assert (REGISTRY.get_sample_value("defiwatch_gateway_closes_total", {"code": "4001"})
                or 0.0) - before >= 2
        await kept.close()


async def test_a_cached_key_works_until_the_next_check_then_not(tmp_path: os.PathLike[str]
                                                                ) -> None:
    # No periodic check: the test runs it by hand, so the bound is visible step by step.
    async with open_rig(embedded_settings(tmp_path), gateway=False) as rig:
        gateway = await rig.start_gateway(options={"revalidate_interval_s": 0})
        key, _ = await rig.key("alice")
        open_before = await rig.connect(key)
        assert await gateway.revalidate_keys() == 0  # nothing revoked: nothing closed
        assert (await open_before.request({"type": "ping"}))["type"] == "pong"

        await revoke(rig, key)
        # Served from the key cache: the revocation is not seen before the next check.
        open_after = await rig.connect(key)

        assert await gateway.revalidate_keys() == 2
        await assert_closed_as_revoked(open_before)
        await assert_closed_as_revoked(open_after)
        assert await gateway.revalidate_keys() == 0  # closed once
        refused = await rig.connect(key, welcome=False)
        assert (await refused.recv())["error"]["code"] == "unauthorized"
        assert await refused.close_code() == 4001


async def test_without_a_key_cache_a_revoked_key_is_refused_at_once(
        tmp_path: os.PathLike[str]) -> None:
    async with open_rig(embedded_settings(tmp_path), gateway=False) as rig:
        await rig.start_gateway(options={"key_cache_ttl_s": 0, "revalidate_interval_s": 0})
        key, _ = await rig.key("alice")
        client = await rig.connect(key)
        await revoke(rig, key)
        refused = await rig.connect(key, welcome=False)
        assert (await refused.recv())["error"]["code"] == "unauthorized"
        assert await refused.close_code() == 4001
        # The open connection stays until a check (none runs here).
        assert (await client.request({"type": "ping"}))["type"] == "pong"
