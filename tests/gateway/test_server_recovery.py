"""Recovery with `since` (replay, or `recovered: false` + latest values) and conflation."""

from __future__ import annotations

import os

import pytest

from defiwatch.config import Settings
from gateway.rig import DAY, T0, embedded_settings, open_rig, point, synthetic
from stream.redis_loss import lose_redis_data


async def test_since_replays_what_was_missed_then_goes_live(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        first = await rig.connect(key)
        await first.subscribe("protocol:aave")
        await rig.ingest([point("aave", T0, 1e9), point("curve", T0, 1e9)])
        (e1,) = await rig.ingest([point("aave", T0 + DAY, 1.1e9)])
        assert (await first.event())["offset"] == e1.offset
        epoch = first.welcome["stream"]["epoch"]
        await first.close()

        # While disconnected: two aave events and one of another channel.
        missed = await rig.ingest([point("aave", T0 + 2 * DAY, 1.2e9),
                                   point("curve", T0 + 2 * DAY, 2e9)])
        missed += await rig.ingest([point("aave", T0 + 3 * DAY, 1.3e9)])
        aave_missed = [e.offset for e in missed if e.subject == "aave"]
        assert len(aave_missed) == 2

        again = await rig.connect(key)
        assert again.welcome["stream"]["epoch"] == epoch
        ack = await again.request({"type": "subscribe", "id": "r", "channel": "protocol:aave",
                                   "since": e1.offset, "epoch": epoch})
        assert ack == {"type": "ack", "id": "r", "channel": "protocol:aave", "recovered": True,
                       "replayed": 2}
        replayed = again.pending  # the replay precedes the ack
        assert [f["offset"] for f in replayed] == aave_missed
        assert [f["data"]["value"] for f in replayed] == [1.2e9, 1.3e9]
        again.pending = []
        (live,) = await rig.ingest([point("aave", T0 + 4 * DAY, 1.4e9)])
        assert (await again.event())["offset"] == live.offset


async def test_since_up_to_date_recovers_nothing(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        await rig.platform.stream.publish([synthetic(1), synthetic(2)])
        client = await rig.connect(key)
        ack = await client.request({"type": "subscribe", "channel": "protocol:aave", "since": 2})
        assert (ack["recovered"], ack["replayed"]) == (True, 0)


async def test_a_trimmed_gap_says_recovered_false_and_sends_latest(both: Settings) -> None:
    async with open_rig(both.model_copy(update={"stream_retention": 100}), gateway=False) as rig:
        key, _ = await rig.key()
        await rig.ingest([point("aave", T0, 1e9), point("aave", T0, 5e8, chain="Base"),
                          point("curve", T0, 1e9)])
        await rig.ingest([point("aave", T0 + DAY, 1.1e9)])
        # Fill the stream far past its retention (Redis trims approximately, whole nodes).
        for start in range(0, 1000, 250):
            await rig.platform.stream.publish(
                [synthetic(i, subject="filler") for i in range(start + 1, start + 251)])
        assert (await rig.platform.stream.read(1, 1)).gap
        # Started now, the gateway reads on from here (had it been running it could have
        # fallen behind the filler itself, and closed everyone: the next test).
        await rig.start_gateway()

        client = await rig.connect(key)
        ack = await client.request({"type": "subscribe", "id": 1, "channel": "protocol:aave",
                                    "since": 1})
        assert (ack["recovered"], ack["replayed"]) == (False, 0)
        latest = await client.recv()
        assert latest["type"] == "latest" and latest["channel"] == "protocol:aave"
        assert latest["truncated"] is False
        assert sorted((x["chain"], x["value"]) for x in latest["data"]) == [
            ("base", 5e8), ("ethereum", 1.1e9)]
        (live,) = await rig.ingest([point("aave", T0 + 2 * DAY, 1.3e9)])
        assert (await client.event())["offset"] == live.offset


async def test_a_gateway_that_falls_behind_the_stream_closes_everyone_with_1012(
    tmp_path: os.PathLike[str],
) -> None:
    """Its readers' position was trimmed: every connection may hold a hole, so all are told to
    reconnect and recover (they then learn `recovered: false`)."""
    async with open_rig(embedded_settings(tmp_path, stream_retention=100)) as rig:
        key, _ = await rig.key()
        client = await rig.connect(key)
        await client.subscribe("tvl_changes")
        # One publish appends all 300 before the gateway's reader runs again: it wakes up
        # behind the ring's oldest event.
        await rig.platform.stream.publish([synthetic(i) for i in range(1, 301)])
        assert await client.close_code() == 1012
        again = await rig.connect(key)
        ack = await again.request({"type": "subscribe", "channel": "tvl_changes", "since": 0})
        assert ack["recovered"] is False
        await rig.platform.stream.publish([synthetic(301)])
        assert (await again.event())["offset"] == 301


async def test_an_earlier_epoch_replays_the_restarted_stream_from_its_start(
        both: Settings) -> None:
    """A `since` of another life of the stream (Redis lost its data): everything the new
    stream holds came after the fault, so all of it is replayed, with `recovered: false`, and
    `latest` carries only the series the replay did not cover."""
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        await rig.ingest([point("aave", T0, 1e9), point("aave", T0, 5e8, chain="Base")])
        new = await rig.ingest([point("aave", T0 + DAY, 1.1e9)])
        assert [e.chain for e in new] == ["ethereum"]
        client = await rig.connect(key)
        ack = await client.request({"type": "subscribe", "channel": "protocol:aave",
                                    "since": 4_000, "epoch": "an-earlier-life"})
        assert (ack["recovered"], ack["replayed"]) == (False, 1)
        assert [f["offset"] for f in client.pending] == [new[0].offset]
        client.pending = []
        latest = await client.recv()
        assert latest["type"] == "latest"
        assert [(x["chain"], x["value"]) for x in latest["data"]] == [("base", 5e8)]
        (live,) = await rig.ingest([point("aave", T0 + 2 * DAY, 1.3e9)])
        assert (await client.event())["offset"] == live.offset


async def test_a_future_offset_without_epoch_is_a_restarted_stream(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        await rig.platform.stream.publish([synthetic(1), synthetic(2)])
        client = await rig.connect(key)
        ack = await client.request({"type": "subscribe", "channel": "tvl_changes", "since": 99})
        assert (ack["recovered"], ack["replayed"]) == (False, 2)
        assert [f["offset"] for f in client.pending] == [1, 2]
        client.pending = []
        assert (await client.recv())["type"] == "latest"


@pytest.mark.parametrize("settings", ["production"], indirect=True)
async def test_readers_close_everyone_when_redis_loses_the_stream(
        both: Settings, redis_url: str) -> None:
    """The stream restarts under a new epoch and grows past the reader's position before the
    reader wakes: offsets alone look like a continuation; the epoch check closes everyone with
    1012, and a resubscribe with the old position gets the whole new stream."""
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        await rig.platform.stream.publish([synthetic(i) for i in range(1, 3)])
        client = await rig.connect(key)
        await client.subscribe("tvl_changes")
        (e3,) = await rig.platform.stream.publish([synthetic(3)])
        assert (await client.event())["offset"] == e3.offset
        epoch = client.welcome["stream"]["epoch"]
        await lose_redis_data(redis_url, both.redis_prefix)
        fresh = await rig.platform.stream.publish([synthetic(i) for i in range(10, 15)])
        assert [e.offset for e in fresh] == [1, 2, 3, 4, 5]
        assert await client.close_code() == 1012
        again = await rig.connect(key)
        assert again.welcome["stream"]["epoch"] != epoch
        ack = await again.request({"type": "subscribe", "channel": "tvl_changes",
                                   "since": e3.offset, "epoch": epoch})
        assert (ack["recovered"], ack["replayed"]) == (False, 5)
        assert [f["data"]["value"] for f in again.pending] == [10, 11, 12, 13, 14]


async def test_alerts_recovery_replays_only_the_users_own(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, alice = await rig.key("alice")
        _, bob = await rig.key("bob")
        await rig.alerts.publish([
            synthetic(i, detail={"user_id": user.user_id, "rule_id": i}, type_="alert_fired")
            for i, user in enumerate([alice, bob, alice, bob], start=1)])
        client = await rig.connect(key)
        ack = await client.request({"type": "subscribe", "channel": "alerts", "since": 0,
                                    "epoch": client.welcome["alerts_stream"]["epoch"]})
        assert (ack["recovered"], ack["replayed"]) == (True, 2)
        assert [f["data"]["detail"]["rule_id"] for f in client.pending] == [1, 3]


async def test_conflation_sends_one_frame_per_series_per_interval(tmp_path: os.PathLike[str]
                                                                   ) -> None:
    async with open_rig(embedded_settings(tmp_path)) as rig:
        key, _ = await rig.key()
        conflated = await rig.connect(key)
        every = await rig.connect(key)
        await conflated.subscribe("tvl_changes", max_rate_ms=200)
        await every.subscribe("tvl_changes")
        # A burst: one stream page, dispatched in one go, so all of it falls in one interval.
        burst = await rig.platform.stream.publish(
            [synthetic(i, subject="aave", value=float(i)) for i in range(1, 11)]
            + [synthetic(i, subject="curve", value=float(i)) for i in range(11, 13)])
        (sentinel,) = await rig.platform.stream.publish([synthetic(13, subject="zzz")])
        got = await conflated.events_until(lambda f: f["offset"] == sentinel.offset)
        assert [(f["data"]["subject"], f["data"]["value"], f["offset"]) for f in got] == [
            ("aave", 10.0, burst[9].offset), ("curve", 12.0, burst[11].offset),
            ("zzz", 13.0, sentinel.offset)]
        everything = await every.events_until(lambda f: f["offset"] == sentinel.offset)
        assert [f["offset"] for f in everything] == [e.offset for e in burst] + [sentinel.offset]
