"""The query language: JSON in, a validated and normalised `Query` out. Pure: no I/O, no clock.

Two request shapes parse into the same `Query`:

- the original product spec's shape (dataset `protocols` implied)::

    {"filters": {"protocols": [...], "chains": [...], "tvl_range": {"min": 1e6, "max": 1e9},
                 "change_24h": {"min": -5}},
     "aggregations": [{"field": "tvl", "operation": "sum", "group_by": "category"}],
     "sort": {"field": "tvl", "order": "desc"}, "limit": 10}

- the general grammar (docs/query.md)::

    {"dataset": "tvl", "time": {"from": 1704067200, "to": 1711929600},
     "where": {"and": [{"field": "metric", "op": "eq", "value": "chain_tvl"},
                       {"not": {"field": "subject", "op": "in", "value": ["terra"]}}]},
     "group_by": ["subject", {"field": "ts", "bucket": "1w"}],
     "aggregations": [{"op": "avg", "field": "value", "as": "avg_tvl"},
                      {"op": "percentile", "p": 0.9, "field": "value"}],
     "having": {"field": "avg_tvl", "op": "gt", "value": 1e9},
     "sort": [{"field": "bucket", "order": "asc"}, "-avg_tvl"], "limit": 500}

Every rejection is a `ValidationError` whose `field` is the JSON path of the bad part
(`where.and[1].not.value`) and whose message says why. Field names are looked up in the
whitelist of fields.py and never used as SQL. Equivalent requests normalise to equal `Query`
values (and so share one cache entry): value lists are deduplicated and sorted, nested `and`s
flattened, chain and slug values canonicalised as ingest stores them.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from defiwatch.domain.series import name_problem
from defiwatch.domain.text import text_problem
from defiwatch.errors import ValidationError
from defiwatch.query.fields import DATASETS, Dataset, FieldSpec, FieldType

__all__ = [
    "LIST_FILTERS",
    "RANGE_FILTERS",
    "AggOp",
    "Aggregation",
    "BoolOp",
    "Bucket",
    "Condition",
    "GroupKey",
    "Limits",
    "Node",
    "Not",
    "Op",
    "OutputColumn",
    "Query",
    "Scalar",
    "SortKey",
    "parse_query",
]

Scalar = int | float | str | None

_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_MAX_STRING = 256  # characters of one compared value
_MAX_INT = 2**63 - 1
_MAX_NUMBER = 1e300


class Op(enum.StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NIN = "nin"
    BETWEEN = "between"
    CONTAINS = "contains"


class AggOp(enum.StrEnum):
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    COUNT = "count"
    COUNT_DISTINCT = "count_distinct"
    PERCENTILE = "percentile"


class Bucket(enum.StrEnum):
    """Time buckets, aligned in UTC: hours, days, ISO weeks (Monday) and calendar months."""

    HOUR = "1h"
    DAY = "1d"
    WEEK = "1w"
    MONTH = "1mo"


_ORDERED = frozenset({Op.GT, Op.GTE, Op.LT, Op.LTE, Op.BETWEEN})
_OPS_BY_TYPE: Mapping[FieldType, frozenset[Op]] = {
    FieldType.NUMBER: frozenset({Op.EQ, Op.NE, Op.IN, Op.NIN, *_ORDERED}),
    FieldType.INTEGER: frozenset({Op.EQ, Op.NE, Op.IN, Op.NIN, *_ORDERED}),
    # No ordering on strings: PostgreSQL collations and SQLite's BINARY disagree.
    FieldType.STRING: frozenset({Op.EQ, Op.NE, Op.IN, Op.NIN, Op.CONTAINS}),
    FieldType.LIST: frozenset({Op.CONTAINS, Op.IN, Op.NIN}),
}
_NUMERIC = frozenset({FieldType.NUMBER, FieldType.INTEGER})
_AGG_TYPES: Mapping[AggOp, frozenset[FieldType]] = {
    AggOp.SUM: _NUMERIC,
    AggOp.AVG: _NUMERIC,
    AggOp.MIN: _NUMERIC,
    AggOp.MAX: _NUMERIC,
    AggOp.PERCENTILE: _NUMERIC,
    AggOp.COUNT: frozenset({FieldType.NUMBER, FieldType.INTEGER, FieldType.STRING}),
    AggOp.COUNT_DISTINCT: frozenset({FieldType.NUMBER, FieldType.INTEGER, FieldType.STRING}),
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Complexity ceilings (config: DEFIWATCH_QUERY_MAX_*)."""

    max_depth: int = 6  # nesting of and/or/not; a lone condition has depth 1
    max_conditions: int = 64  # leaf conditions in where and having together
    max_in_values: int = 1_000
    max_aggregations: int = 16
    max_group_by: int = 4
    max_sort: int = 4
    max_rows: int = 10_000
    default_rows: int = 100

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """From `defiwatch.config.Settings` (its `query_max_*` fields)."""
        return cls(
            max_depth=settings.query_max_depth, max_conditions=settings.query_max_conditions,
            max_in_values=settings.query_max_in_values,
            max_aggregations=settings.query_max_aggregations,
            max_group_by=settings.query_max_group_by, max_sort=settings.query_max_sort,
            max_rows=settings.query_max_rows, default_rows=settings.query_default_rows,
        )


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: Op
    value: Scalar | tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class BoolOp:
    kind: Literal["and", "or"]
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Node


