"""Response and request schemas of the routes that answer pre-encoded JSON.

Those routes return msgspec-encoded bytes for speed, so FastAPI cannot infer their shape; the
models here document it (`response_model=` on the route) and tests/api/test_openapi.py checks
every answer against them. Shapes that already exist as types are generated from those types,
not written twice: `Event` and `Latest` from the msgspec structs in domain/events.py, the query
body from the parser's own vocabulary (query/dsl.py, query/fields.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from defiwatch.api.routes.notifications import NotificationOut
from defiwatch.domain.events import Event, Latest
from defiwatch.query.dsl import LIST_FILTERS, RANGE_FILTERS, AggOp, Bucket, Limits, Op
from defiwatch.query.fields import DATASETS, Dataset, FieldType

__all__ = [
    "AlertDetail",
    "AlertOut",
    "AlertPage",
    "ChainTvl",
    "CoinChart",
    "CoinPrices",
    "DatedTvl",
    "ErrorBody",
    "EventPage",
    "LatestPage",
    "LlamaProtocol",
    "LlamaProtocolDetail",
    "QueryAnswer",
    "QueryFields",
    "Readiness",
    "RuleTestResult",
    "extra_components",
    "ref",
]

_COMPONENTS = "#/components/schemas/{name}"


def ref(name: str) -> dict[str, str]:
    """A JSON Schema reference to a component of the OpenAPI document."""
    return {"$ref": _COMPONENTS.format(name=name)}


def _component(name: str) -> Any:
    """A type that FastAPI documents as a reference to a component added by extra_components."""
    return Annotated[dict[str, Any], WithJsonSchema(ref(name))]


# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="stable, e.g. invalid_request, unauthorized, rate_limited")
    message: str = Field(description="what happened and what to do")
    field: str | None = Field(description="JSON path (or parameter name) at fault, if any")
    temporary: bool = Field(description="true: retrying later may succeed")


class ErrorBody(BaseModel):
    """Every error the API answers (api/errors.py), REST and WebSocket alike."""

    model_config = ConfigDict(extra="forbid", title="Error")

    error: ErrorDetail


# --- health --------------------------------------------------------------------------------------


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="per dependency: ok, or error: <reason>")


# --- events and latest values ------------------------------------------------------------------


class EventMeta(BaseModel):
    since: int
    next_since: int = Field(description="pass as `since` for the next page")
    count: int
    first_offset: int | None = Field(description="oldest retained offset (null: empty stream)")
    last_offset: int | None = Field(description="newest offset (null: empty stream)")
    gap: bool = Field(description="events after `since` were already trimmed")


class EventPage(BaseModel):
    data: list[_component("Event")]  # type: ignore[valid-type]
    meta: EventMeta


class CountMeta(BaseModel):
    count: int


class LatestPage(BaseModel):
    data: list[_component("Latest")]  # type: ignore[valid-type]
    meta: CountMeta


# --- queries -----------------------------------------------------------------------------------

_CELL = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"},
                   {"type": "array", "items": {"type": "string"}}]}


class QueryMeta(BaseModel):
    count: int
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")
    as_of: int | None = Field(description="observation time of the newest row (epoch s)")
    cache: Literal["hit", "miss"]
    took_ms: float


class QueryAnswer(BaseModel):
    data: list[Annotated[dict[str, Any], WithJsonSchema(
        {"type": "object", "additionalProperties": _CELL})]] = Field(
        description="one object per row: the selected fields, or the group keys and "
        "aggregations")
    meta: QueryMeta


class FieldInfo(BaseModel):
    type: Literal["number", "integer", "string", "list"]
    description: str


class DatasetInfo(BaseModel):
    description: str
    history: bool
    fields: dict[str, FieldInfo]


QueryFields = dict[str, DatasetInfo]


def _node_schema(leaf: str) -> dict[str, Any]:
    """A where/having tree: a condition, a list (implicit and), or one of and/or/not."""
    node = ref(leaf.replace("Condition", "Node"))
    return {"anyOf": [
        ref(leaf),
        {"type": "array", "items": node, "minItems": 1},
        *({"type": "object", "properties": {k: {"type": "array", "items": node, "minItems": 1}},
           "required": [k], "additionalProperties": False} for k in ("and", "or")),
        {"type": "object", "properties": {"not": node}, "required": ["not"],
         "additionalProperties": False},
    ]}


def _condition_schema(fields: list[str] | None) -> dict[str, Any]:
    value = {"anyOf": [{"type": ["string", "number", "null"]},
                       {"type": "array", "items": {"type": ["string", "number"]}}]}
    return {"type": "object", "additionalProperties": False,
            "required": ["field", "op", "value"], "properties": {
                "field": {"enum": fields} if fields else {"type": "string",
                                                          "description": "an output column"},
                "op": {"enum": [o.value for o in Op]}, "value": value}}


def _sort_schema(limits: Limits) -> dict[str, Any]:
    key = {"anyOf": [{"type": "string", "description": "a column; '-column' sorts descending"},
                     {"type": "object", "additionalProperties": False, "required": ["field"],
                      "properties": {"field": {"type": "string"},
                                     "order": {"enum": ["asc", "desc"]}}}]}
    return {"anyOf": [key, {"type": "array", "items": key, "minItems": 1,
                            "maxItems": limits.max_sort}]}


def _general_schema(ds: Dataset, limits: Limits) -> dict[str, Any]:
    """The general grammar over one dataset (docs/query.md)."""
    name = ds.name.capitalize()
    fields = list(ds.fields)
    groupable = [f for f, spec in ds.fields.items() if spec.type is not FieldType.LIST]
    group_key = {"anyOf": [{"enum": groupable}, {
        "type": "object", "additionalProperties": False, "properties": {
            "field": {"enum": groupable}, "as": {"type": "string"},
            **({"bucket": {"enum": [b.value for b in Bucket]}} if ds.history else {})}}]}
    aggregation = {"type": "object", "additionalProperties": False, "required": ["op"],
                   "properties": {"op": {"enum": [a.value for a in AggOp]},
                                  "field": {"enum": [*fields, None]}, "as": {"type": "string"},
                                  "p": {"type": "number", "minimum": 0, "maximum": 1}}}
    props: dict[str, Any] = {
        "dataset": {"enum": [ds.name]},
        "select": {"type": "array", "items": {"enum": fields}, "minItems": 1},
        "where": ref(f"Query{name}Node"),
        "group_by": {"anyOf": [group_key, {"type": "array", "items": group_key, "minItems": 1,
                                           "maxItems": limits.max_group_by}]},
        "aggregations": {"type": "array", "items": aggregation, "minItems": 1,
                         "maxItems": limits.max_aggregations},
        "having": ref("QueryOutputNode"),
        "sort": _sort_schema(limits),
        "limit": {"type": "integer", "minimum": 1, "maximum": limits.max_rows},
        "cursor": {"type": "string", "maxLength": 4096,
                   "description": "meta.next_cursor of the previous page"},
    }
    if ds.history:
        props["time"] = {"type": "object", "additionalProperties": False, "properties": {
            "from": {"type": "integer", "minimum": 0, "description": "ts >= from (epoch s)"},
            "to": {"type": "integer", "minimum": 0, "description": "ts < to (epoch s)"}}}
    return {"type": "object", "title": f"Query over {ds.name}", "description": ds.description,
            "additionalProperties": False, "properties": props,
            "required": [] if ds.name == "protocols" else ["dataset"]}


def _original_schema(limits: Limits) -> dict[str, Any]:
    """The original product spec's shape over the protocols dataset."""
    bounds = {"type": "object", "additionalProperties": False, "minProperties": 1,
              "properties": {"min": {"type": "number"}, "max": {"type": "number"}}}
    names = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    aggregation = {"type": "object", "additionalProperties": False, "required": ["operation"],
                   "properties": {"operation": {"enum": [a.value for a in AggOp]},
                                  "field": {"type": "string"}, "as": {"type": "string"},
                                  "p": {"type": "number", "minimum": 0, "maximum": 1},
                                  "group_by": {"type": "string"}}}
    return {"type": "object", "title": "Query (original shape)", "additionalProperties": False,
            "properties": {
                "filters": {"type": "object", "additionalProperties": False, "properties": {
                    **dict.fromkeys(LIST_FILTERS, names), **dict.fromkeys(RANGE_FILTERS, bounds)}},
                "aggregations": {"type": "array", "items": aggregation, "minItems": 1,
                                 "maxItems": limits.max_aggregations},
                "sort": _sort_schema(limits),
                "limit": {"type": "integer", "minimum": 1, "maximum": limits.max_rows},
                "cursor": {"type": "string", "maxLength": 4096}}}


