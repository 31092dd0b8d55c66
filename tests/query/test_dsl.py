"""The query language, pure: values in, `Query` or a located rejection out. No database."""

from __future__ import annotations

from typing import Any

import pytest

from defiwatch.errors import ValidationError
from defiwatch.query.dsl import (
    AggOp,
    Aggregation,
    BoolOp,
    Bucket,
    Condition,
    GroupKey,
    Limits,
    Not,
    Op,
    SortKey,
    parse_query,
)

ORIGINAL = {
    "filters": {"protocols": ["Aave", "uniswap"], "chains": ["Ethereum", "Binance"],
                "tvl_range": {"min": 1e6, "max": 1e10}, "change_24h": {"min": -5}},
    "aggregations": [{"field": "tvl", "operation": "sum", "group_by": "category"}],
    "sort": {"field": "tvl", "order": "desc"},
    "limit": 10,
}
# The same question in the general grammar, written differently on purpose.
GENERAL = {
    "dataset": "protocols",
    "where": {"and": [
        {"field": "change_24h", "op": "gte", "value": -5},
        {"and": [{"field": "tvl", "op": "lte", "value": 10_000_000_000},
                 {"field": "slug", "op": "in", "value": ["UNISWAP", "aave", "aave"]}]},
        {"field": "chains", "op": "in", "value": ["bsc", "ethereum"]},
        {"field": "tvl", "op": "gte", "value": 1_000_000},
    ]},
    "group_by": ["category"],
    "aggregations": [{"op": "sum", "field": "tvl"}],
    "sort": ["-sum_tvl"],
    "limit": 10,
}


def test_both_shapes_normalise_to_one_query() -> None:
    original, general = parse_query(ORIGINAL), parse_query(GENERAL)
    assert original == general
    assert original.canonical() == general.canonical()
    assert original.aggregations == (Aggregation(AggOp.SUM, "tvl", "sum_tvl"),)
    assert original.group_by == (GroupKey("category", "category"),)
    assert original.sort == (SortKey("sum_tvl", desc=True),)
    where = original.where
    assert isinstance(where, BoolOp) and where.kind == "and"
    assert Condition("slug", Op.IN, ("aave", "uniswap")) in where.items
    assert Condition("chains", Op.IN, ("bsc", "ethereum")) in where.items  # Binance -> bsc


