"""Compiling a `Query` to SQL, pure: what each construct becomes on each database, and that no
client string ever becomes SQL text (hypothesis throws hostile names and values at it)."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite

from defiwatch.errors import ValidationError
from defiwatch.query.compile import compile_query, sort_columns
from defiwatch.query.cursor import Cursor, SnapshotRef, decode_cursor, encode_cursor
from defiwatch.query.dsl import Limits, Query, parse_query
from defiwatch.query.fields import DATASETS

DIALECTS = {"postgresql": postgresql.dialect(), "sqlite": sqlite.dialect()}


def sql(body: dict[str, Any], dialect: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    compiled = compile_query(parse_query(body), dialect, **kwargs).statement.compile(
        dialect=DIALECTS[dialect])
    return str(compiled), dict(compiled.params)


W = {"field": "name", "op": "contains", "value": "Swap"}


@pytest.mark.parametrize(("body", "postgres", "sqlite_"), [
    ({"where": W}, ["strpos(translate(coalesce(protocols.name, query_snapshot.slug)"],
     ["instr(lower(coalesce(protocols.name, query_snapshot.slug))"]),
    ({"where": {"field": "chains", "op": "contains", "value": "bsc"}},
     ["strpos(CAST(protocols.chains AS TEXT)"], ["instr(CAST(protocols.chains AS TEXT)"]),
    ({"where": {"field": "chains", "op": "nin", "value": ["bsc", "ethereum"]}},
     ["NOT (strpos(", " OR strpos("], ["NOT (instr(", " OR instr("]),
    ({"where": {"field": "category", "op": "eq", "value": None}},
     ["protocols.category IS NULL"], ["protocols.category IS NULL"]),
    ({"where": {"field": "category", "op": "ne", "value": None}},
     ["protocols.category IS NOT NULL"], ["protocols.category IS NOT NULL"]),
    ({"where": {"field": "tvl", "op": "between", "value": [1, 2]}},
     ["query_snapshot.tvl BETWEEN"], ["query_snapshot.tvl BETWEEN"]),
    ({"where": {"not": {"field": "slug", "op": "in", "value": ["a", "b"]}}},
     ["(query_snapshot.slug NOT IN"], ["(query_snapshot.slug NOT IN"]),
    ({"sort": ["name", "-tvl"]},
     ['COLLATE "C" ASC', "query_snapshot.tvl DESC NULLS LAST", "query_snapshot.slug COLLATE"],
     ["ASC", "query_snapshot.tvl DESC NULLS LAST"]),
    ({"group_by": ["category"], "aggregations": [{"op": "percentile", "field": "tvl", "p": 0.9}]},
     ["percentile_cont(", "WITHIN GROUP (ORDER BY CAST(r.x_tvl AS DOUBLE PRECISION))"],
     ["row_number() OVER (PARTITION BY protocols.category ORDER BY CASE WHEN",
      "count(query_snapshot.tvl) OVER (PARTITION BY protocols.category)"]),
    ({"group_by": ["category"], "aggregations": [{"op": "count_distinct", "field": "symbol"}]},
     ["count(DISTINCT r.x_symbol)"], ["count(DISTINCT r.x_symbol)"]),
    ({"dataset": "tvl", "group_by": [{"bucket": "1mo"}], "aggregations": [{"op": "count"}]},
     ["date_trunc(", "timezone(", "to_timestamp(points.ts)"],
     ["strftime(", "points.ts"]),
    ({"dataset": "tvl", "group_by": [{"bucket": "1w"}], "aggregations": [{"op": "count"}]},
     ["points.ts - (points.ts - %(ts_1)s) %% %(param_1)s"], ["points.ts - (points.ts - ?) % ?"]),
    ({"dataset": "tvl", "where": {"field": "category", "op": "eq", "value": "Dexes"}},
     ["LEFT OUTER JOIN protocols ON protocols.slug = points.subject"],
     ["LEFT OUTER JOIN protocols ON protocols.slug = points.subject"]),
    ({"dataset": "tvl"}, ["(SELECT max(points.id)", "points.metric IN"], ["(SELECT max(points.id)"]),
])
def test_constructs_per_dialect(body: dict[str, Any], postgres: list[str],
                                sqlite_: list[str]) -> None:
    for dialect, fragments in (("postgresql", postgres), ("sqlite", sqlite_)):
        text, _ = sql(body, dialect)
        for fragment in fragments:
            assert fragment in text, f"{dialect}: {fragment!r} not in\n{text}"
    assert "COLLATE" not in sql(body, "sqlite")[0]
    if "join" not in str(body) and "category" not in str(body) and body.get("dataset") == "tvl":
        assert "JOIN" not in sql(body, "postgresql")[0]


def test_a_plain_tvl_query_needs_no_join() -> None:
    assert "JOIN" not in sql({"dataset": "tvl", "select": ["subject", "value"]}, "sqlite")[0]


def test_pagination_is_keyset_with_a_unique_tiebreaker_and_a_pin() -> None:
    q = parse_query({"dataset": "prices", "sort": ["-value"], "limit": 5})
    cols = sort_columns(q)
    assert [(c.name, c.desc) for c in cols] == [("value", True), ("id", True)]
    text, params = sql({"dataset": "prices", "sort": ["-value"], "limit": 5}, "postgresql",
                       after=[10.5, 77], pin=1_000)
    assert "points.id <= %(id_1)s" in text and params["id_1"] == 1_000
    assert "points.value <= %(value_1)s" in text  # the range bound that lets an index help
    assert "(SELECT max(points.id)" not in text  # a pinned page does not re-pin
    assert params["param_1"] == 6  # limit + 1: is there a next page?


def test_nullable_keys_page_with_nulls_last() -> None:
    q = parse_query({"sort": ["change_7d"]})
    text, _ = sql({"sort": ["change_7d"]}, "sqlite", after=[None, "aave"])
    # After a NULL nothing sorts later within the key: only equal NULLs with a larger slug.
    assert "query_snapshot.change_7d IS NULL AND query_snapshot.slug > ?" in text
    assert [c.nullable for c in sort_columns(q)] == [True, False]


def test_cursors_round_trip_and_refuse_tampering() -> None:
    q = parse_query({"dataset": "tvl", "sort": ["-value"]})
    cols = sort_columns(q)
    digest = "ab" * 32
    token = encode_cursor(digest, 42, [1.5, 7])
    assert decode_cursor(token, digest, cols) == Cursor([1.5, 7], 42)
    at = SnapshotRef("s" * 16, 20)
    snap = encode_cursor(digest, None, [], at)
    assert decode_cursor(snap, digest, cols) == Cursor(snapshot=at)
    # Version 1 tokens (keyset only), handed out before snapshots, are still read.
    v1 = base64.urlsafe_b64encode(msgspec.msgpack.encode(
        [1, digest[:16], 42, [1.5, 7]])).rstrip(b"=").decode()
    assert decode_cursor(v1, digest, cols) == Cursor([1.5, 7], 42)
    for bad_token, why in [(token, "different query"), ("!!!", "malformed"),
                           (snap, "different query"),
                           (encode_cursor(digest, 42, [1.5]), "sort keys"),
                           (encode_cursor(digest, 42, ["x", 7]), "invalid value"),
                           (encode_cursor(digest, -1, [1.5, 7]), "pin"),
                           (encode_cursor(digest, None, [], SnapshotRef("../x", 1)), "snapshot"),
                           (encode_cursor(digest, None, [], SnapshotRef("s" * 16, -1)),
                            "snapshot"),
                           (encode_cursor(digest, 42, [], at), "snapshot"),
                           (encode_cursor(digest, None, [1.5, 7], at), "snapshot")]:
        with pytest.raises(ValidationError) as info:
            decode_cursor(bad_token, digest if why != "different query" else "cd" * 32, cols)
        assert info.value.field == "cursor" and why in info.value.message


# ------------------------------------------------------------------------------------------
# Hostile input: every client string is either rejected with a JSON path or bound as a value
# ------------------------------------------------------------------------------------------

HOSTILE = st.sampled_from([
    "'; DROP TABLE points; --", '" OR 1=1 --', "tvl) UNION SELECT * FROM api_keys --",
    "name\x00", "\ud83d", "%_\\", "1; SELECT pg_sleep(10)", "COLLATE \"C\"", "chains::text",
    "$1", "?", ":param", "points.id", "*/ /*", "é", "x" * 300,
])
NAMES = st.one_of(HOSTILE, st.sampled_from(
    ["tvl", "slug", "name", "chains", "category", "ts", "value", "metric", "subject", "coin",
     "count", "sum_tvl", "bucket"]), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), HOSTILE, st.text(max_size=20))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4))
OPS = st.one_of(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "between",
                                 "contains"]), HOSTILE)
LEAF = st.fixed_dictionaries({"field": NAMES, "op": OPS, "value": VALUES})
TREE = st.recursive(LEAF, lambda inner: st.one_of(
    st.fixed_dictionaries({"and": st.lists(inner, max_size=3)}),
    st.fixed_dictionaries({"or": st.lists(inner, max_size=3)}),
    st.fixed_dictionaries({"not": inner})), max_leaves=6)
AGG = st.fixed_dictionaries({"op": st.one_of(st.sampled_from(
    ["sum", "avg", "min", "max", "count", "count_distinct", "percentile"]), HOSTILE)},
    optional={"field": NAMES, "as": NAMES, "p": st.one_of(st.floats(0, 1), SCALARS)})
BODIES = st.fixed_dictionaries({}, optional={
    "dataset": st.one_of(st.sampled_from(list(DATASETS)), HOSTILE),
    "where": TREE,
    "select": st.lists(NAMES, max_size=3),
    "group_by": st.lists(st.one_of(NAMES, st.fixed_dictionaries(
        {"field": NAMES}, optional={"bucket": st.one_of(st.sampled_from(["1h", "1d", "1w", "1mo"]),
                                                        HOSTILE), "as": NAMES})), max_size=2),
    "aggregations": st.lists(AGG, max_size=3),
    "having": TREE,
    "sort": st.lists(st.one_of(NAMES, st.builds(lambda n: "-" + n, NAMES)), max_size=2),
    "limit": st.one_of(st.integers(-5, 20_000), SCALARS),
    "time": st.fixed_dictionaries({}, optional={"from": SCALARS, "to": SCALARS}),
})
TOP_KEYS = ("dataset", "where", "select", "group_by", "aggregations", "having", "sort", "limit",
            "time", "cursor", "filters")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (_strings(k) + _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _check(body: dict[str, Any]) -> Query | None:
    try:
        query = parse_query(body, Limits())
    except ValidationError as exc:
        assert exc.field is not None and exc.field.startswith(TOP_KEYS), exc.field
        assert exc.http_status == 400
        return None
    for dialect, d in DIALECTS.items():
        compiled = compile_query(query, dialect).statement.compile(dialect=d)
        text = str(compiled)
        for s in _strings(body):
            if any(c in s for c in "'\";$?:*\\") and len(s) > 2:
                assert s not in text, f"{s!r} reached the SQL text on {dialect}"
    return query


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES)
def test_hostile_queries_are_rejected_with_a_path_or_fully_parameterised(body: dict[str, Any]
                                                                         ) -> None:
    _check(body)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"filters": st.dictionaries(
    st.one_of(st.sampled_from(["protocols", "chains", "categories", "tvl_range", "change_24h"]),
              HOSTILE),
    st.one_of(VALUES, st.fixed_dictionaries({}, optional={"min": SCALARS, "max": SCALARS})),
    max_size=3)}, optional={"aggregations": st.lists(st.fixed_dictionaries(
        {"operation": st.one_of(st.sampled_from(["sum", "avg"]), HOSTILE)},
        optional={"field": NAMES, "group_by": NAMES}), max_size=2)}))
def test_hostile_original_shape_queries(body: dict[str, Any]) -> None:
    _check(body)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=60).map(
    lambda b: __import__("base64").urlsafe_b64encode(b).decode())))
def test_hostile_cursors_are_400s_on_the_cursor(token: str) -> None:
    q = parse_query({"dataset": "tvl"})
    with pytest.raises(ValidationError) as info:
        decode_cursor(token, "ab" * 32, sort_columns(q))
    assert info.value.field == "cursor"
