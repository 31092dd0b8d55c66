"""Compile a validated `Query` into one parameterised SQLAlchemy Core SELECT. Pure: no I/O.

Every field name was checked against fields.py by the parser; here it only selects a column
object, and every client value becomes a bound parameter. The same query gives the same rows on
PostgreSQL and SQLite; where the two databases differ, the compiled SQL differs so the answers
do not:

- strings sort and compare byte-wise (`COLLATE "C"` on PostgreSQL, SQLite's BINARY);
- NULLs sort last in both directions (explicit `NULLS LAST`);
- `contains` is an ASCII-case-insensitive substring test (`strpos(translate(..))` on
  PostgreSQL, `instr(lower(..))` on SQLite, whose `lower` is ASCII-only);
- `percentile` is PostgreSQL's `percentile_cont` and, on SQLite, the same linear interpolation
  (`lo + (hi - lo) * frac` at position `p * (n - 1)`) over `row_number()` / `count()` windows,
  so both give bit-identical doubles;
- time buckets are integer arithmetic on epoch seconds (hour, day, Monday-aligned week) and
  the calendar month via `date_trunc` / `strftime('start of month')`, all in UTC.

Pagination is keyset: results are ordered by the requested keys plus a unique tiebreaker, and
a page starts strictly after the previous page's last key. History datasets are also pinned to
`points.id <= pin` (the largest id when the first page ran), so points inserted while a client
pages never shift or duplicate rows. The `protocols` dataset has no such pin (its rows change in
place): service.py stores the first page's whole result and serves later pages from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Double,
    FromClause,
    Integer,
    Select,
    Text,
    and_,
    case,
    cast,
    distinct,
    extract,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import array as pg_array
from sqlalchemy.sql.elements import UnaryExpression

from defiwatch.domain.series import NO_CHAIN
from defiwatch.query.dsl import (
    AggOp,
    Aggregation,
    BoolOp,
    Bucket,
    Condition,
    Node,
    Not,
    Op,
    OutputColumn,
    Query,
    Scalar,
    SortKey,
)
from defiwatch.query.fields import FieldType
from defiwatch.query.index import chain_observations
from defiwatch.store.schema import points, protocols, query_latest, query_snapshot

__all__ = ["Compiled", "SortColumn", "compile_query", "sort_columns"]

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_WEEK_OFFSET = 4 * 86_400  # 1970-01-05, the first Monday after the epoch
_BUCKET_SECONDS = {Bucket.HOUR: 3_600, Bucket.DAY: 86_400, Bucket.WEEK: 7 * 86_400}


@dataclass(frozen=True, slots=True)
class SortColumn:
    """One key of the total order a result is paged by (`label` is its hidden column)."""

    name: str
    label: str
    desc: bool
    type: FieldType
    nullable: bool


@dataclass(frozen=True, slots=True)
class Compiled:
    """The statement and how to read its rows.

    Columns: `c{i}` per output (in `outputs` order), `s{j}` per sort key, `as_of` (newest
    observation time the row used) and, for a first page of a history dataset, `pin`.
    """

    statement: Select[Any]
    outputs: list[OutputColumn]
    sort: list[SortColumn]
    pinnable: bool


def _ascii_lower(text: str) -> str:
    return text.translate(str.maketrans(_UPPER, _LOWER))


class _Source:
    """The FROM clause of one dataset and the column expression of each field."""

    def __init__(self, query: Query) -> None:
        ds = query.spec
        joined = any(ds.fields[f].join == "protocols" for f in query.fields_used())
        self.history = ds.history
        if ds.name == "protocols":
            s, p = query_snapshot, protocols
            self.from_: FromClause = s.outerjoin(p, p.c.slug == s.c.slug)
            self.exprs: dict[str, ColumnElement[Any]] = {
                "slug": s.c.slug, "name": func.coalesce(p.c.name, s.c.slug),
                "category": p.c.category, "chains": p.c.chains, "gecko_id": p.c.gecko_id,
                "symbol": p.c.symbol, "url": p.c.url, "listed_at": p.c.listed_at,
                "tvl": s.c.tvl, "ts": s.c.tvl_ts, "change_1h": s.c.change_1h,
                "change_24h": s.c.change_24h, "change_7d": s.c.change_7d, "mcap": s.c.mcap,
            }
            if "chain" in query.fields_used():
                self._split_by_chain()
            self.tiebreak_name = "slug"
            self.tiebreak_expr: ColumnElement[Any] = s.c.slug
            self.ts: ColumnElement[Any] = self.exprs["ts"]
            self.base: list[ColumnElement[bool]] = []
            return
        pt = points
        self.from_ = pt.outerjoin(protocols, protocols.c.slug == pt.c.subject) if joined else pt
        self.exprs = {"metric": pt.c.metric, "chain": pt.c.chain, "ts": pt.c.ts,
                      "value": pt.c.value}
        self.exprs["coin" if ds.name == "prices" else "subject"] = pt.c.subject
        if joined:
            self.exprs["category"] = protocols.c.category
            self.exprs["name"] = protocols.c.name
        self.tiebreak_name = "id"
        self.tiebreak_expr = pt.c.id
        self.ts = pt.c.ts
        self.base = [pt.c.metric.in_(sorted(ds.metrics))]
        if query.time_from is not None:
            self.base.append(pt.c.ts >= query.time_from)
        if query.time_to is not None:
            self.base.append(pt.c.ts < query.time_to)

    def _split_by_chain(self) -> None:
        """One row per protocol and chain of its newest per-chain observation, `tvl` and `ts`
        being that chain's; a protocol never observed per chain keeps one row, chain NULL,
        with its total (so summing `tvl` over chains loses no protocol)."""
        s = query_snapshot
        seen = chain_observations().subquery("o")
        c = query_latest.alias("c")
        self.from_ = self.from_.outerjoin(seen, seen.c.subject == s.c.slug).outerjoin(
            c, and_(c.c.metric == "tvl", c.c.subject == s.c.slug, c.c.chain != NO_CHAIN,
                    c.c.ts == seen.c.ts))
        self.exprs.update(chain=c.c.chain,
                          tvl=case((c.c.chain.is_(None), s.c.tvl), else_=c.c.value),
                          ts=func.coalesce(c.c.ts, s.c.tvl_ts))


def sort_columns(query: Query) -> list[SortColumn]:
    """The total order of the result: requested keys, then a unique tiebreaker."""
    outputs = {c.name: c for c in query.outputs()}
    ds = query.spec
    keys: list[SortKey] = list(query.sort)
    cols: list[SortColumn] = []
    if query.aggregated:
        group_names = [g.alias for g in query.group_by]
        if not group_names:
            return []  # one row: nothing to page
        keys += [SortKey(n) for n in group_names if n not in {k.name for k in keys}]
        group_fields = {g.alias: g for g in query.group_by}
        for j, k in enumerate(keys):
            g = group_fields.get(k.name)
            nullable = g is None or (g.bucket is None and ds.fields[g.field].nullable)
            cols.append(SortColumn(k.name, f"s{j}", k.desc, outputs[k.name].type, nullable))
        return cols
    if not keys:
        keys = [SortKey("ts")] if ds.history else [SortKey("slug")]
    for j, k in enumerate(keys):
        spec = ds.fields[k.name]
        cols.append(SortColumn(k.name, f"s{j}", k.desc, spec.type, spec.nullable))
    tiebreak = "id" if ds.history else "slug"
    if tiebreak not in {c.name for c in cols}:
        tb_type = FieldType.INTEGER if ds.history else FieldType.STRING
        # Same direction as the last key, so "ts DESC, id DESC" can walk one index backwards.
        cols.append(SortColumn(tiebreak, f"s{len(cols)}", cols[-1].desc, tb_type, False))
    return cols


def compile_query(
    query: Query,
    dialect: str,
    *,
    after: Sequence[Scalar] | None = None,
    pin: int | None = None,
) -> Compiled:
    """Build the SELECT for one page of `query` on `dialect` ("postgresql" or "sqlite").

    Args:
        after: the sort-key values of the previous page's last row (from the cursor).
        pin: largest points.id the pages of a history dataset may see; None on a first page,
            where the statement returns the current largest id as column `pin` instead.

    Returns:
        The statement (fetching `limit + 1` rows, so a caller can tell if there is a next page).
    """
    pg = dialect == "postgresql"
    src = _Source(query)
    sort = sort_columns(query)
    if after is not None and len(after) != len(sort):
        raise ValueError("cursor values do not match the sort keys")
    pinnable = src.history
    conds: list[ColumnElement[bool]] = list(src.base)
    if query.where is not None:
        conds.append(_node(query.where, src.exprs, pg))
    if pin is not None and pinnable:
        conds.append(points.c.id <= pin)
    extra: list[ColumnElement[Any]] = []
    if pinnable and pin is None:
        extra.append(select(func.max(points.c.id)).scalar_subquery().label("pin"))
    if query.aggregated:
        stmt = _aggregated(query, src, conds, sort, after, pg, extra)
    else:
        stmt = _rows(query, src, conds, sort, after, pg, extra)
    return Compiled(stmt.limit(query.limit + 1), query.outputs(), sort, pinnable)


def _rows(
    query: Query, src: _Source, conds: list[ColumnElement[bool]], sort: list[SortColumn],
    after: Sequence[Scalar] | None, pg: bool, extra: list[ColumnElement[Any]],
) -> Select[Any]:
    exprs = dict(src.exprs)
    exprs[src.tiebreak_name] = src.tiebreak_expr
    cols: list[ColumnElement[Any]] = [
        exprs[name].label(f"c{i}") for i, name in enumerate(query.select)]
    cols += [exprs[s.name].label(s.label) for s in sort]
    cols.append(src.ts.label("as_of"))
    cols += extra
    if after is not None:
        conds.append(_keyset([(exprs[s.name], s) for s in sort], after, pg))
    stmt = select(*cols).select_from(src.from_)
    if conds:
        stmt = stmt.where(and_(*conds))
    return stmt.order_by(*[_order(exprs[s.name], s, pg) for s in sort])


def _aggregated(
    query: Query, src: _Source, conds: list[ColumnElement[bool]], sort: list[SortColumn],
    after: Sequence[Scalar] | None, pg: bool, extra: list[ColumnElement[Any]],
) -> Select[Any]:
    # Layer 1: one row per matching input row with its group keys and aggregation inputs (and,
    # on SQLite, the window columns the percentile needs). Layer 2 groups it. Layer 3 applies
    # having, the keyset and the order to the groups.
    group_exprs = [_bucket(src.exprs[g.field], g.bucket, pg) if g.bucket else src.exprs[g.field]
                   for g in query.group_by]
    inputs = sorted({a.field for a in query.aggregations if a.field})
    layer1: list[ColumnElement[Any]] = [e.label(f"g{i}") for i, e in enumerate(group_exprs)]
    layer1 += [src.exprs[f].label(f"x_{f}") for f in inputs]
    layer1.append(src.ts.label("t"))
    windowed = sorted({a.field for a in query.aggregations
                       if a.op is AggOp.PERCENTILE and a.field and not pg})
    for f in windowed:
        e = src.exprs[f]
        layer1.append(func.row_number().over(
            partition_by=group_exprs or None,
            order_by=[case((e.is_(None), 1), else_=0), e]).label(f"rn_{f}"))
        layer1.append(func.count(e).over(partition_by=group_exprs or None).label(f"n_{f}"))
    rows = select(*layer1).select_from(src.from_)
    if conds:
        rows = rows.where(and_(*conds))
    r = rows.subquery("r")
    keys = [r.c[f"g{i}"] for i in range(len(group_exprs))]
    layer2: list[ColumnElement[Any]] = [k.label(f"g{i}") for i, k in enumerate(keys)]
    # On PostgreSQL, several percentiles of one field are one ordered-set aggregate over an
    # array of fractions (the group is sorted once, not once per percentile); layer 3 picks
    # the elements. percentile_cont's array form interpolates exactly as the scalar form.
    shared = _shared_percentiles(query.aggregations) if pg else {}
    for f, ps in shared.items():
        layer2.append(_percentiles(ps, r.c[f"x_{f}"]).label(f"pcts_{f}"))
    layer2 += [_aggregate(a, r.c, pg).label(f"a{i}") for i, a in enumerate(query.aggregations)
               if not (a.op is AggOp.PERCENTILE and a.field in shared)]
    layer2.append(func.max(r.c.t).label("as_of"))
    grouped = select(*layer2)
    if keys:
        grouped = grouped.group_by(*keys)
    g = grouped.subquery("g")
    by_name: dict[str, ColumnElement[Any]] = {}
    for i, gk in enumerate(query.group_by):
        by_name[gk.alias] = g.c[f"g{i}"]
    for i, a in enumerate(query.aggregations):
        if a.op is AggOp.PERCENTILE and a.field in shared:
            assert a.p is not None
            by_name[a.alias] = g.c[f"pcts_{a.field}"][shared[a.field].index(a.p) + 1]
        else:
            by_name[a.alias] = g.c[f"a{i}"]
    cols: list[ColumnElement[Any]] = [by_name[c.name].label(f"c{i}")
                                         for i, c in enumerate(query.outputs())]
    cols += [by_name[s.name].label(s.label) for s in sort]
    cols.append(g.c.as_of)
    cols += extra
    outer: list[ColumnElement[bool]] = []
    if query.having is not None:
        outer.append(_node(query.having, by_name, pg))
    if after is not None and sort:
        outer.append(_keyset([(by_name[s.name], s) for s in sort], after, pg))
    stmt = select(*cols).select_from(g)
    if outer:
        stmt = stmt.where(and_(*outer))
    return stmt.order_by(*[_order(by_name[s.name], s, pg) for s in sort])


def _shared_percentiles(aggs: Sequence[Aggregation]) -> dict[str, list[float]]:
    """Field -> its distinct percentile fractions, for fields with more than one percentile."""
    by_field: dict[str, list[float]] = {}
    for a in aggs:
        if a.op is AggOp.PERCENTILE and a.field and a.p is not None:
            ps = by_field.setdefault(a.field, [])
            if a.p not in ps:
                ps.append(a.p)
    return {f: ps for f, ps in by_field.items() if len(ps) > 1}


def _percentiles(ps: Sequence[float], x: ColumnElement[Any]) -> ColumnElement[Any]:
    """PostgreSQL: `percentile_cont(ARRAY[p, ...]) WITHIN GROUP (ORDER BY x)` (1-based)."""
    fractions = cast(pg_array([literal(p, Double) for p in ps]), ARRAY(Double))
    agg = func.percentile_cont(fractions).within_group(cast(x, Double))
    return type_coerce(agg, ARRAY(Double))


def _aggregate(a: Aggregation, c: Any, pg: bool
               ) -> ColumnElement[Any]:
    if a.field is None:
        return func.count()
    x = c[f"x_{a.field}"]
    if a.op is AggOp.COUNT:
        return func.count(x)
    if a.op is AggOp.COUNT_DISTINCT:
        return func.count(distinct(x))
    if a.op is AggOp.MIN:
        return func.min(x)
    if a.op is AggOp.MAX:
        return func.max(x)
    xf = cast(x, Double)
    if a.op is AggOp.SUM:
        return func.sum(xf)
    if a.op is AggOp.AVG:
        return func.avg(xf)
    assert a.op is AggOp.PERCENTILE and a.p is not None
    p = literal(a.p, Double)
    if pg:
        return func.percentile_cont(p).within_group(xf)
    rn, n = c[f"rn_{a.field}"], c[f"n_{a.field}"]
    k_row = cast(p * (n - 1), Integer)  # floor: the position is never negative
    lo = func.max(case((rn == k_row + 1, xf)))
    hi = func.max(case((rn == k_row + 2, xf)))
    pos = p * (func.max(n) - 1)
    frac = pos - cast(pos, Integer)
    # PostgreSQL's float8_lerp is lo + pct * (hi - lo): the same operations in the same order.
    return lo + frac * (func.coalesce(hi, lo) - lo)


def _bucket(ts: ColumnElement[Any], bucket: Bucket, pg: bool) -> ColumnElement[Any]:
    t = ts
    if bucket is Bucket.MONTH:
        if pg:
            month = func.date_trunc("month", func.timezone("UTC", func.to_timestamp(t)))
            return cast(extract("epoch", month), BigInteger)
        return cast(func.strftime("%s", t, "unixepoch", "start of month"), Integer)
    seconds = _BUCKET_SECONDS[bucket]
    if bucket is Bucket.WEEK:
        return t - (t - _WEEK_OFFSET) % seconds
    return t - t % seconds


def _sortable(e: ColumnElement[Any], s: SortColumn, pg: bool) -> ColumnElement[Any]:
    return e.collate("C") if pg and s.type == FieldType.STRING else e


def _order(e: ColumnElement[Any], s: SortColumn, pg: bool) -> UnaryExpression[Any]:
    e = _sortable(e, s, pg)
    ordered = e.desc() if s.desc else e.asc()
    # NULLS LAST only where NULLs can occur: on a NOT NULL column it would stop PostgreSQL
    # from reading a DESC order off an ascending index (whose DESC order is NULLS FIRST).
    return ordered.nulls_last() if s.nullable else ordered


def _keyset(keys: Sequence[tuple[ColumnElement[Any], SortColumn]], after: Sequence[Scalar],
            pg: bool) -> ColumnElement[bool]:
    """Rows strictly after `after` in the order of `keys` (NULLs last in both directions)."""

    def beyond(e: ColumnElement[Any], s: SortColumn, v: Scalar) -> ColumnElement[bool]:
        if v is None:
            return false()  # nothing sorts after NULL within this key
        e = _sortable(e, s, pg)
        cmp = e < v if s.desc else e > v
        return or_(cmp, e.is_(None)) if s.nullable else cmp

    def same(e: ColumnElement[Any], v: Scalar) -> ColumnElement[bool]:
        return e.is_(None) if v is None else e == v

    expr: ColumnElement[bool] | None = None
    for (e, s), v in reversed(list(zip(keys, after, strict=True))):
        expr = beyond(e, s, v) if expr is None else or_(beyond(e, s, v), and_(same(e, v), expr))
    assert expr is not None
    first_e, first_s = keys[0]
    first_v = after[0]
    if first_v is not None and not first_s.nullable:
        # A redundant bound on the leading key lets the database use a range scan (ts index).
        e = _sortable(first_e, first_s, pg)
        expr = and_(e <= first_v if first_s.desc else e >= first_v, expr)
    return expr


def _node(node: Node, exprs: Mapping[str, ColumnElement[Any]], pg: bool
          ) -> ColumnElement[bool]:
    if isinstance(node, BoolOp):
        parts = [_node(i, exprs, pg) for i in node.items]
        return and_(*parts) if node.kind == "and" else or_(*parts)
    if isinstance(node, Not):
        return not_(_node(node.item, exprs, pg))
    return _condition(node, exprs[node.field], pg)


def _list_has(e: ColumnElement[Any], value: Scalar, pg: bool) -> ColumnElement[bool]:
    # Chain slugs hold only [a-z0-9.:_-] (domain.normalize_chain), so `"slug"` occurs in the
    # JSON text of the list exactly when the slug is an element: no JSON functions needed.
    needle = f'"{value}"'
    text = cast(e, Text)
    return (func.strpos(text, needle) if pg else func.instr(text, needle)) > 0


def _condition(c: Condition, e: ColumnElement[Any], pg: bool) -> ColumnElement[bool]:
    v = c.value
    values: tuple[Scalar, ...] = v if isinstance(v, tuple) else (v,)
    is_list = c.field == "chains"
    if c.op is Op.EQ:
        return e.is_(None) if v is None else e == v
    if c.op is Op.NE:
        return e.is_not(None) if v is None else e != v
    if c.op is Op.CONTAINS:
        if is_list:
            return _list_has(e, v if not isinstance(v, tuple) else None, pg)
        needle = _ascii_lower(str(v))
        if pg:
            return func.strpos(func.translate(e, _UPPER, _LOWER), needle) > 0
        return func.instr(func.lower(e), needle) > 0
    if c.op in (Op.IN, Op.NIN):
        if is_list:
            any_of = or_(*[_list_has(e, x, pg) for x in values])
            return any_of if c.op is Op.IN else not_(any_of)
        return e.in_(values) if c.op is Op.IN else e.not_in(values)
    if c.op is Op.BETWEEN:
        return e.between(values[0], values[1])
    ops = {Op.GT: e.__gt__, Op.GTE: e.__ge__, Op.LT: e.__lt__, Op.LTE: e.__le__}
    result: ColumnElement[bool] = ops[c.op](v)
    return result