@pytest.mark.parametrize(("body", "check"), [
    ({}, lambda q: q.dataset == "protocols" and q.limit == 100 and "tvl" in q.select),
    ({"dataset": "tvl"}, lambda q: q.select == ("metric", "subject", "chain", "ts", "value")),
    ({"dataset": "prices", "where": {"field": "coin", "op": "eq", "value": "Ethereum"}},
     lambda q: q.where == Condition("coin", Op.EQ, "coingecko:ethereum")),
    ({"dataset": "tvl", "where": {"field": "chain", "op": "eq", "value": "OP Mainnet"}},
     lambda q: q.where == Condition("chain", Op.EQ, "optimism")),
    ({"where": {"field": "category", "op": "eq", "value": None}},
     lambda q: q.where == Condition("category", Op.EQ, None)),
    ({"where": {"field": "name", "op": "contains", "value": "SwAp"}},  # contains: never normalised
     lambda q: q.where == Condition("name", Op.CONTAINS, "SwAp")),
    ({"where": [{"field": "tvl", "op": "gt", "value": 1}]},  # a bare list is an "and"
     lambda q: q.where == Condition("tvl", Op.GT, 1.0)),
    ({"where": {"not": {"or": [{"field": "tvl", "op": "between", "value": [1, 2]}]}}},
     lambda q: q.where == Not(Condition("tvl", Op.BETWEEN, (1, 2)))),
    ({"dataset": "tvl", "group_by": [{"bucket": "1mo"}, "subject", "metric"],
      "aggregations": [{"op": "percentile", "field": "value", "p": 0.95},
                       {"op": "count"}, {"op": "count_distinct", "field": "chain"}]},
     lambda q: q.group_by == (GroupKey("ts", "bucket", Bucket.MONTH), GroupKey("subject", "subject"),
                              GroupKey("metric", "metric"))
     and [a.alias for a in q.aggregations] == ["p95_value", "count", "count_distinct_chain"]),
    ({"dataset": "tvl", "where": {"field": "metric", "op": "in", "value": ["tvl"]},
      "aggregations": [{"op": "percentile", "field": "value", "p": 0.999}]},
     lambda q: q.aggregations[0].alias == "p99_9_value"),
    ({"dataset": "tvl", "time": {"from": 1, "to": 5}}, lambda q: (q.time_from, q.time_to) == (1, 5)),
    ({"sort": [{"field": "tvl", "order": "desc"}, "slug"]},
     lambda q: q.sort == (SortKey("tvl", True), SortKey("slug"))),
    ({"where": {"field": "listed_at", "op": "gte", "value": 1.6e9}},  # whole floats are ints
     lambda q: q.where == Condition("listed_at", Op.GTE, 1_600_000_000)),
    ({"filters": {"categories": "Dexes", "mcap_range": {"max": 5}}},
     lambda q: q.where == BoolOp("and", (Condition("category", Op.IN, ("Dexes",)),
                                         Condition("mcap", Op.LTE, 5.0)))),
    ({"aggregations": [{"field": "tvl", "operation": "avg", "group_by": ["category"]},
                       {"field": "tvl", "operation": "max", "group_by": ["category"]}],
      "sort": {"field": "avg_tvl"}},
     lambda q: [a.alias for a in q.aggregations] == ["avg_tvl", "max_tvl"]),
])
def test_valid_queries(body: dict[str, Any], check: Any) -> None:
    assert check(parse_query(body))


LIMITS = Limits(max_depth=3, max_conditions=4, max_in_values=3, max_aggregations=2,
                max_group_by=2, max_sort=2, max_rows=50)


