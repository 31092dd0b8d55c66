"""defiwatch.client against real gateways over real sockets: events arrive, a gateway restart
(close 1012) is survived by reconnecting to the other gateway, and what was published while the
client was away is recovered from its last offset, each event once."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from defiwatch.app import Platform, open_platform
from defiwatch.client import Message, RealtimeClient, Subscription
from defiwatch.config import Settings
from defiwatch.gateway import Gateway
from defiwatch.store.keys import create_key
from stream.redis_loss import lose_redis_data

T0 = 1_710_115_200


async def ingest_days(platform: Platform, first_day: int, days: int) -> None:
    """One protocol's TVL, +2 % a day: one tvl_change event per day after the first."""
    points = [{"metric": "tvl", "subject": "aave", "chain": "ethereum", "ts": T0 + d * 86_400,
               "value": 1e9 * 1.02 ** d} for d in range(first_day, first_day + days)]
    await platform.ingest.ingest_points(points, source="test")
    await platform.processor().drain()


async def reader_key(platform: Platform) -> str:
    """An API key that may read the streams, for the client."""
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user="carol", tier="pro", scopes=["read"],
                                  tiers=list(platform.settings.tiers))
    return key


def gateway_of(platform: Platform) -> Gateway:
    """A gateway over the platform's stream, cache and alerts (started by the caller)."""
    return Gateway(settings=platform.settings, engine=platform.engine, stream=platform.stream,
                   cache=platform.cache, alerts=platform.alerts)


async def next_events(messages: object, count: int, timeout: float) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        async for message in messages:  # type: ignore[attr-defined]
            if message.type == "event":
                got.append(message)
                if len(got) == count:
                    return got
    return got


async def test_client_recovers_across_a_gateway_restart(settings: Settings,
                                                         timeout_factor: float) -> None:
    settings = settings.model_copy(update={"gateway_port": 0})
    async with open_platform(settings) as p:
        key = await reader_key(p)
        first, second = gateway_of(p), gateway_of(p)
        await first.start()
        await second.start()
        try:
            client = RealtimeClient([first.url, second.url], key,
                                    [Subscription("protocol:aave")], since=0)
            async with client:
                messages = aiter(client)
                await ingest_days(p, 0, 3)  # events at days 1 and 2
                before = await next_events(messages, 2, 20 * timeout_factor)
                assert [m.data["ts"] for m in before] == [T0 + 86_400, T0 + 2 * 86_400]
                # Rolling restart: the first gateway goes away with 1012 while events keep coming.
                await first.stop()
                await ingest_days(p, 3, 3)  # days 3, 4, 5 published while the client moves over
                after = await next_events(messages, 3, 30 * timeout_factor)
            offsets = [m.offset for m in before + after]
            assert offsets == sorted(set(offsets)), "an event was lost or delivered twice"
            assert [m.data["ts"] for m in after] == [T0 + d * 86_400 for d in (3, 4, 5)]
            assert client.reconnects >= 1
            assert client.last_offset == offsets[-1]
        finally:
            await first.stop()
            await second.stop()


@pytest.mark.parametrize("settings", ["production"], indirect=True)
async def test_client_follows_the_stream_into_a_new_epoch(settings: Settings, redis_url: str,
                                                          timeout_factor: float) -> None:
    """Redis loses its data under a connected client: the gateway closes it (1012), the client
    resubscribes with its old position and epoch, and the new stream's events, whose offsets
    restart at 1, are delivered (not dropped as already seen), with a gap for what was lost."""
    settings = settings.model_copy(update={"gateway_port": 0})
    async with open_platform(settings) as p:
        key = await reader_key(p)
        gateway = gateway_of(p)
        await gateway.start()
        try:
            client = RealtimeClient([gateway.url], key, [Subscription("tvl_changes")], since=0)
            async with client:
                messages = aiter(client)
                await ingest_days(p, 0, 4)  # offsets 1, 2, 3
                before = await next_events(messages, 3, 20 * timeout_factor)
                old_epoch = client.epoch
                await lose_redis_data(redis_url, settings.redis_prefix)
                await ingest_days(p, 4, 2)  # offsets 1 and 2 of the new stream
                got: list[Message] = []
                async with asyncio.timeout(30 * timeout_factor):
                    async for message in messages:
                        got.append(message)
                        if message.type == "gap":
                            break
            assert [m.offset for m in before] == [1, 2, 3]
            events = [m for m in got if m.type == "event"]
            assert [(m.offset, m.data["ts"]) for m in events] == [
                (1, T0 + 4 * 86_400), (2, T0 + 5 * 86_400)]
            assert got[-1] == Message("gap", "tvl_changes")
            assert client.epoch not in (None, old_epoch)
            assert client.last_offset == 2
        finally:
            await gateway.stop()


async def test_a_bad_key_ends_iteration_with_an_auth_error(settings: Settings) -> None:
    from defiwatch.errors import AuthError

    settings = settings.model_copy(update={"gateway_port": 0})
    async with open_platform(settings) as p:
        gateway = Gateway(settings=settings, engine=p.engine, stream=p.stream, cache=p.cache)
        await gateway.start()
        try:
            async with RealtimeClient([gateway.url], "dw_bad_key", [Subscription("tvl_changes")]
                                      ) as client:
                try:
                    async with asyncio.timeout(20):
                        async for _ in client:
                            raise AssertionError("no message expected")
                except AuthError as exc:
                    assert "refused" in exc.message
                else:
                    raise AssertionError("expected AuthError")
        finally:
            await gateway.stop()


def test_subscriptions_are_plain_values() -> None:
    sub = Subscription("tvl_changes", filter={"min_change_pct": 5}, max_rate_ms=250)
    assert msgspec.to_builtins(sub) == {"channel": "tvl_changes",
                                        "filter": {"min_change_pct": 5}, "max_rate_ms": 250}
