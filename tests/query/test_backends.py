"""SQLite and PostgreSQL give the same answers: to the table of query cases, and to
hypothesis-generated hostile queries (injection attempts in field names, operators, aliases,
values and cursors), which must be refused identically or answered identically, and leave
every table as it was."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from defiwatch.store.schema import api_keys, change_log, points, protocols

from .conftest import NOW_TS, T0, Served
from .test_service import SNAPSHOT_CASES, close

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOSTILE = st.sampled_from([
    "'; DROP TABLE points; --", "' OR '1'='1", '"; DELETE FROM protocols; --', "%", "_",
    "\\", "aave' --", "Robert'); DROP TABLE api_keys;--", "1 UNION SELECT key_hash FROM api_keys",
    "x' AND pg_sleep(5) IS NULL --", "ethereum\"]", "]", "\"", "É", "🦙", "Swap%",
])
STRING_FIELDS = ["slug", "name", "category", "gecko_id", "symbol", "chains"]
FIELDS = st.one_of(st.sampled_from([*STRING_FIELDS, "tvl", "ts"]), HOSTILE)
OPS = st.one_of(st.sampled_from(["eq", "ne", "in", "nin", "contains"]), HOSTILE)
VALUE = st.one_of(HOSTILE, st.sampled_from(["aave", "Dexes", "bsc", "UNI", "swap"]))
LEAF = st.fixed_dictionaries({"field": FIELDS, "op": OPS,
                              "value": st.one_of(VALUE, st.lists(VALUE, min_size=1, max_size=3))})
TREE = st.recursive(LEAF, lambda inner: st.one_of(
    st.fixed_dictionaries({"or": st.lists(inner, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"not": inner})), max_leaves=4)
BODY = st.fixed_dictionaries({"where": TREE}, optional={
    "select": st.lists(st.one_of(st.sampled_from(["slug", "name", "tvl"]), HOSTILE), min_size=1,
                       max_size=2, unique=True),
    "sort": st.lists(st.one_of(st.sampled_from(["slug", "-tvl", "name"]), HOSTILE), max_size=1),
    "cursor": HOSTILE,
})


def hostile_bodies(count: int) -> list[dict[str, Any]]:
    """`count` hypothesis-generated bodies (derandomised: the same on every run)."""
    found: list[dict[str, Any]] = []

    @settings(max_examples=count, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(BODY)
    def collect(body: dict[str, Any]) -> None:
        found.append(body)

    collect()
    return found


async def both(pair: tuple[Served, Served], body: Any) -> tuple[Any, Any]:
    lite, pg = pair
    a, b = await lite.query(body), await pg.query(body)
    assert a.status_code == b.status_code, (body, a.text, b.text)
    return a, b


@pytest.mark.parametrize(("name", "body"), [(c[0], c[1]) for c in SNAPSHOT_CASES] + [
    ("history buckets", {"dataset": "tvl", "group_by": ["metric", "subject", {"bucket": "1w"}],
                         "aggregations": [{"op": "percentile", "field": "value", "p": 0.37},
                                          {"op": "avg", "field": "value"}],
                         "time": {"from": T0 - 20 * 86_400, "to": NOW_TS}, "limit": 500}),
    ("monthly prices", {"dataset": "prices", "group_by": ["metric", "coin", {"bucket": "1mo"}],
                        "aggregations": [{"op": "percentile", "field": "value", "p": 0.5}]}),
])
async def test_the_same_answers_on_both_databases(pair: tuple[Served, Served], name: str,
                                                  body: dict[str, Any]) -> None:
    a, b = await both(pair, body)
    assert a.status_code == 200
    assert close(a.json()["data"], b.json()["data"])
    assert a.json()["meta"]["as_of"] == b.json()["meta"]["as_of"]


async def test_hostile_queries_are_refused_or_answered_identically(
    pair: tuple[Served, Served]
) -> None:
    before = [await _counts(s) for s in pair]
    outcomes = {200: 0, 400: 0}
    for body in hostile_bodies(150):
        a, b = await both(pair, body)
        assert a.status_code in (200, 400), (body, a.text)
        outcomes[a.status_code] += 1
        if a.status_code == 400:
            error = a.json()["error"]
            assert error == b.json()["error"]
            assert error["field"] and error["field"].split(".")[0].split("[")[0] in body
        else:
            assert close(a.json()["data"], b.json()["data"]), body
    assert outcomes[200] > 10 and outcomes[400] > 10  # both paths were exercised
    assert [await _counts(s) for s in pair] == before  # nothing was written or dropped


async def _counts(served: Served) -> tuple[int, ...]:
    async with served.platform.engine.connect() as conn:
        return tuple([(await conn.execute(select(func.count()).select_from(t))).scalar_one()
                      for t in (points, protocols, api_keys, change_log)])


@pytest.mark.parametrize("body", [
    {"dataset": "protocols", "group_by": ["category"],
     "aggregations": [{"op": "count"}, {"op": "percentile", "field": "tvl", "p": 0.9},
                      {"op": "percentile", "field": "tvl", "p": 0.5},
                      {"op": "percentile", "field": "tvl", "p": 0.5, "as": "p50_again"},
                      {"op": "percentile", "field": "change_24h", "p": 0.25}],
     "sort": ["-p90_tvl"]},
    {"dataset": "tvl", "group_by": ["metric", "subject", {"bucket": "1w"}],
     "aggregations": [{"op": "percentile", "field": "value", "p": 0.37},
                      {"op": "percentile", "field": "value", "p": 0.0},
                      {"op": "percentile", "field": "value", "p": 1.0},
                      {"op": "percentile", "field": "value", "p": 0.999}],
     "having": {"field": "p37_value", "op": "gt", "value": 0},
     "time": {"from": T0 - 20 * 86_400, "to": NOW_TS}, "limit": 500},
])
async def test_several_percentiles_of_one_field_are_bit_identical(
    pair: tuple[Served, Served], body: dict[str, Any]
) -> None:
    # PostgreSQL computes them in one ordered-set aggregate over an array of fractions.
    a, b = await both(pair, body)
    assert a.status_code == 200, a.text
    assert a.json()["data"], body
    names = [k for k in a.json()["data"][0] if k.startswith("p")]
    assert len(names) >= 3
    assert [[r[k] for k in names] for r in a.json()["data"]] == \
        [[r[k] for k in names] for r in b.json()["data"]]
    assert close(a.json()["data"], b.json()["data"])
