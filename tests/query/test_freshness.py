"""A cached answer is never older than the newest stored point it covers (both deployments).

Ingest, plain SQL, transactions still in flight while an answer is computed (PostgreSQL's
out-of-order commits included), metadata changes and a pruned change_log all invalidate
exactly what they should; unrelated writes keep answers cached.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from sqlalchemy import delete, insert, text

from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.domain import ProtocolMeta
from defiwatch.query import QueryService
from defiwatch.query.freshness import same_position
from defiwatch.store.schema import change_log, points

from .conftest import DAY, HOUR, NOW_TS, PROTOCOLS, T0, app_for, make_key, make_service, seed


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with open_platform(settings) as p:
        await seed(p)
        yield p


@pytest.fixture
def service(platform: Platform) -> QueryService:
    return make_service(platform)


SNAPSHOT = {"select": ["slug", "tvl", "change_24h"], "where": {"field": "slug", "op": "eq",
                                                                "value": "aave"}}
HISTORY = {"dataset": "tvl", "time": {"from": T0, "to": T0 + 5 * DAY},
           "where": {"and": [{"field": "metric", "op": "eq", "value": "tvl"},
                             {"field": "chain", "op": "eq", "value": "-"}]},
           "group_by": ["subject"], "aggregations": [{"op": "sum", "field": "value"},
                                                     {"op": "count"}]}


async def ask(service: QueryService, body: dict[str, Any]) -> tuple[str, Any]:
    answer = await service.advanced(body)
    return answer.cache, msgspec.json.decode(answer.page.data)


def point(subject: str, ts: int, value: float, metric: str = "tvl", chain: str = "-"
          ) -> dict[str, Any]:
    return {"metric": metric, "subject": subject, "chain": chain, "ts": ts, "value": value}


async def test_an_ingested_point_makes_the_next_identical_query_miss_and_show_it(
    platform: Platform, service: QueryService
) -> None:
    assert await ask(service, SNAPSHOT) == ("miss", [{"slug": "aave", "tvl": 1000.0,
                                                      "change_24h": 25.0}])
    assert (await ask(service, SNAPSHOT))[0] == "hit"
    await platform.ingest.ingest_points([point("aave", NOW_TS + DAY, 1200.0)], source="t")
    # The previous day's reference is the point at NOW_TS (1000): +20 %.
    assert await ask(service, SNAPSHOT) == ("miss", [{"slug": "aave", "tvl": 1200.0,
                                                      "change_24h": 20.0}])
    assert (await ask(service, SNAPSHOT))[0] == "hit"

    cache, before = await ask(service, HISTORY)
    assert cache == "miss" and {"subject": "lido", "sum_value": 1.0, "count": 1} not in before
    await platform.ingest.ingest_points([point("lido", T0 + DAY, 1.0)], source="t")
    cache, after = await ask(service, HISTORY)
    assert cache == "miss" and {"subject": "lido", "sum_value": 1.0, "count": 1} in after


async def test_writes_outside_what_an_answer_covers_keep_it_cached(
    platform: Platform, service: QueryService
) -> None:
    await ask(service, HISTORY)
    await platform.ingest.ingest_points([
        point("coingecko:ethereum", NOW_TS + HOUR, 1.0, metric="price"),  # another dataset
        point("aave", T0 + 6 * DAY + 1, 1.0),  # the dataset, outside the time range
        point("aave", T0, 2.0, metric="tvl", chain="polygon"),  # in range, filtered out by
    ], source="t")  # `where` (deps are per dataset and time range: a conservative miss is ok)
    assert (await ask(service, HISTORY))[0] == "miss"
    assert (await ask(service, HISTORY))[0] == "hit"
    await platform.ingest.ingest_points([point("coingecko:bitcoin", NOW_TS + HOUR, 1.0,
                                               metric="price")], source="t")
    assert (await ask(service, HISTORY))[0] == "hit"
    assert (await ask(service, SNAPSHOT))[0] == "miss"
    await platform.ingest.ingest_points([point("coingecko:ethereum", NOW_TS + 2 * HOUR, 1.0,
                                               metric="price")], source="t")
    assert (await ask(service, SNAPSHOT))[0] == "hit"  # prices are not in the snapshot


async def test_plain_sql_inserts_invalidate_too(platform: Platform, service: QueryService) -> None:
    await ask(service, HISTORY)
    async with platform.engine.begin() as conn:
        await conn.execute(insert(points).values(point("sushi", T0 + 2 * DAY, 7.0) |
                                                 {"source": "sql"}))
    cache, data = await ask(service, HISTORY)
    assert cache == "miss" and {"subject": "sushi", "sum_value": 7.0, "count": 1} in data


async def test_a_transaction_in_flight_while_the_answer_is_computed(
    platform: Platform, service: QueryService
) -> None:
    """The answer computed while a write is uncommitted must not survive its commit. On
    PostgreSQL the in-flight transaction also holds a smaller id than one committed after it
    (out-of-order commit), which an `id > watermark` check alone would miss."""
    pg = platform.settings.is_postgres
    async with platform.engine.connect() as slow:
        await slow.execute(insert(points).values(point("slowpoke", T0 + DAY, 5.0) |
                                                 {"source": "sql"}))
        if pg:  # a later transaction commits first, with a larger change_log id
            await platform.ingest.ingest_points([point("quick", T0 + DAY, 3.0)], source="t")
        cache, data = await ask(service, HISTORY)
        subjects = {r["subject"] for r in data}
        assert cache == "miss" and "slowpoke" not in subjects and ("quick" in subjects) == pg
        assert (await ask(service, HISTORY))[0] == "hit"
        await slow.commit()
    cache, data = await ask(service, HISTORY)
    assert cache == "miss" and "slowpoke" in {r["subject"] for r in data}


async def test_protocol_metadata_changes_invalidate_the_snapshot(
    platform: Platform, service: QueryService
) -> None:
    body = {"group_by": ["category"], "aggregations": [{"op": "count"}],
            "where": {"field": "slug", "op": "eq", "value": "lido"}}
    assert (await ask(service, body))[1] == [{"category": "Liquid Staking", "count": 1}]
    lido = next(p for p in PROTOCOLS if p.slug == "lido")
    changed = ProtocolMeta(**{**{f: getattr(lido, f) for f in lido.__struct_fields__},
                              "category": "Restaking"})
    await platform.ingest.ingest_protocols([changed], ts=T0 + DAY, source="t")
    assert await ask(service, body) == ("miss", [{"category": "Restaking", "count": 1}])


async def test_a_pruned_change_log_counts_as_changed(platform: Platform,
                                                     service: QueryService) -> None:
    await ask(service, HISTORY)
    await platform.ingest.ingest_points([point("ghost", T0 + DAY, 1.0)], source="t")
    async with platform.engine.begin() as conn:  # an over-eager prune drops the evidence
        await conn.execute(delete(change_log))
    await platform.ingest.ingest_points([point("coingecko:x", NOW_TS, 1.0, metric="price")],
                                        source="t")
    cache, data = await ask(service, HISTORY)
    assert cache == "miss" and "ghost" in {r["subject"] for r in data}


async def test_random_interleavings_never_serve_a_stale_answer(
    platform: Platform, service: QueryService
) -> None:
    rng = random.Random(7)
    bodies = [SNAPSHOT, HISTORY, {"dataset": "prices", "aggregations": [
        {"op": "max", "field": "ts"}, {"op": "count"}]},
        {"group_by": ["category"], "aggregations": [{"op": "sum", "field": "tvl"}]}]
    outcomes = set()
    for step in range(40):
        action = rng.random()
        if action < 0.4:
            metric = rng.choice(["tvl", "price", "mcap"])
            subject = rng.choice(["aave", "lido", "newcomer"]) if metric == "tvl" else rng.choice(
                ["coingecko:ethereum", "coingecko:aave"])
            ts = rng.choice([T0 + rng.randrange(6) * DAY, NOW_TS + (step + 1) * HOUR])
            await platform.ingest.ingest_points([point(subject, ts, rng.uniform(1, 9e3), metric)],
                                                source="t")
        else:
            body = rng.choice(bodies)
            answer = await service.advanced(body)
            fresh = await service.advanced(body, use_cache=False)
            outcomes.add(answer.cache)
            assert answer.page.data == fresh.page.data, (step, body)
    assert outcomes == {"hit", "miss"}


async def test_compat_answers_follow_ingest(platform: Platform, service: QueryService) -> None:
    key = await make_key(platform, "read")
    async with app_for(platform, service) as client:
        first = await client.get("/tvl/aave", params={"apiKey": key})
        assert first.json() == 1000.0 and first.headers["x-query-cache"] == "miss"
        assert (await client.get("/tvl/aave", params={"apiKey": key})).headers[
            "x-query-cache"] == "hit"
        await platform.ingest.ingest_points([point("aave", NOW_TS + HOUR, 1111.0)], source="t")
        again = await client.get("/tvl/aave", params={"apiKey": key})
        assert again.json() == 1111.0 and again.headers["x-query-cache"] == "miss"


async def test_concurrent_misses_share_one_computation(platform: Platform,
                                                       service: QueryService) -> None:
    answers = await asyncio.gather(*[service.advanced(SNAPSHOT) for _ in range(20)])
    assert len({a.page.data for a in answers}) == 1
    async with platform.engine.connect() as conn:  # and the read model is one refresh deep
        row = (await conn.execute(text(
            "SELECT watermark FROM query_refresh WHERE name = 'index'"))).scalar_one()
    assert row is not None
    assert (await service.advanced(SNAPSHOT)).cache == "hit"


def test_watermarks_at_the_same_change_log_position_are_the_same_position() -> None:
    # A hit re-stores its entry only when the position moved: xmin/xmax alone do not move it.
    assert same_position("41|100:105:", "41|103:110:")
    assert same_position("41|100:105:101,102", "41|99:120:101,102")
    assert same_position("7", "7")
    assert not same_position("41|100:105:", "42|100:105:")
    assert not same_position("41|100:105:", "41|100:105:101")
    assert not same_position("41|100:105:101", "41|100:105:102")
