"""The spine end to end on both deployments: ingest -> points + change_log -> processor ->
event stream and hot cache. Each test reads as a timeline."""

from __future__ import annotations

from sqlalchemy import text

from defiwatch.app import open_platform
from defiwatch.config import Settings
from defiwatch.domain import ProtocolMeta

DAY = 86_400
T0 = 1_710_115_200  # 2024-03-11 00:00 UTC


def point(subject: str, ts: int, value: float, metric: str = "tvl", chain: str = "Ethereum"
          ) -> dict[str, object]:
    return {"metric": metric, "subject": subject, "chain": chain, "ts": ts, "value": value}


async def test_points_become_events_once(settings: Settings) -> None:
    async with open_platform(settings) as p:
        processor = p.processor()
        # t0: first points of two series: stored, no bogus +100 % event.
        first = await p.ingest.ingest_points(
            [point("aave", T0, 1e9), point("ethereum", T0, 3000.0, metric="price", chain="-")],
            source="test")
        assert first.accepted == 2
        await processor.drain()
        assert (await p.stream.read(0, 10)).events == []
        # t0+1d: TVL +2 %, price +0.05 % (below the 0.1 % price threshold).
        await p.ingest.ingest_points(
            [point("aave", T0 + DAY, 1.02e9),
             point("ethereum", T0 + DAY, 3001.5, metric="price", chain="-")], source="test")
        await processor.drain()
        events = (await p.stream.read(0, 10)).events
        assert [(e.type, e.subject, e.chain, e.offset) for e in events] == [
            ("tvl_change", "aave", "ethereum", 1)]
        e = events[0]
        assert e.previous == 1e9 and e.value == 1.02e9 and e.ts == T0 + DAY
        assert abs(e.change_pct - 2.0) < 1e-9  # type: ignore[operator]
        assert abs(e.change_24h - 2.0) < 1e-9  # type: ignore[operator]
        assert e.source == "test"
        # The same points again: duplicates, nothing new in the stream.
        again = await p.ingest.ingest_points([point("aave", T0 + DAY, 1.02e9)], source="test")
        assert (again.accepted, again.duplicates) == (0, [0])
        await processor.drain()
        assert (await p.stream.last_offset()) == 1
        # The hot cache has the newest value of every series, significant or not.
        latest = await p.cache.get_latest(metric="price")
        assert [(x.subject, x.value, x.ts) for x in latest] == [
            ("coingecko:ethereum", 3001.5, T0 + DAY)]


async def test_direct_sql_insert_becomes_an_event(settings: Settings) -> None:
    """Another program writes `points` with plain SQL; the trigger captures it."""
    async with open_platform(settings) as p:
        processor = p.processor()
        insert = text("INSERT INTO points (metric, subject, chain, ts, value, source) "
                      "VALUES ('tvl', 'lido', '-', :ts, :value, 'sql')")
        async with p.engine.begin() as conn:
            await conn.execute(insert, {"ts": T0, "value": 3.0e10})
        async with p.engine.begin() as conn:
            await conn.execute(insert, {"ts": T0 + 3600, "value": 2.7e10})
        await processor.drain()
        events = (await p.stream.read(0, 10)).events
        assert [(e.subject, e.value, e.previous, e.source) for e in events] == [
            ("lido", 2.7e10, 3.0e10, "sql")]
        assert abs(events[0].change_1h - (-10.0)) < 1e-9  # type: ignore[operator]


async def test_protocol_metadata_changes_become_protocol_updates(settings: Settings) -> None:
    async with open_platform(settings) as p:
        processor = p.processor()
        aave = ProtocolMeta(slug="aave", name="Aave", category="Lending", chains=("ethereum",))
        assert await p.ingest.ingest_protocols([aave], ts=T0, source="test") == 1
        assert await p.ingest.ingest_protocols([aave], ts=T0 + 60, source="test") == 0
        moved = ProtocolMeta(slug="aave", name="Aave", category="Lending",
                             chains=("ethereum", "base"))
        assert await p.ingest.ingest_protocols([moved], ts=T0 + 120, source="test") == 1
        await processor.drain()
        events = (await p.stream.read(0, 10)).events
        assert [e.type for e in events] == ["protocol_update", "protocol_update"]
        assert events[0].detail is not None and events[0].detail["new"] is True
        assert events[1].detail is not None and events[1].detail["chains_added"] == ["base"]
        # An older observation (a replayed 2023 snapshot) never rolls the protocol back.
        assert await p.ingest.ingest_protocols([aave], ts=T0 - DAY, source="test") == 0
        await processor.drain()
        assert await p.stream.last_offset() == 2


async def test_a_new_processor_resumes_from_the_persisted_cursor(settings: Settings) -> None:
    async with open_platform(settings) as p:
        await p.ingest.ingest_points([point("curve", T0 + i * DAY, 1e8 * (1 + i / 10))
                                      for i in range(3)], source="test")
        assert await p.processor().drain() == 3
        await p.ingest.ingest_points([point("curve", T0 + 3 * DAY, 2e8)], source="test")
        # A fresh processor (a restart) has no memory: it reads the cursor and the stream.
        assert await p.processor().drain() == 1
        events = (await p.stream.read(0, 10)).events
        assert [e.ts for e in events] == [T0 + DAY, T0 + 2 * DAY, T0 + 3 * DAY]
        assert events[-1].previous == 1.2e8


async def test_bad_points_are_rejected_with_reasons_and_good_ones_kept(settings: Settings) -> None:
    async with open_platform(settings) as p:
        result = await p.ingest.ingest_points(
            [point("aave", T0, 1e9), point("aave", T0, float("nan")),
             {"metric": "volume", "subject": "x", "ts": T0, "value": 1},
             point("aave", T0, 1e9)], source="test")  # the last repeats the first
        assert result.accepted == 1
        assert result.duplicates == [3]
        assert [(r.index, r.field) for r in result.rejected] == [(1, "value"), (2, "metric")]