def _query_components(limits: Limits) -> dict[str, Any]:
    out: dict[str, Any] = {
        "QueryOutputCondition": _condition_schema(None),
        "QueryOutputNode": _node_schema("QueryOutputCondition"),
        "QueryOriginal": _original_schema(limits),
    }
    variants = []
    for ds in DATASETS.values():
        name = ds.name.capitalize()
        out[f"Query{name}Condition"] = _condition_schema(list(ds.fields))
        out[f"Query{name}Node"] = _node_schema(f"Query{name}Condition")
        out[f"Query{name}"] = _general_schema(ds, limits)
        variants.append(ref(f"Query{name}"))
    out["Query"] = {
        "description": "A query in either grammar (docs/query.md); the server's limits "
        "(DEFIWATCH_QUERY_MAX_*) may be lower than the defaults shown here.",
        "anyOf": [*variants, ref("QueryOriginal")]}
    return out


def extra_components() -> dict[str, Any]:
    """Components the models above refer to by name: Event, Latest and the query grammar."""
    _, structs = msgspec.json.schema_components([Event, Latest], ref_template=_COMPONENTS)
    return {**structs, **_query_components(Limits())}


# --- alerts --------------------------------------------------------------------------------------


class SeriesOut(BaseModel):
    metric: str
    subject: str
    chain: str