Node = Condition | BoolOp | Not


@dataclass(frozen=True, slots=True)
class Aggregation:
    op: AggOp
    field: str | None
    alias: str
    p: float | None = None  # percentile in [0, 1]


@dataclass(frozen=True, slots=True)
class GroupKey:
    field: str
    alias: str
    bucket: Bucket | None = None


@dataclass(frozen=True, slots=True)
class SortKey:
    name: str  # an output column (aggregated queries) or a dataset field (row queries)
    desc: bool = False


@dataclass(frozen=True, slots=True)
class OutputColumn:
    name: str
    type: FieldType
    normalize: Any = field(default=None, compare=False)  # Callable[[str], str] | None


@dataclass(frozen=True, slots=True)
class Query:
    """A validated query. `cursor` is the opaque page token (checked when compiled)."""

    dataset: str
    select: tuple[str, ...] = ()
    where: Node | None = None
    group_by: tuple[GroupKey, ...] = ()
    aggregations: tuple[Aggregation, ...] = ()
    having: Node | None = None
    sort: tuple[SortKey, ...] = ()
    time_from: int | None = None  # ts >= time_from
    time_to: int | None = None  # ts < time_to
    limit: int = 100
    cursor: str | None = None

    @property
    def aggregated(self) -> bool:
        return bool(self.group_by or self.aggregations)

    @property
    def spec(self) -> Dataset:
        return DATASETS[self.dataset]

    def outputs(self) -> list[OutputColumn]:
        """The columns of each result row, in order."""
        ds = self.spec
        if not self.aggregated:
            return [OutputColumn(n, ds.fields[n].type, ds.fields[n].normalize) for n in self.select]
        cols = [
            OutputColumn(g.alias, FieldType.INTEGER if g.bucket else ds.fields[g.field].type,
                         None if g.bucket else ds.fields[g.field].normalize)
            for g in self.group_by
        ]
        for a in self.aggregations:
            cols.append(OutputColumn(a.alias, _agg_type(a, ds)))
        return cols

    def fields_used(self) -> set[str]:
        """Dataset fields the query reads (to decide optional joins)."""
        used = set(self.select) | {g.field for g in self.group_by}
        used |= {a.field for a in self.aggregations if a.field}
        if not self.aggregated:
            used |= {s.name for s in self.sort}
        _collect_fields(self.where, used)
        return used

    def canonical(self, *, with_page: bool = True) -> bytes:
        """A deterministic encoding: equal queries give equal bytes (the cache key's input)."""
        body = {
            "dataset": self.dataset, "select": self.select, "where": _node_json(self.where),
            "group_by": [[g.field, g.alias, g.bucket] for g in self.group_by],
            "aggregations": [[a.op, a.field, a.alias, a.p] for a in self.aggregations],
            "having": _node_json(self.having),
            "sort": [[s.name, s.desc] for s in self.sort],
            "time": [self.time_from, self.time_to],
        }
        if with_page:
            body["page"] = [self.limit, self.cursor]
        return msgspec.json.encode(body, order="sorted")