@pytest.mark.parametrize(("body", "field", "words"), [
    ([], None, "JSON object"),
    ({"dataset": "volumes"}, "dataset", "unknown dataset"),
    ({"nope": 1}, "nope", "unknown key"),
    ({"dataset": "tvl", "filters": {}}, "filters", "unknown key"),  # shapes do not mix
    ({"where": {"field": "tvl; DROP TABLE points", "op": "eq", "value": 1}}, "where.field",
     "unknown field"),
    ({"where": {"field": "tvl", "op": "like", "value": 1}}, "where.op", "unknown operator"),
    ({"where": {"field": "tvl", "op": "contains", "value": "1"}}, "where.op", "does not apply"),
    ({"where": {"field": "name", "op": "gt", "value": "a"}}, "where.op", "does not apply"),
    ({"where": {"field": "chains", "op": "eq", "value": "x"}}, "where.op", "does not apply"),
    ({"where": {"field": "tvl", "op": "eq"}}, "where.value", "required"),
    ({"where": {"field": "tvl", "op": "eq", "value": "1e9"}}, "where.value", "number"),
    ({"where": {"field": "tvl", "op": "eq", "value": True}}, "where.value", "number"),
    ({"where": {"field": "ts", "op": "eq", "value": 1.5}}, "where.value", "whole"),
    ({"where": {"field": "ts", "op": "eq", "value": 2**70}}, "where.value", "out of range"),
    ({"where": {"field": "tvl", "op": "gt", "value": None}}, "where.value", "not null"),
    ({"where": {"field": "name", "op": "eq", "value": "a\x00b"}}, "where.value", "NUL"),
    ({"where": {"field": "name", "op": "eq", "value": "\ud800"}}, "where.value", "Unicode"),
    ({"where": {"field": "name", "op": "eq", "value": "x" * 300}}, "where.value", "characters"),
    ({"where": {"field": "tvl", "op": "in", "value": []}}, "where.value", "empty"),
    ({"where": {"field": "tvl", "op": "in", "value": [1, 2, 3, 4]}}, "where.value", "at most 3"),
    ({"where": {"field": "tvl", "op": "in", "value": [1, "2"]}}, "where.value[1]", "number"),
    ({"where": {"field": "tvl", "op": "between", "value": [2, 1]}}, "where.value", "above"),
    ({"where": {"field": "tvl", "op": "between", "value": [1]}}, "where.value", "[low, high]"),
    ({"where": {"and": [{"or": [{"not": {"field": "tvl", "op": "gt", "value": 1}}]}]}},
     "where.and[0].or[0].not", "deeper than 3"),
    ({"where": {"and": [{"field": "tvl", "op": "gt", "value": i} for i in range(5)]}},
     "where.and", "at most 4"),
    ({"where": {"and": [{"field": "tvl", "op": "gt", "value": 1}], "or": []}}, "where",
     "exactly one key"),
    ({"where": {"and": [{"field": "tvl", "op": "gt", "value": 1}, 7]}}, "where.and[1]",
     "condition object"),
    ({"where": {"field": "tvl", "op": "gt", "value": 1, "extra": 1}}, "where.extra",
     "unknown key"),
    ({"group_by": ["chains"]}, "group_by[0].field", "list field"),
    ({"group_by": [{"bucket": "1d"}]}, "group_by[0].bucket", "snapshot"),
    ({"dataset": "tvl", "group_by": [{"bucket": "5m"}]}, "group_by[0].bucket", "unknown bucket"),
    ({"dataset": "tvl", "group_by": [{"field": "value", "bucket": "1d"}]}, "group_by[0].field",
     "ts field only"),
    ({"dataset": "tvl", "group_by": ["a", "b", "c"]}, "group_by", "at most 2"),
    ({"group_by": [{"field": "slug", "as": "1bad"}]}, "group_by[0].as", "must match"),
    ({"aggregations": [{"op": "median", "field": "tvl"}]}, "aggregations[0].op",
     "unknown aggregation"),
    ({"aggregations": [{"op": "sum", "field": "name"}]}, "aggregations[0].field",
     "does not apply"),
    ({"aggregations": [{"op": "sum"}]}, "aggregations[0].field", "needs a field"),
    ({"aggregations": [{"op": "percentile", "field": "tvl", "p": 1.5}]}, "aggregations[0].p",
     "between 0 and 1"),
    ({"aggregations": [{"op": "sum", "field": "tvl", "p": 0.5}]}, "aggregations[0].p",
     "only applies"),
    ({"aggregations": [{"op": "sum", "field": "tvl"}, {"op": "sum", "field": "tvl"}]},
     "aggregations[1]", "used twice"),
    ({"aggregations": [{"op": "count"}] * 3}, "aggregations", "at most 2"),
    ({"select": ["slug"], "aggregations": [{"op": "count"}]}, "select", "row queries"),
    ({"select": ["slug", "slug"]}, "select[1]", "twice"),
    ({"select": ["password"]}, "select[0]", "unknown field"),
    ({"having": {"field": "count", "op": "gt", "value": 1}}, "having", "add group_by"),
    ({"group_by": ["category"], "aggregations": [{"op": "count"}],
      "having": {"field": "tvl", "op": "gt", "value": 1}}, "having.field", "unknown output"),
    ({"group_by": ["category"], "aggregations": [{"op": "count"}],
      "having": {"field": "count", "op": "gt", "value": 1.5}}, "having.value", "whole"),
    ({"group_by": ["category"], "sort": ["tvl"]}, "sort[0]", "unknown output column"),
    ({"sort": ["chains"]}, "sort[0]", "list field"),
    ({"sort": [{"field": "tvl", "order": "up"}]}, "sort[0].order", "asc"),
    ({"sort": ["tvl", "-tvl"]}, "sort", "twice"),
    ({"sort": ["tvl", "slug", "name"]}, "sort", "at most 2"),
    ({"limit": 0}, "limit", "between 1 and 50"),
    ({"limit": 51}, "limit", "between 1 and 50"),
    ({"limit": "10"}, "limit", "integer"),
    ({"time": {"from": 1}}, "time", "snapshot"),
    ({"dataset": "tvl", "time": {"from": 5, "to": 5}}, "time", "before"),
    ({"dataset": "tvl", "time": {"from": -1}}, "time.from", "between"),
    ({"cursor": 12}, "cursor", "string"),
    ({"filters": {"tvl_range": {"min": "big"}}}, "filters.tvl_range.min", "number"),
    ({"filters": {"tvl_range": {}}}, "filters.tvl_range", "min, max"),
    ({"filters": {"protocols": [1]}}, "filters.protocols[0]", "string"),
    ({"filters": {"protocols": []}}, "filters.protocols", "empty"),
    ({"filters": {"volume": 1}}, "filters.volume", "unknown key"),
    ({"aggregations": [{"field": "tvl", "operation": "sum", "group_by": "category"},
                       {"field": "tvl", "operation": "avg", "group_by": "slug"}]},
     "aggregations[1].group_by", "share one group_by"),
    ({"aggregations": [{"field": "tvl", "operation": "sum"}, {"field": "tvl",
                                                              "operation": "avg"}],
      "sort": {"field": "tvl"}}, "sort.field", "unknown output column"),  # ambiguous
    # A median over price and mcap rows is neither: aggregates of value need one metric.
    ({"dataset": "prices", "aggregations": [{"op": "percentile", "field": "value", "p": 0.5}]},
     "aggregations[0].field", "mix the metrics"),
    ({"dataset": "prices", "where": {"field": "metric", "op": "in", "value": ["mcap", "price"]},
      "aggregations": [{"op": "count"}, {"op": "max", "field": "value"}]},
     "aggregations[1].field", "group_by metric"),
    ({"dataset": "tvl", "where": {"or": [{"field": "metric", "op": "eq", "value": "tvl"},
                                         {"field": "subject", "op": "eq", "value": "aave"}]},
      "aggregations": [{"op": "sum", "field": "value"}]}, "aggregations[0].field", "metric"),
    # protocols.chain splits rows: row queries would list a protocol once per chain.
    ({"select": ["slug", "chain"]}, "select", "aggregated queries only"),
    ({"where": {"field": "chain", "op": "eq", "value": "ethereum"}}, "where", "aggregated"),
    ({"sort": ["chain"]}, "sort", "aggregated"),
])
def test_rejections_name_the_json_path(body: Any, field: str | None, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_query(body, LIMITS)
    assert info.value.field == field, info.value.message
    assert words in info.value.message
    assert info.value.http_status == 400


@pytest.mark.parametrize("body", [
    {"dataset": "prices", "where": {"field": "metric", "op": "eq", "value": "price"},
     "aggregations": [{"op": "avg", "field": "value"}]},
    {"dataset": "prices", "where": {"and": [{"field": "coin", "op": "eq", "value": "aave"},
                                            {"field": "metric", "op": "in", "value": ["mcap"]}]},
     "aggregations": [{"op": "percentile", "field": "value", "p": 0.5}]},
    {"dataset": "tvl", "group_by": ["metric"], "aggregations": [{"op": "sum", "field": "value"}]},
    {"dataset": "prices", "aggregations": [{"op": "count"}, {"op": "max", "field": "ts"}]},
])
def test_aggregates_of_one_metric_are_accepted(body: Any) -> None:
    assert parse_query(body, LIMITS).aggregated


@pytest.mark.parametrize("body", [
    {"aggregations": [{"field": "tvl", "operation": "sum", "group_by": "chain"}]},  # original
    {"group_by": ["chain"], "aggregations": [{"op": "sum", "field": "tvl"}]},  # general
])
def test_protocols_group_by_chain_in_both_shapes(body: Any) -> None:
    query = parse_query(body, LIMITS)
    assert query.group_by == (GroupKey("chain", "chain"),)
    assert query.aggregations == (Aggregation(AggOp.SUM, "tvl", "sum_tvl"),)
