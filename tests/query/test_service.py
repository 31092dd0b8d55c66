"""Queries against the seeded data set on SQLite and PostgreSQL: every operator, aggregation,
time bucket, having, multi-key sort, projection, pagination and CSV, with answers computed by
hand (or by plain Python from the seed); both databases must give them, so they agree."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest

from .conftest import (
    CHAIN_DAYS,
    DAY,
    HOUR,
    NOW_TS,
    T0,
    TOTALS,
    Served,
    chain_tvl,
    points,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHANGE_1H = (1000 - 990) / 990 * 100


def close(a: Any, b: Any) -> bool:
    """Equal, with floats to 1e-12 relative (sums may round differently per database)."""
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    return bool(a == b)


def slugs(rows: list[dict[str, Any]]) -> list[str]:
    return [r["slug"] for r in rows]


SNAPSHOT_CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("original shape", {
        "filters": {"chains": ["Ethereum"], "tvl_range": {"min": 500}},
        "aggregations": [{"field": "tvl", "operation": "sum", "group_by": "category"}],
        "sort": {"field": "tvl", "order": "desc"}},
     [{"category": "Liquid Staking", "sum_tvl": 5000.0}, {"category": "Dexes", "sum_tvl": 2000.0},
      {"category": "Lending", "sum_tvl": 1000.0}]),
    ("original change_24h", {"filters": {"change_24h": {"min": 0, "max": 30}}},
     ["aave", "uniswap"]),
    ("original protocols", {"filters": {"protocols": ["AAVE", "lido", "nope"]}},
     ["aave", "lido"]),
    ("eq", {"where": {"field": "category", "op": "eq", "value": "Dexes"}},
     ["pancakeswap", "uniswap"]),
    ("ne excludes null", {"where": {"field": "category", "op": "ne", "value": "Lending"}},
     ["lido", "pancakeswap", "uniswap"]),
    ("eq null", {"where": {"field": "category", "op": "eq", "value": None}}, ["mystery"]),
    ("ne null", {"where": {"field": "tvl", "op": "ne", "value": None}},
     ["aave", "compound", "lido", "pancakeswap", "uniswap"]),
    ("gt", {"where": {"field": "tvl", "op": "gt", "value": 1000}}, ["lido", "uniswap"]),
    ("gte", {"where": {"field": "tvl", "op": "gte", "value": 1000}}, ["aave", "lido", "uniswap"]),
    ("lt", {"where": {"field": "change_24h", "op": "lt", "value": 0}}, ["compound"]),
    ("lte", {"where": {"field": "change_24h", "op": "lte", "value": 0}},
     ["compound", "uniswap"]),
    ("in", {"where": {"field": "slug", "op": "in", "value": ["Uniswap", "compound"]}},
     ["compound", "uniswap"]),
    ("nin", {"where": {"field": "category", "op": "nin", "value": ["Lending", "Dexes"]}},
     ["lido"]),
    ("between", {"where": {"field": "tvl", "op": "between", "value": [300, 1000]}},
     ["aave", "compound", "pancakeswap"]),
    ("contains text, any case", {"where": {"field": "name", "op": "contains", "value": "SWAP"}},
     ["pancakeswap", "uniswap"]),
    ("contains a chain", {"where": {"field": "chains", "op": "contains", "value": "BSC"}},
     ["pancakeswap", "uniswap"]),
    ("chains in", {"where": {"field": "chains", "op": "in", "value": ["polygon", "Arbitrum"]}},
     ["aave", "uniswap"]),
    ("chains nin", {"where": {"field": "chains", "op": "nin", "value": ["ethereum"]}},
     ["mystery", "pancakeswap"]),
    ("or / not (three-valued: NULL tvl is neither)", {"where": {"or": [
        {"field": "category", "op": "eq", "value": "Dexes"},
        {"not": {"field": "tvl", "op": "lt", "value": 4000}}]}},
     ["lido", "pancakeswap", "uniswap"]),
    ("and of or", {"where": {"and": [
        {"or": [{"field": "change_7d", "op": "gte", "value": 100},
                {"field": "mcap", "op": "gt", "value": 500}]},
        {"field": "symbol", "op": "ne", "value": "UNI"}]}}, ["aave", "lido"]),
    ("windowed changes and mcap", {"select": ["slug", "tvl", "ts", "change_1h", "change_24h",
                                              "change_7d", "mcap"],
                                   "where": {"field": "tvl", "op": "ne", "value": None}},
     [{"slug": "aave", "tvl": 1000.0, "ts": NOW_TS, "change_1h": CHANGE_1H, "change_24h": 25.0,
       "change_7d": 100.0, "mcap": 50.0},
      {"slug": "compound", "tvl": 400.0, "ts": NOW_TS, "change_1h": None, "change_24h": -20.0,
       "change_7d": None, "mcap": None},
      {"slug": "lido", "tvl": 5000.0, "ts": NOW_TS, "change_1h": None, "change_24h": None,
       "change_7d": None, "mcap": 700.0},
      {"slug": "pancakeswap", "tvl": 300.0, "ts": NOW_TS, "change_1h": None, "change_24h": 50.0,
       "change_7d": None, "mcap": None},
      {"slug": "uniswap", "tvl": 2000.0, "ts": NOW_TS, "change_1h": None, "change_24h": 0.0,
       "change_7d": 100.0, "mcap": 300.0}]),
    ("projection and multi-key sort", {"select": ["slug", "category", "chains"],
                                       "sort": ["category", "-tvl"]},
     [{"slug": "uniswap", "category": "Dexes", "chains": ["ethereum", "arbitrum", "bsc"]},
      {"slug": "pancakeswap", "category": "Dexes", "chains": ["bsc"]},
      {"slug": "aave", "category": "Lending", "chains": ["ethereum", "polygon"]},
      {"slug": "compound", "category": "Lending", "chains": ["ethereum"]},
      {"slug": "lido", "category": "Liquid Staking", "chains": ["ethereum"]},
      {"slug": "mystery", "category": None, "chains": []}]),
    ("every aggregation by group", {
        "group_by": ["category"],
        "aggregations": [{"op": "count"}, {"op": "count", "field": "tvl"},
                         {"op": "count_distinct", "field": "symbol"},
                         {"op": "sum", "field": "tvl"}, {"op": "avg", "field": "tvl"},
                         {"op": "min", "field": "tvl"}, {"op": "max", "field": "tvl"},
                         {"op": "percentile", "field": "tvl", "p": 0.5},
                         {"op": "percentile", "field": "tvl", "p": 0.9, "as": "p90"},
                         {"op": "max", "field": "listed_at"}],
        "sort": ["category"]},
     [{"category": "Dexes", "count": 2, "count_tvl": 2, "count_distinct_symbol": 2,
       "sum_tvl": 2300.0, "avg_tvl": 1150.0, "min_tvl": 300.0, "max_tvl": 2000.0,
       "p50_tvl": 1150.0, "p90": 300 + 0.9 * 1700, "max_listed_at": None},
      {"category": "Lending", "count": 2, "count_tvl": 2, "count_distinct_symbol": 2,
       "sum_tvl": 1400.0, "avg_tvl": 700.0, "min_tvl": 400.0, "max_tvl": 1000.0,
       "p50_tvl": 700.0, "p90": 400 + 0.9 * 600, "max_listed_at": 1_600_000_000},
      {"category": "Liquid Staking", "count": 1, "count_tvl": 1, "count_distinct_symbol": 1,
       "sum_tvl": 5000.0, "avg_tvl": 5000.0, "min_tvl": 5000.0, "max_tvl": 5000.0,
       "p50_tvl": 5000.0, "p90": 5000.0, "max_listed_at": None},
      {"category": None, "count": 1, "count_tvl": 0, "count_distinct_symbol": 0,
       "sum_tvl": None, "avg_tvl": None, "min_tvl": None, "max_tvl": None,
       "p50_tvl": None, "p90": None, "max_listed_at": None}]),
    ("aggregation without groups", {"aggregations": [
        {"op": "percentile", "field": "tvl", "p": 0.25}, {"op": "count_distinct",
                                                           "field": "category"}]},
     [{"p25_tvl": 400.0, "count_distinct_category": 3}]),  # sorted: 300 400 1000 2000 5000
    ("having", {"group_by": ["category"], "aggregations": [{"op": "sum", "field": "tvl",
                                                            "as": "total"}],
                "having": {"field": "total", "op": "gt", "value": 1500}, "sort": ["-total"]},
     [{"category": "Liquid Staking", "total": 5000.0}, {"category": "Dexes", "total": 2300.0}]),
    ("having on a group key", {"group_by": ["category"], "aggregations": [{"op": "count"}],
                               "having": {"field": "category", "op": "ne", "value": None}},
     [{"category": "Dexes", "count": 2}, {"category": "Lending", "count": 2},
      {"category": "Liquid Staking", "count": 1}]),
    ("group by without aggregations is distinct", {"group_by": ["category"],
                                                    "sort": [{"field": "category",
                                                              "order": "desc"}]},
     [{"category": "Liquid Staking"}, {"category": "Lending"}, {"category": "Dexes"},
      {"category": None}]),
]


@pytest.mark.parametrize(("name", "body", "expected"), SNAPSHOT_CASES,
                         ids=[c[0] for c in SNAPSHOT_CASES])
async def test_snapshot_queries(served: Served, name: str, body: dict[str, Any],
                                expected: Any) -> None:
    response = await served.query(body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    if expected and isinstance(expected[0], str):
        assert slugs(data) == expected
    else:
        assert close(data, expected), data


def _bucket_start(ts: int, bucket: str) -> int:
    if bucket == "1h":
        return ts - ts % HOUR
    if bucket == "1d":
        return ts - ts % DAY
    if bucket == "1w":
        return ts - (ts - 4 * DAY) % (7 * DAY)
    d = datetime.fromtimestamp(ts, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp())


def _oracle(metric: str, subject: str | None, bucket: str, start: int, end: int
            ) -> list[dict[str, Any]]:
    groups: dict[int, list[float]] = defaultdict(list)
    for p in points():
        if p["metric"] == metric and (subject is None or p["subject"] == subject) and (
                start <= p["ts"] < end):
            groups[_bucket_start(p["ts"], bucket)].append(p["value"])
    return [{"bucket": b, "count": len(v), "avg_value": sum(v) / len(v), "min_value": min(v),
             "max_value": max(v)} for b, v in sorted(groups.items())]


@pytest.mark.parametrize(("bucket", "metric", "subject", "start", "end"), [
    ("1h", "price", "coingecko:ethereum", NOW_TS - DAY, NOW_TS + 1),
    ("1d", "price", "coingecko:ethereum", NOW_TS - 3 * DAY, NOW_TS + 1),
    ("1w", "chain_tvl", "ethereum", T0 - 29 * DAY, NOW_TS + 1),
    ("1mo", "price", "coingecko:bitcoin", T0 - 29 * DAY, NOW_TS + 1),
    ("1mo", "chain_tvl", None, T0 - 40 * DAY, NOW_TS + 1),
])
async def test_time_buckets(served: Served, bucket: str, metric: str, subject: str | None,
                            start: int, end: int) -> None:
    dataset = "prices" if metric == "price" else "tvl"
    where: list[dict[str, Any]] = [{"field": "metric", "op": "eq", "value": metric}]
    if subject is not None:
        where.append({"field": "coin" if dataset == "prices" else "subject", "op": "eq",
                      "value": subject})
    body = {"dataset": dataset, "time": {"from": start, "to": end}, "where": {"and": where},
            "group_by": [{"bucket": bucket}], "aggregations": [
                {"op": "count"}, {"op": "avg", "field": "value"}, {"op": "min", "field": "value"},
                {"op": "max", "field": "value"}], "sort": ["bucket"], "limit": 1000}
    response = await served.query(body)
    assert response.status_code == 200, response.text
    expected = _oracle(metric, subject, bucket, start, end)
    assert len(expected) > 1
    assert close(response.json()["data"], expected)


async def test_history_percentile_per_group_and_as_of(served: Served) -> None:
    body = {"dataset": "tvl", "where": {"field": "metric", "op": "eq", "value": "chain_tvl"},
            "time": {"from": T0}, "group_by": ["subject"],
            "aggregations": [{"op": "percentile", "field": "value", "p": 0.9},
                             {"op": "count_distinct", "field": "ts"}], "sort": ["subject"]}
    answer = (await served.query(body)).json()
    expected = []
    for chain in ("arbitrum", "bsc", "ethereum"):
        values = sorted(chain_tvl(chain, d) for d in CHAIN_DAYS if d >= 0)
        pos = 0.9 * (len(values) - 1)
        lo, frac = int(pos), pos - int(pos)
        expected.append({"subject": chain, "p90_value": values[lo] + frac * (values[lo + 1]
                                                                            - values[lo]),
                         "count_distinct_ts": 11})
    assert close(answer["data"], expected)
    assert answer["meta"]["as_of"] == NOW_TS


async def test_category_join_on_history(served: Served) -> None:
    body = {"dataset": "tvl", "where": {"and": [
        {"field": "category", "op": "eq", "value": "Lending"},
        {"field": "chain", "op": "eq", "value": "-"}, {"field": "metric", "op": "eq",
                                                       "value": "tvl"}]},
        "group_by": ["subject", "category"], "aggregations": [{"op": "sum", "field": "value"}]}
    data = (await served.query(body)).json()["data"]
    aave = sum(v for v in TOTALS["aave"] if v is not None) + 990.0
    assert close(data, [{"subject": "aave", "category": "Lending", "sum_value": aave},
                        {"subject": "compound", "category": "Lending", "sum_value": 900.0}])


@pytest.mark.parametrize("page_size", [1, 2, 4])
async def test_pages_cover_the_snapshot_once_in_order(served: Served, page_size: int) -> None:
    body: dict[str, Any] = {"select": ["slug", "tvl"], "sort": ["-tvl"], "limit": page_size}
    seen: list[str] = []
    while True:
        answer = (await served.query(body)).json()
        seen += slugs(answer["data"])
        assert answer["meta"]["count"] == len(answer["data"])
        if answer["meta"]["next_cursor"] is None:
            break
        body["cursor"] = answer["meta"]["next_cursor"]
    assert seen == ["lido", "uniswap", "aave", "compound", "pancakeswap", "mystery"]


async def test_pages_of_history_and_of_groups(served: Served) -> None:
    expected = sorted(((p["ts"], p["value"]) for p in points()
                       if p["metric"] == "price" and p["subject"] == "coingecko:ethereum"),
                      reverse=True)
    body: dict[str, Any] = {"dataset": "prices", "select": ["ts", "value"], "limit": 7,
                            "where": {"field": "coin", "op": "eq", "value": "ethereum"},
                            "sort": ["-ts"]}
    got: list[tuple[int, float]] = []
    while True:
        answer = (await served.query(body)).json()
        got += [(r["ts"], r["value"]) for r in answer["data"]]
        if not answer["meta"]["next_cursor"]:
            break
        body["cursor"] = answer["meta"]["next_cursor"]
    assert got == expected
    # Groups sorted by a nullable aggregate, paged one at a time.
    body = {"group_by": ["category"], "aggregations": [{"op": "max", "field": "change_24h"}],
            "sort": ["-max_change_24h"], "limit": 1}
    order = []
    while True:
        answer = (await served.query(body)).json()
        order += [(r["category"], r["max_change_24h"]) for r in answer["data"]]
        if not answer["meta"]["next_cursor"]:
            break
        body["cursor"] = answer["meta"]["next_cursor"]
    assert order == [("Dexes", 50.0), ("Lending", 25.0), ("Liquid Staking", None), (None, None)]


async def test_a_cursor_from_another_query_is_refused(served: Served) -> None:
    first = (await served.query({"select": ["slug"], "limit": 1})).json()
    response = await served.query({"select": ["slug", "tvl"], "limit": 1,
                                   "cursor": first["meta"]["next_cursor"]})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "cursor"


async def test_meta_and_cache_outcome(served: Served) -> None:
    body = {"select": ["slug"], "where": {"field": "slug", "op": "eq", "value": "lido"}}
    first = (await served.query(body, **{"Cache-Control": "no-cache"})).json()["meta"]
    again = await served.query(body)
    meta = again.json()["meta"]
    assert first["cache"] == "miss" and meta["cache"] == "hit"
    assert set(meta) == {"count", "next_cursor", "as_of", "cache", "took_ms"}
    assert meta["as_of"] == NOW_TS and meta["count"] == 1 and meta["took_ms"] >= 0
    assert again.headers["x-query-cache"] == "hit"


async def test_csv_export(served: Served) -> None:
    response = await served.client.post(
        "/v1/query/advanced", json={"select": ["slug", "name", "chains", "change_24h"]},
        headers={**served.auth, "Accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["slug", "name", "chains", "change_24h"]
    assert rows[1] == ["aave", "Aave", "ethereum;polygon", "25.0"]
    assert rows[-1] == ["uniswap", "Uniswap", "ethereum;arbitrum;bsc", "0.0"]
    mystery = next(r for r in rows if r[0] == "mystery")
    assert mystery[1] == "'=HYPERLINK(\"x\")" and mystery[3] == ""  # formula defused, null empty
    assert response.headers["x-query-count"] == "6"


async def test_rejections_over_http_name_the_path(served: Served) -> None:
    response = await served.query({"dataset": "tvl", "where": {"and": [
        {"field": "metric", "op": "eq", "value": "tvl"},
        {"field": "value", "op": "between", "value": [5, 1]}]}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"] == "where.and[1].value" and error["code"] == "invalid_request"
    bad_json = await served.client.post("/v1/query/advanced", content=b"{nope",
                                        headers={**served.auth,
                                                 "content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    anonymous = await served.client.post("/v1/query/advanced", json={})
    assert anonymous.status_code == 401


async def test_fields_endpoint_lists_the_whitelist(served: Served) -> None:
    fields = (await served.client.get("/v1/query/fields", headers=served.auth)).json()
    assert set(fields) == {"protocols", "tvl", "prices"}
    assert fields["protocols"]["fields"]["chains"]["type"] == "list"