def _agg_type(a: Aggregation, ds: Dataset) -> FieldType:
    if a.op in (AggOp.COUNT, AggOp.COUNT_DISTINCT):
        return FieldType.INTEGER
    if a.op in (AggOp.MIN, AggOp.MAX) and a.field and ds.fields[a.field].type == FieldType.INTEGER:
        return FieldType.INTEGER
    return FieldType.NUMBER


def _collect_fields(node: Node | None, into: set[str]) -> None:
    if node is None:
        return
    if isinstance(node, Condition):
        into.add(node.field)
    elif isinstance(node, BoolOp):
        for item in node.items:
            _collect_fields(item, into)
    else:
        _collect_fields(node.item, into)


def _node_json(node: Node | None) -> Any:
    if node is None:
        return None
    if isinstance(node, Condition):
        value = list(node.value) if isinstance(node.value, tuple) else node.value
        return {"f": node.field, "op": node.op.value, "v": value}
    if isinstance(node, BoolOp):
        return {node.kind: [_node_json(i) for i in node.items]}
    return {"not": _node_json(node.item)}


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------


def _fail(path: str, message: str) -> ValidationError:
    return ValidationError(message, field=path or None)


def _show(value: Any) -> str:
    """A short, safe rendering of a client value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _obj(value: Any, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be an object, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise _fail(_join(path, str(key)),
                        f"unknown key {_show(key)}; allowed: {', '.join(allowed)}")
    return value


def _list(value: Any, path: str, *, max_items: int, non_empty: bool = True) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, f"must be a list, got {type(value).__name__}")
    if non_empty and not value:
        raise _fail(path, "must not be empty")
    if len(value) > max_items:
        raise _fail(path, f"has {len(value)} items; at most {max_items} are allowed")
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, got {type(value).__name__}")
    return value


def _int(value: Any, path: str, *, low: int = 0, high: int = _MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise _fail(path, f"must be between {low} and {high}, got {value}")
    return int(value)


def _scalar(value: Any, spec: FieldSpec | OutputColumn, path: str, *, normalize: bool) -> Scalar:
    """Check one compared value against its field's type (no null here)."""
    ftype = spec.type
    if ftype in _NUMERIC:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, f"must be a number for {ftype.value} field {spec.name!r}, "
                              f"got {_show(value)}")
        if ftype == FieldType.INTEGER:
            if isinstance(value, float):
                if not value.is_integer():
                    raise _fail(path, f"must be a whole number for {spec.name!r}")
                value = int(value)
            if abs(value) > _MAX_INT:
                raise _fail(path, f"is out of range for {spec.name!r}")
            return int(value)
        if not math.isfinite(value) or abs(value) > _MAX_NUMBER:
            raise _fail(path, "must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise _fail(path, f"must be a string for field {spec.name!r}, got {_show(value)}")
    if not value or len(value) > _MAX_STRING:
        raise _fail(path, f"must be 1 to {_MAX_STRING} characters long")
    normalizer = spec.normalize if normalize else None
    # A slug, coin or chain is held to ingest's cap: normalising a longer one would cut it to
    # some other name.
    if problem := (text_problem(value) if normalizer is None else name_problem(value)):
        raise _fail(path, problem)
    return value if normalizer is None else str(normalizer(value))


class _Budget:
    """Counts leaf conditions across where and having."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.conditions = 0


_COND_KEYS = ("field", "op", "value")


def _node(
    raw: Any, path: str, columns: Mapping[str, FieldSpec | OutputColumn], budget: _Budget,
    depth: int, what: str,
) -> Node:
    limits = budget.limits
    if depth > limits.max_depth:
        raise _fail(path, f"nests deeper than {limits.max_depth} levels")
    if isinstance(raw, list):  # a bare list is an implicit "and"
        raw = {"and": raw}
    if not isinstance(raw, Mapping):
        raise _fail(path, f"must be a condition object or and/or/not, got {type(raw).__name__}")
    bool_keys = [k for k in ("and", "or", "not") if k in raw]
    if bool_keys:
        if len(raw) != 1:
            raise _fail(path, "an and/or/not object must have exactly one key")
        kind = bool_keys[0]
        sub = _join(path, kind)
        if kind == "not":
            return Not(_node(raw["not"], sub, columns, budget, depth + 1, what))
        items = _list(raw[kind], sub, max_items=limits.max_conditions)
        nodes = [_node(item, _join(sub, i), columns, budget, depth + 1, what)
                 for i, item in enumerate(items)]
        return _bool(kind, nodes)  # type: ignore[arg-type]
    _obj(raw, path, _COND_KEYS)
    for key in _COND_KEYS:
        if key not in raw:
            raise _fail(_join(path, key), f"is required in a condition ({', '.join(_COND_KEYS)})")
    budget.conditions += 1
    if budget.conditions > limits.max_conditions:
        raise _fail(path, f"more than {limits.max_conditions} conditions in where and having")
    fpath = _join(path, "field")
    name = _name(raw["field"], fpath)
    spec = columns.get(name)
    if spec is None:
        raise _fail(fpath, f"unknown {what} {_show(name)}; known: {', '.join(sorted(columns))}")
    opath = _join(path, "op")
    op_name = _name(raw["op"], opath)
    try:
        op = Op(op_name)
    except ValueError:
        raise _fail(opath, f"unknown operator {_show(op_name)}; known: "
                           f"{', '.join(o.value for o in Op)}") from None
    allowed = _OPS_BY_TYPE[spec.type]
    if op not in allowed:
        raise _fail(opath, f"{op.value!r} does not apply to {spec.type.value} field {name!r}; "
                           f"use one of {', '.join(sorted(o.value for o in allowed))}")
    return Condition(name, op, _value(raw["value"], op, spec, _join(path, "value"), limits))


def _value(raw: Any, op: Op, spec: FieldSpec | OutputColumn, path: str,
           limits: Limits) -> Scalar | tuple[Scalar, ...]:
    normalize = op is not Op.CONTAINS or spec.type == FieldType.LIST
    if op in (Op.EQ, Op.NE):
        if raw is None:
            return None  # eq null = IS NULL, ne null = IS NOT NULL
        return _scalar(raw, spec, path, normalize=normalize)
    if op in (Op.IN, Op.NIN):
        items = _list(raw, path, max_items=limits.max_in_values)
        values = {_scalar(v, spec, _join(path, i), normalize=normalize) for i, v in enumerate(items)}
        return tuple(sorted(values, key=_sort_key))
    if op is Op.BETWEEN:
        pair = _list(raw, path, max_items=2)
        if len(pair) != 2:
            raise _fail(path, "must be [low, high]")
        low = _scalar(pair[0], spec, _join(path, 0), normalize=False)
        high = _scalar(pair[1], spec, _join(path, 1), normalize=False)
        assert isinstance(low, int | float) and isinstance(high, int | float)
        if low > high:
            raise _fail(path, f"low {low} is above high {high}")
        return (low, high)
    if raw is None:
        raise _fail(path, f"{op.value} needs a value, not null")
    return _scalar(raw, spec, path, normalize=normalize)


def _sort_key(v: Scalar) -> tuple[str, Any]:
    return (type(v).__name__, v)


def _bool(kind: Literal["and", "or"], nodes: list[Node]) -> Node:
    flat: list[Node] = []
    for n in nodes:
        if isinstance(n, BoolOp) and n.kind == kind:
            flat.extend(n.items)
        else:
            flat.append(n)
    unique = {msgspec.json.encode(_node_json(n), order="sorted"): n for n in flat}
    ordered = [unique[k] for k in sorted(unique)]
    return ordered[0] if len(ordered) == 1 else BoolOp(kind, tuple(ordered))


def _default_alias(op: AggOp, fname: str | None, p: float | None) -> str:
    if fname is None:
        return "count"
    if op is AggOp.PERCENTILE and p is not None:
        pct = f"{p * 100:.6g}".replace(".", "_").replace("-", "_")
        return f"p{pct}_{fname}"
    return f"{op.value}_{fname}"


def _aggregation(raw: Any, path: str, ds: Dataset, op_key: str) -> Aggregation:
    keys = (op_key, "field", "as", "p") + (("group_by",) if op_key == "operation" else ())
    obj = _obj(raw, path, keys)
    opath = _join(path, op_key)
    if op_key not in obj:
        raise _fail(opath, "is required")
    op_name = _name(obj[op_key], opath)
    try:
        op = AggOp(op_name)
    except ValueError:
        raise _fail(opath, f"unknown aggregation {_show(op_name)}; known: "
                           f"{', '.join(a.value for a in AggOp)}") from None
    fname: str | None = None
    if "field" in obj and obj["field"] is not None:
        fpath = _join(path, "field")
        fname = _name(obj["field"], fpath)
        spec = ds.field(fname)
        if spec is None:
            raise _fail(fpath, f"unknown field {_show(fname)} for dataset {ds.name}; known: "
                               f"{', '.join(ds.fields)}")
        if spec.type not in _AGG_TYPES[op]:
            raise _fail(fpath, f"{op.value} does not apply to {spec.type.value} field {fname!r}")
    elif op is not AggOp.COUNT:
        raise _fail(_join(path, "field"), f"{op.value} needs a field")
    p: float | None = None
    if op is AggOp.PERCENTILE:
        ppath = _join(path, "p")
        raw_p = obj.get("p")
        if isinstance(raw_p, bool) or not isinstance(raw_p, int | float) or not 0 <= raw_p <= 1:
            raise _fail(ppath, "percentile needs p between 0 and 1 (0.5 = median)")
        p = float(raw_p)
    elif "p" in obj:
        raise _fail(_join(path, "p"), "p only applies to percentile")
    alias = _default_alias(op, fname, p)
    if "as" in obj:
        alias = _alias(obj["as"], _join(path, "as"))
    return Aggregation(op, fname, alias, p)


def _alias(raw: Any, path: str) -> str:
    name = _name(raw, path)
    if not _ALIAS_RE.match(name):
        raise _fail(path, "must match [A-Za-z_][A-Za-z0-9_]* (at most 63 characters)")
    return name


def _group_key(raw: Any, path: str, ds: Dataset) -> GroupKey:
    if isinstance(raw, str):
        raw = {"field": raw}
    obj = _obj(raw, path, ("field", "bucket", "as"))
    bucket: Bucket | None = None
    if "bucket" in obj:
        bpath = _join(path, "bucket")
        bname = _name(obj["bucket"], bpath)
        try:
            bucket = Bucket(bname)
        except ValueError:
            raise _fail(bpath, f"unknown bucket {_show(bname)}; known: "
                               f"{', '.join(b.value for b in Bucket)}") from None
        if not ds.history:
            raise _fail(bpath, f"dataset {ds.name} is a snapshot without history; time "
                               "buckets apply to tvl and prices")
    fpath = _join(path, "field")
    fname = _name(obj.get("field", "ts" if bucket else None), fpath)
    spec = ds.field(fname)
    if spec is None:
        raise _fail(fpath, f"unknown field {_show(fname)} for dataset {ds.name}; known: "
                           f"{', '.join(ds.fields)}")
    if spec.type == FieldType.LIST:
        raise _fail(fpath, f"cannot group by list field {fname!r}")
    if bucket is not None and fname != "ts":
        raise _fail(fpath, "time buckets apply to the ts field only")
    alias = _alias(obj["as"], _join(path, "as")) if "as" in obj else (
        "bucket" if bucket else fname)
    return GroupKey(fname, alias, bucket)


def _sort(raw: Any, path: str, limits: Limits) -> list[tuple[str, bool, str]]:
    """(name, desc, json path of the name) per sort key; names are resolved by the caller."""
    items = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, list):
        _list(raw, path, max_items=limits.max_sort)
    out: list[tuple[str, bool, str]] = []
    for i, item in enumerate(items):
        ipath = _join(path, i) if isinstance(raw, list) else path
        if isinstance(item, str):
            desc = item.startswith("-")
            out.append((item[1:] if desc else item, desc, ipath))
            continue
        obj = _obj(item, ipath, ("field", "order"))
        fpath = _join(ipath, "field")
        if "field" not in obj:
            raise _fail(fpath, "is required")
        order = obj.get("order", "asc")
        if order not in ("asc", "desc"):
            raise _fail(_join(ipath, "order"), f"must be 'asc' or 'desc', got {_show(order)}")
        out.append((_name(obj["field"], fpath), order == "desc", fpath))
    return out


def _time(raw: Any, path: str, ds: Dataset) -> tuple[int | None, int | None]:
    if not ds.history:
        raise _fail(path, f"dataset {ds.name} is a snapshot; time ranges apply to tvl and prices")
    obj = _obj(raw, path, ("from", "to"))
    start = _int(obj["from"], _join(path, "from")) if obj.get("from") is not None else None
    end = _int(obj["to"], _join(path, "to")) if obj.get("to") is not None else None
    if start is not None and end is not None and start >= end:
        raise _fail(path, f"from ({start}) must be before to ({end})")
    return start, end


_GENERAL_KEYS = ("dataset", "select", "where", "group_by", "aggregations", "having", "sort",
                 "time", "limit", "cursor")
_ORIGINAL_KEYS = ("filters", "aggregations", "sort", "limit", "cursor")
_GENERAL_ONLY = frozenset(_GENERAL_KEYS) - frozenset(_ORIGINAL_KEYS)


def parse_query(body: Any, limits: Limits = Limits()) -> Query:
    """Validate and normalise a request body (either shape) into a `Query`.

    Raises:
        ValidationError: with `field` = the JSON path of the offending part.
    """
    if not isinstance(body, Mapping):
        raise _fail("", f"the query must be a JSON object, got {type(body).__name__}")
    if _GENERAL_ONLY & set(body):
        return _parse_general(body, limits)  # a "filters" key in it is then reported unknown
    if "filters" in body or _looks_original(body):
        return _parse_original(body, limits)
    return _parse_general(body, limits)


def _looks_original(body: Mapping[str, Any]) -> bool:
    aggs = body.get("aggregations")
    return isinstance(aggs, list) and any(isinstance(a, Mapping) and "operation" in a
                                          for a in aggs)


def _parse_general(body: Mapping[str, Any], limits: Limits) -> Query:
    _obj(body, "", _GENERAL_KEYS)
    ds_name = _name(body.get("dataset", "protocols"), "dataset")
    ds = DATASETS.get(ds_name)
    if ds is None:
        raise _fail("dataset", f"unknown dataset {_show(ds_name)}; known: {', '.join(DATASETS)}")
    budget = _Budget(limits)
    where = None
    if body.get("where") is not None:
        where = _node(body["where"], "where", ds.fields, budget, 1, "field")
    group_by: list[GroupKey] = []
    if body.get("group_by") is not None:
        raw_groups = body["group_by"] if isinstance(body["group_by"], list) else [body["group_by"]]
        if isinstance(body["group_by"], list):
            _list(raw_groups, "group_by", max_items=limits.max_group_by)
        group_by = [_group_key(g, _join("group_by", i) if isinstance(body["group_by"], list)
                               else "group_by", ds) for i, g in enumerate(raw_groups)]
        if sum(1 for g in group_by if g.bucket) > 1:
            raise _fail("group_by", "at most one time bucket")
    aggregations: list[Aggregation] = []
    if body.get("aggregations") is not None:
        raw_aggs = _list(body["aggregations"], "aggregations", max_items=limits.max_aggregations)
        aggregations = [_aggregation(a, _join("aggregations", i), ds, "op")
                        for i, a in enumerate(raw_aggs)]
    time_from, time_to = (None, None)
    if body.get("time") is not None:
        time_from, time_to = _time(body["time"], "time", ds)
    _check_one_metric(ds, where, group_by, aggregations)
    return _assemble(body, ds, limits, budget, where=where, group_by=group_by,
                     aggregations=aggregations, time_from=time_from, time_to=time_to,
                     lenient_sort=False)


_VALUE_AGGS = frozenset({AggOp.SUM, AggOp.AVG, AggOp.MIN, AggOp.MAX, AggOp.PERCENTILE})


def _pins_metric(node: Node | None) -> bool:
    """Whether `where` keeps a single metric: `metric eq m` (or `in [m]`) at its top level."""
    if isinstance(node, BoolOp):
        return node.kind == "and" and any(_pins_metric(n) for n in node.items)
    if not isinstance(node, Condition) or node.field != "metric":
        return False
    single_in = isinstance(node.value, tuple) and len(node.value) == 1
    return (node.op is Op.EQ and node.value is not None) or (node.op is Op.IN and single_in)


def _check_one_metric(ds: Dataset, where: Node | None, group_by: Sequence[GroupKey],
                      aggregations: Sequence[Aggregation]) -> None:
    """Refuse a sum/avg/min/max/percentile of `value` across metrics: a median over `price`
    and `mcap` rows is neither a price nor a market cap."""
    if "metric" not in ds.fields or _pins_metric(where) or any(
            g.field == "metric" for g in group_by):
        return
    for i, a in enumerate(aggregations):
        if a.field == "value" and a.op in _VALUE_AGGS:
            raise _fail(_join(_join("aggregations", i), "field"), (
                f"{a.op.value} of value would mix the metrics of dataset {ds.name} "
                f"({', '.join(sorted(ds.metrics))}); filter one with "
                '{"field": "metric", "op": "eq", "value": ...} in where, or group_by metric'))


def _check_split(query: Query) -> Query:
    """Fields that split a row (`protocols.chain`) only apply to aggregated queries: a row
    query would list a protocol once per chain."""
    if query.aggregated:
        return query
    in_where: set[str] = set()
    _collect_fields(query.where, in_where)
    for name in sorted(f for f in query.fields_used() if query.spec.fields[f].splits):
        path = "where" if name in in_where else "select" if name in query.select else "sort"
        raise _fail(path, f"field {name!r} splits each protocol by chain, so it applies to "
                          f"aggregated queries only: group_by {name}, or aggregate with a "
                          f"condition on {name}")
    return query


def _assemble(
    body: Mapping[str, Any], ds: Dataset, limits: Limits, budget: _Budget, *, where: Node | None,
    group_by: list[GroupKey], aggregations: list[Aggregation], time_from: int | None,
    time_to: int | None, lenient_sort: bool,
) -> Query:
    aggregated = bool(group_by or aggregations)
    select: tuple[str, ...] = ()
    if body.get("select") is not None:
        if aggregated:
            raise _fail("select", "select lists fields of row queries; an aggregated query "
                                  "returns its group_by keys and aggregations")
        names = _list(body["select"], "select", max_items=len(ds.fields))
        seen: list[str] = []
        for i, n in enumerate(names):
            name = _name(n, _join("select", i))
            if name not in ds.fields:
                raise _fail(_join("select", i), f"unknown field {_show(name)} for dataset "
                                                f"{ds.name}; known: {', '.join(ds.fields)}")
            if name in seen:
                raise _fail(_join("select", i), f"field {name!r} is listed twice")
            seen.append(name)
        select = tuple(seen)
    elif not aggregated:
        select = tuple(n for n, s in ds.fields.items() if s.default)
    outputs: dict[str, OutputColumn] = {}
    if aggregated:
        probe = Query(ds.name, group_by=tuple(group_by), aggregations=tuple(aggregations))
        for i, col in enumerate(probe.outputs()):
            if col.name in outputs:
                where_at = (_join("group_by", i) if i < len(group_by)
                            else _join("aggregations", i - len(group_by)))
                raise _fail(where_at, f"output name {col.name!r} is used twice; set 'as'")
            outputs[col.name] = col
    having = None
    if body.get("having") is not None:
        if not aggregated:
            raise _fail("having", "having filters groups: add group_by or aggregations")
        having = _node(body["having"], "having", outputs, budget, 1, "output column")
    sort: list[SortKey] = []
    if body.get("sort") is not None:
        for name, desc, spath in _sort(body["sort"], "sort", limits):
            sort.append(SortKey(_resolve_sort(name, spath, ds, outputs, aggregations,
                                              aggregated, lenient_sort), desc))
        if len({s.name for s in sort}) != len(sort):
            raise _fail("sort", "a column is sorted on twice")
    limit = limits.default_rows
    if body.get("limit") is not None:
        limit = _int(body["limit"], "limit", low=1, high=limits.max_rows)
    cursor = None
    if body.get("cursor") is not None:
        cursor = _name(body["cursor"], "cursor")
        if len(cursor) > 4096:
            raise _fail("cursor", "is too long")
    return _check_split(Query(
        dataset=ds.name, select=select, where=where, group_by=tuple(group_by),
        aggregations=tuple(aggregations), having=having, sort=tuple(sort), time_from=time_from,
        time_to=time_to, limit=limit, cursor=cursor,
    ))


def _resolve_sort(
    name: str, path: str, ds: Dataset, outputs: Mapping[str, OutputColumn],
    aggregations: Sequence[Aggregation], aggregated: bool, lenient: bool,
) -> str:
    if not aggregated:
        if name not in ds.fields:
            raise _fail(path, f"unknown field {_show(name)} for dataset {ds.name}; known: "
                              f"{', '.join(ds.fields)}")
        if ds.fields[name].type == FieldType.LIST:
            raise _fail(path, f"cannot sort by list field {name!r}")
        return name
    if name in outputs:
        return name
    if lenient:  # original shape: "sort by tvl" means the one aggregation over tvl
        matches = [a.alias for a in aggregations if a.field == name]
        if len(matches) == 1:
            return matches[0]
    raise _fail(path, f"unknown output column {_show(name)}; an aggregated query sorts by its "
                      f"outputs: {', '.join(outputs)}")


# The original spec's filters, each mapped onto a condition of the protocols dataset.
RANGE_FILTERS = {"tvl_range": "tvl", "mcap_range": "mcap", "change_1h": "change_1h",
                  "change_24h": "change_24h", "change_7d": "change_7d"}
LIST_FILTERS = {"protocols": "slug", "chains": "chains", "categories": "category"}


def _parse_original(body: Mapping[str, Any], limits: Limits) -> Query:
    _obj(body, "", _ORIGINAL_KEYS)
    ds = DATASETS["protocols"]
    budget = _Budget(limits)
    conditions: list[Node] = []
    if body.get("filters") is not None:
        filters = _obj(body["filters"], "filters", (*LIST_FILTERS, *RANGE_FILTERS))
        for key, fname in LIST_FILTERS.items():
            if filters.get(key) is not None:
                raw = filters[key]
                conditions.append(_filter(ds.fields[fname], Op.IN, [raw] if isinstance(raw, str)
                                          else raw, _join("filters", key), budget))
        for key, fname in RANGE_FILTERS.items():
            if filters.get(key) is None:
                continue
            fpath = _join("filters", key)
            bounds = _obj(filters[key], fpath, ("min", "max"))
            if bounds.get("min") is None and bounds.get("max") is None:
                raise _fail(fpath, "needs min, max or both")
            for bound, op in (("min", Op.GTE), ("max", Op.LTE)):
                if bounds.get(bound) is not None:
                    conditions.append(_filter(ds.fields[fname], op, bounds[bound],
                                              _join(fpath, bound), budget))
    where = _bool("and", conditions) if conditions else None
    aggregations: list[Aggregation] = []
    group_by: list[GroupKey] = []
    if body.get("aggregations") is not None:
        raw_aggs = _list(body["aggregations"], "aggregations", max_items=limits.max_aggregations)
        group_spec: Any = None
        for i, raw in enumerate(raw_aggs):
            apath = _join("aggregations", i)
            aggregations.append(_aggregation(raw, apath, ds, "operation"))
            this = raw.get("group_by") if isinstance(raw, Mapping) else None
            if i == 0:
                group_spec = this
            elif this != group_spec:
                raise _fail(_join(apath, "group_by"), "all aggregations must share one group_by")
        if group_spec is not None:
            gpath = _join(_join("aggregations", 0), "group_by")
            specs = group_spec if isinstance(group_spec, list) else [group_spec]
            if len(specs) > limits.max_group_by:
                raise _fail(gpath, f"at most {limits.max_group_by} group keys")
            group_by = [_group_key(g, gpath, ds) for g in specs]
    return _assemble(body, ds, limits, budget, where=where, group_by=group_by,
                     aggregations=aggregations, time_from=None, time_to=None, lenient_sort=True)


def _filter(spec: FieldSpec, op: Op, raw: Any, path: str, budget: _Budget) -> Condition:
    budget.conditions += 1
    if budget.conditions > budget.limits.max_conditions:
        raise _fail(path, f"more than {budget.limits.max_conditions} conditions")
    return Condition(spec.name, op, _value(raw, op, spec, path, budget.limits))
