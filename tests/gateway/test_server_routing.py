"""Every channel kind routes real events (ingest -> processor -> stream -> gateway), on both
deployments; filters narrow; fired alerts reach their owner only."""

from __future__ import annotations

from typing import Any

from defiwatch.config import Settings
from defiwatch.domain import ProtocolMeta
from gateway.rig import DAY, T0, open_rig, point, synthetic

CHANNELS = ["protocol:aave", "protocol:aave:ethereum", "chain:ethereum", "chain:base",
            "token:ethereum", "tvl_changes", "price_changes"]


def summary(frames: list[dict[str, Any]], channel: str) -> list[tuple[str, str, str]]:
    return [(f["data"]["type"], f["data"]["subject"], f["data"]["chain"])
            for f in frames if f["channel"] == channel]


async def test_each_channel_kind_gets_its_events(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        client = await rig.connect(key)
        for channel in CHANNELS:
            await client.subscribe(channel)
        baseline = [point("aave", T0, 1e9), point("curve", T0, 5e8, chain="Base"),
                    point("base", T0, 2e9, metric="chain_tvl", chain="Base"),
                    point("ethereum", T0, 3000.0, metric="price", chain="-"),
                    point("sentinel", T0, 1e6, chain="-")]
        assert await rig.ingest(baseline) == []  # first points: no bogus +100 % events
        updates = await rig.ingest_protocols(
            [ProtocolMeta(slug="aave", name="Aave", category="Lending", chains=("ethereum",))],
            ts=T0)
        events = await rig.ingest([
            point("aave", T0 + DAY, 1.1e9), point("curve", T0 + DAY, 6e8, chain="Base"),
            point("base", T0 + DAY, 2.5e9, metric="chain_tvl", chain="Base"),
            point("ethereum", T0 + DAY, 3300.0, metric="price", chain="-")])
        sentinel = await rig.ingest([point("sentinel", T0 + DAY, 2e6, chain="-")])
        assert (len(updates), len(events), len(sentinel)) == (1, 4, 1)
        frames = await client.events_until(lambda f: f["offset"] == sentinel[0].offset)

        aave = ("tvl_change", "aave", "ethereum")
        curve = ("tvl_change", "curve", "base")
        base = ("tvl_change", "base", "base")
        eth = ("price_change", "coingecko:ethereum", "-")
        update = ("protocol_update", "aave", "-")
        assert summary(frames, "protocol:aave") == [update, aave]
        assert summary(frames, "protocol:aave:ethereum") == [aave]
        assert summary(frames, "chain:ethereum") == [aave]
        assert sorted(summary(frames, "chain:base")) == sorted([curve, base])
        assert summary(frames, "token:coingecko:ethereum") == [eth]
        assert summary(frames, "price_changes") == [eth]
        assert sorted(summary(frames, "tvl_changes")) == sorted(
            [aave, curve, base, ("tvl_change", "sentinel", "-")])
        # Every frame carries its stream offset, in the frame and in the event.
        offsets = {e.offset for e in updates + events + sentinel}
        assert all(f["offset"] == f["data"]["offset"] and f["offset"] in offsets for f in frames)
        assert frames[-1]["data"]["value"] == 2e6


async def test_filters_narrow_a_subscription(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, _ = await rig.key()
        client = await rig.connect(key)
        await client.subscribe("tvl_changes", filter={"chains": ["Base"], "min_change_pct": 5})
        await client.subscribe("price_changes", filter={"min_change_pct": 1})
        await rig.ingest([point("curve", T0, 1e9, chain="Base"), point("aave", T0, 1e9),
                          point("ethereum", T0, 3000.0, metric="price", chain="-")])
        await rig.ingest([point("curve", T0 + DAY, 1.02e9, chain="Base"),  # +2 %: too small
                          point("aave", T0 + DAY, 1.5e9),  # +50 % on ethereum: wrong chain
                          point("ethereum", T0 + DAY, 3003.0, metric="price", chain="-")])  # 0.1 %
        last = await rig.ingest([point("curve", T0 + 2 * DAY, 1.3e9, chain="Base"),
                                 point("ethereum", T0 + 2 * DAY, 3300.0, metric="price",
                                       chain="-")])
        frames = await client.events_until(lambda f: f["offset"] == last[-1].offset)
        assert [(f["channel"], f["data"]["subject"], f["offset"]) for f in frames] == [
            ("tvl_changes", "curve", last[0].offset),
            ("price_changes", "coingecko:ethereum", last[1].offset)]


async def test_alerts_reach_their_owner_only(both: Settings) -> None:
    async with open_rig(both) as rig:
        alice_key, alice = await rig.key("alice")
        bob_key, bob = await rig.key("bob")
        alice_c = await rig.connect(alice_key)
        alice_2 = await rig.connect(alice_key)  # a second connection of alice: gets hers too
        bob_c = await rig.connect(bob_key)
        nosy = await rig.connect(bob_key)
        for client in (alice_c, alice_2, bob_c):
            await client.subscribe("alerts")
        for channel in ("tvl_changes", "protocol:aave", "chain:ethereum"):
            await nosy.subscribe(channel)

        def fired(i: int, user_id: int, rule_id: int) -> Any:
            return synthetic(i, detail={"user_id": user_id, "rule_id": rule_id},
                             type_="alert_fired")

        await rig.alerts.publish([fired(1, alice.user_id, 10), fired(2, bob.user_id, 20)])
        await rig.alerts.publish([fired(3, alice.user_id, 11)])
        await rig.alerts.publish([synthetic(4, detail={"rule_id": 30}, type_="alert_fired")])
        await rig.alerts.publish([fired(5, bob.user_id, 21)])
        await rig.platform.stream.publish([synthetic(6)])  # a public event, for nosy's barrier

        def rules(frames: list[dict[str, Any]]) -> list[int]:
            assert all(f["channel"] == "alerts" for f in frames)
            assert all(f["data"]["detail"]["user_id"] == frames[0]["data"]["detail"]["user_id"]
                       for f in frames)
            return [f["data"]["detail"]["rule_id"] for f in frames]

        # Rule 11 was published after bob's rule 20: once alice has it, she would have had 20.
        assert rules(await alice_c.events_until(lambda f: f["data"]["detail"]["rule_id"] == 11)) \
            == [10, 11]
        assert rules(await alice_2.events_until(lambda f: f["data"]["detail"]["rule_id"] == 11)) \
            == [10, 11]
        assert rules(await bob_c.events_until(lambda f: f["data"]["detail"]["rule_id"] == 21)) \
            == [20, 21]
        public = await nosy.events_until(lambda f: f["channel"] == "chain:ethereum")
        assert all(f["data"]["type"] == "tvl_change" for f in public)


async def test_alerts_channel_offsets_are_the_alerts_streams(both: Settings) -> None:
    async with open_rig(both) as rig:
        key, alice = await rig.key("alice")
        await rig.platform.stream.publish([synthetic(i) for i in range(1, 6)])  # offsets 1..5
        client = await rig.connect(key)
        await client.subscribe("alerts")
        published = await rig.alerts.publish(
            [synthetic(1, detail={"user_id": alice.user_id, "rule_id": 1}, type_="alert_fired")])
        frame = await client.event()
        assert frame["offset"] == published[0].offset == 1
        assert client.welcome["alerts_stream"]["last_offset"] == 0
