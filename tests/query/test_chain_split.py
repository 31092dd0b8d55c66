"""Right numbers per chain and per metric, on SQLite and PostgreSQL alike.

- the `protocols` dataset grouped (or filtered) by chain splits each protocol by its per-chain
  TVL, in both request shapes;
- `/protocols` and `/protocol/{slug}` describe one observation time per protocol, so
  tvl = sum(chainTvls) even when a newer total came without chains or a chain was dropped;
- negative TVL is stored and served as the source reported it;
- aggregates of `value` over several metrics are refused with the field at fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.domain import normalize_chain, split_chain_tvl_key

from .conftest import (
    DAY,
    HOUR,
    NOW_TS,
    Served,
    api_for,
    app_for,
    make_key,
    make_service,
    over_http,
    seed,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BY_CHAIN = {"group_by": ["chain"], "aggregations": [{"op": "sum", "field": "tvl"},
                                                   {"op": "count"}], "sort": ["chain"]}
# From conftest.CHAIN_TVL_NOW; `mystery` has no TVL at all and no chain.
SPLIT = [{"chain": "arbitrum", "sum_tvl": 300.0, "count": 1},
         {"chain": "bsc", "sum_tvl": 500.0, "count": 2},
         {"chain": "ethereum", "sum_tvl": 7600.0, "count": 4},
         {"chain": "polygon", "sum_tvl": 300.0, "count": 1},
         {"chain": None, "sum_tvl": None, "count": 1}]


async def test_group_by_chain_splits_each_protocol(served: Served) -> None:
    response = await served.query(BY_CHAIN)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == SPLIT


async def test_group_by_chain_in_the_original_shape(served: Served) -> None:
    response = await served.query({
        "aggregations": [{"field": "tvl", "operation": "sum", "group_by": "chain"}],
        "sort": {"field": "tvl", "order": "desc"}})
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [
        {"chain": "ethereum", "sum_tvl": 7600.0}, {"chain": "bsc", "sum_tvl": 500.0},
        {"chain": "arbitrum", "sum_tvl": 300.0}, {"chain": "polygon", "sum_tvl": 300.0},
        {"chain": None, "sum_tvl": None}]


async def test_a_chain_condition_sums_that_chain(served: Served) -> None:
    response = await served.query({
        "where": {"field": "chain", "op": "eq", "value": "Binance"},  # normalised to bsc
        "aggregations": [{"op": "sum", "field": "tvl"}, {"op": "count_distinct", "field": "slug"}]})
    assert response.json()["data"] == [{"sum_tvl": 500.0, "count_distinct_slug": 2}]


async def test_chain_groups_page_by_keyset(served: Served) -> None:
    rows: list[dict[str, Any]] = []
    body: dict[str, Any] = {**BY_CHAIN, "limit": 2}
    while True:
        page = (await served.query(body)).json()
        rows += page["data"]
        if page["meta"]["next_cursor"] is None:
            break
        body = {**body, "cursor": page["meta"]["next_cursor"]}
    assert rows == SPLIT


async def test_a_row_query_cannot_split_rows(served: Served) -> None:
    response = await served.query({"select": ["slug", "chain"]})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "select"


async def test_aggregates_over_mixed_metrics_are_a_400_naming_the_field(served: Served) -> None:
    mixed = {"dataset": "prices", "where": {"field": "coin", "op": "eq", "value": "aave"},
             "aggregations": [{"op": "percentile", "field": "value", "p": 0.5}]}
    response = await served.query(mixed)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "aggregations[0].field"
    one = {**mixed, "where": {"and": [mixed["where"],
                                      {"field": "metric", "op": "eq", "value": "mcap"}]}}
    assert (await served.query(one)).json()["data"] == [{"p50_value": 50.0}]


async def test_the_split_and_the_metric_rule_over_a_real_server(served: Served) -> None:
    """The same answers through uvicorn on loopback (HTTP parsing, middleware, real sockets)."""
    mixed = {"dataset": "prices", "aggregations": [{"op": "avg", "field": "value"}]}
    async with over_http(api_for(served.platform, served.service)) as url, httpx.AsyncClient(
            base_url=url, headers=served.auth) as client:
        split = await client.post("/v1/query/advanced", json=BY_CHAIN)
        refused = await client.post("/v1/query/advanced", json=mixed)
    assert split.status_code == 200, split.text
    assert split.json()["data"] == SPLIT
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "aggregations[0].field"


async def test_price_rows_say_their_metric(served: Served) -> None:
    response = await served.query({"dataset": "prices", "time": {"from": NOW_TS, "to": NOW_TS + 1},
                                   "select": ["coin", "metric", "value"],
                                   "sort": ["coin", "metric"]})
    assert response.json()["data"] == [
        {"coin": "coingecko:aave", "metric": "mcap", "value": 50.0},
        {"coin": "coingecko:bitcoin", "metric": "price", "value": 43_900.0},
        {"coin": "coingecko:ethereum", "metric": "price", "value": 2_039.0},
        {"coin": "coingecko:lido-dao", "metric": "mcap", "value": 700.0},
        {"coin": "coingecko:uniswap", "metric": "mcap", "value": 300.0}]


# ---- a data set that moves on: totals without chains, a dropped chain, a negative chain ----

def _point(subject: str, chain: str, ts: int, value: float) -> dict[str, Any]:
    return {"metric": "tvl", "subject": subject, "chain": chain, "ts": ts, "value": value}


LATER = [
    _point("aave", "-", NOW_TS + DAY, 1200.0),  # a total observed without its chains
    _point("uniswap", "-", NOW_TS + 2 * DAY, 1800.0),  # bsc no longer reported
    _point("uniswap", "ethereum", NOW_TS + 2 * DAY, 1500.0),
    _point("uniswap", "arbitrum", NOW_TS + 2 * DAY, 300.0),
    _point("compound", "-", NOW_TS + 3 * DAY, 350.0),  # DefiLlama reports negative TVL too
    _point("compound", "ethereum", NOW_TS + 3 * DAY, 400.0),
    _point("compound", "polygon", NOW_TS + 3 * DAY, -50.0),
]


@pytest_asyncio.fixture(loop_scope="module")
async def moved(settings: Settings) -> AsyncIterator[tuple[Platform, httpx.AsyncClient]]:
    async with open_platform(settings) as platform:
        await seed(platform)
        result = await platform.ingest.ingest_points(LATER, source="test")
        assert not result.rejected, result.rejected
        key = await make_key(platform, "read")
        async with app_for(platform, make_service(platform)) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            yield platform, client


def _plain(chain_tvls: dict[str, float]) -> float:
    return sum(v for k, v in chain_tvls.items() if split_chain_tvl_key(k) == (
        "tvl", normalize_chain(k)))


async def test_protocols_use_one_observation_time(
        moved: tuple[Platform, httpx.AsyncClient]) -> None:
    _, client = moved
    listed = {p["slug"]: p for p in (await client.get("/protocols")).json()}
    aave = listed["aave"]  # the newer total has no chains: the older complete one is shown
    assert aave["tvl"] == 1000.0
    assert aave["chainTvls"] == {"Ethereum": 700.0, "Polygon": 300.0, "borrowed": 400.0}
    assert aave["change_1d"] == pytest.approx(25.0)  # at that time: 1000 vs 800 a day before
    assert aave["change_1h"] == pytest.approx((1000 - 990) / 990 * 100)
    assert listed["uniswap"]["tvl"] == 1800.0
    assert listed["uniswap"]["chainTvls"] == {"Ethereum": 1500.0, "Arbitrum": 300.0}
    assert listed["compound"]["chainTvls"] == {"Ethereum": 400.0, "Polygon": -50.0}
    for slug, p in listed.items():
        if p["chainTvls"]:
            assert p["tvl"] == pytest.approx(_plain(p["chainTvls"]), rel=1e-12), slug


async def test_protocol_current_chains_share_that_time(
        moved: tuple[Platform, httpx.AsyncClient]) -> None:
    _, client = moved
    uniswap = (await client.get("/protocol/uniswap")).json()
    assert uniswap["currentChainTvls"] == {"Ethereum": 1500.0, "Arbitrum": 300.0}
    assert uniswap["chainTvls"]["Binance"]["tvl"] == [  # history is kept whole
        {"date": NOW_TS, "totalLiquidityUSD": 200.0}]
    aave = (await client.get("/protocol/aave")).json()
    assert aave["currentChainTvls"] == {"Ethereum": 700.0, "Polygon": 300.0, "borrowed": 400.0}
    assert aave["tvl"][-1] == {"date": NOW_TS + DAY, "totalLiquidityUSD": 1200.0}
    assert aave["tvl"][-3:-1] == [{"date": NOW_TS - HOUR, "totalLiquidityUSD": 990.0},
                                  {"date": NOW_TS, "totalLiquidityUSD": 1000.0}]


async def test_the_chain_split_follows_the_newest_chain_observation(
        moved: tuple[Platform, httpx.AsyncClient]) -> None:
    _, client = moved
    split = (await client.post("/v1/query/advanced", json=BY_CHAIN)).json()["data"]
    assert {r["chain"]: r["sum_tvl"] for r in split} == {
        "arbitrum": 300.0, "bsc": 300.0, "ethereum": 7600.0, "polygon": 250.0, None: None}
    # The dataset's own tvl stays the newest total, observed with or without chains.
    newest = await client.post("/v1/query/advanced", json={
        "select": ["slug", "tvl"], "where": {"field": "slug", "op": "eq", "value": "aave"}})
    assert newest.json()["data"] == [{"slug": "aave", "tvl": 1200.0}]


async def test_a_protocol_known_only_by_its_points_is_served(settings: Settings) -> None:
    """Points ingested before the protocol's metadata or snapshot exist (was a 500)."""
    async with open_platform(settings) as platform:
        result = await platform.ingest.ingest_points(
            [_point("fresh-protocol", "ethereum", NOW_TS, 5.0)], source="test")
        assert not result.rejected, result.rejected
        key = await make_key(platform, "read")
        async with app_for(platform, make_service(platform)) as client:
            response = await client.get("/protocol/fresh-protocol",
                                        headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["slug"] == "fresh-protocol"
    assert body["chainTvls"]["Ethereum"]["tvl"] == [{"date": NOW_TS, "totalLiquidityUSD": 5.0}]