class AlertOut(BaseModel):
    id: int
    rule_id: int | None
    rule_name: str
    severity: str
    instance: str
    series: SeriesOut
    state: Literal["firing", "resolved"]
    reason: str
    suppressed: str | None = Field(description="why the fire was not notified, e.g. snoozed")
    value: float | None
    event: dict[str, Any] | None = Field(description="the event that fired it")
    fired_at: float
    resolved_at: float | None
    resolve_reason: str | None
    resolved_event: dict[str, Any] | None
    acknowledged_at: float | None
    acknowledged_by: str | None
    snoozed_until: float | None
    dedup_key: str


class AlertDetail(AlertOut):
    notifications: list[NotificationOut]


class AlertPageMeta(BaseModel):
    count: int
    total: int
    next_before: int | None = Field(description="pass as `before` for the next page")


class AlertPage(BaseModel):
    data: list[AlertOut]
    meta: AlertPageMeta


class LeafOut(BaseModel):
    path: str
    series: str
    op: str
    threshold: float
    value: float | None
    previous: float | None
    truth: Literal["true", "false", "unknown"]
    source: str | None


class InstanceVerdict(BaseModel):
    instance: str | None
    series: str | None
    observed_ts: int | None = None
    truth: Literal["true", "false", "unknown"]
    phase: str
    active: bool | None = None
    would_fire: bool
    action: str
    reason: str
    explanation: str
    leaves: list[LeafOut]


class RuleTestResult(BaseModel):
    rule_id: int
    evaluated_at: float
    paused: bool
    would_fire: bool
    matched_series: int
    instances: list[InstanceVerdict]
    queued: list[int] | None = Field(default=None, description="with send=true: the test "
                                                               "notifications' ids")


# --- DefiLlama-compatible ------------------------------------------------------------------------

_Open = ConfigDict(extra="allow")  # DefiLlama adds fields over time; clients ignore unknown ones


class LlamaProtocol(BaseModel):
    model_config = _Open

    id: str
    name: str
    slug: str
    symbol: str
    category: str
    chains: list[str]
    chain: str
    gecko_id: str | None
    tvl: float | None
    chainTvls: dict[str, float]
    change_1h: float | None
    change_1d: float | None
    change_7d: float | None
    mcap: float | None


class DatedLiquidity(BaseModel):
    date: int
    totalLiquidityUSD: float


class ChainHistory(BaseModel):
    model_config = _Open

    tvl: list[DatedLiquidity]


class LlamaProtocolDetail(BaseModel):
    model_config = _Open

    id: str
    name: str
    slug: str
    chains: list[str]
    tvl: list[DatedLiquidity]
    chainTvls: dict[str, ChainHistory]
    currentChainTvls: dict[str, float]


class ChainTvl(BaseModel):
    model_config = _Open

    name: str
    tvl: float
    gecko_id: str | None
    tokenSymbol: str | None
    cmcId: str | None
    chainId: int | str | None


class DatedTvl(BaseModel):
    date: int
    tvl: float


class Quote(BaseModel):
    price: float
    symbol: str | None
    timestamp: int
    confidence: float


class CoinPrices(BaseModel):
    coins: dict[str, Quote] = Field(description="by requested id; unknown ids are left out")


class ChartPoint(BaseModel):
    timestamp: int
    price: float


class ChartSeries(BaseModel):
    symbol: str | None
    confidence: float
    prices: list[ChartPoint]


class CoinChart(BaseModel):
    coins: dict[str, ChartSeries]
