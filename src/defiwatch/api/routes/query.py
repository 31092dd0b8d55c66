"""POST /v1/query/advanced: analytic queries over the snapshot and the history (docs/query.md)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Request, Response

from defiwatch.api.auth import require
from defiwatch.api.schemas import QueryAnswer, QueryFields, ref
from defiwatch.errors import ValidationError
from defiwatch.query import MemoryResultCache, QueryService
from defiwatch.query.fields import DATASETS
from defiwatch.store.keys import Principal

__all__ = ["query_service", "router"]

router = APIRouter(prefix="/v1/query", tags=["query"])

def query_service(request: Request) -> QueryService:
    """The wired service, or (when the composition root gave none) an in-process one."""
    ctx = request.app.state.ctx
    service: QueryService | None = getattr(ctx, "query", None)
    if service is None:
        service = getattr(request.app.state, "query_fallback", None)
        if service is None:
            service = QueryService(ctx.engine, MemoryResultCache())
            request.app.state.query_fallback = service
    return service


def wants_csv(request: Request) -> bool:
    if request.query_params.get("format") == "csv":
        return True
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept.split(",")[0]


_EXAMPLES: dict[str, Any] = {
    "original": {"summary": "Original spec shape", "value": {
        "filters": {"chains": ["ethereum"], "tvl_range": {"min": 1e8},
                    "change_24h": {"min": -5, "max": 5}},
        "aggregations": [{"field": "tvl", "operation": "sum", "group_by": "category"}],
        "sort": {"field": "tvl", "order": "desc"}, "limit": 10}},
    "general": {"summary": "General grammar: weekly chain TVL", "value": {
        "dataset": "tvl", "time": {"from": 1704067200, "to": 1711929600},
        "where": {"field": "metric", "op": "eq", "value": "chain_tvl"},
        "group_by": ["subject", {"field": "ts", "bucket": "1w"}],
        "aggregations": [{"op": "avg", "field": "value", "as": "avg_tvl"},
                         {"op": "percentile", "p": 0.9, "field": "value"}],
        "sort": ["bucket", "-avg_tvl"], "limit": 100}},
}


@router.post(
    "/advanced",
    summary="Filter, aggregate and page over protocols, TVL history and prices",
    description="Two request shapes (the original spec's `filters`/`aggregations`, and the "
    "general grammar with `dataset`, `where`, `group_by`, `having`, ...): see docs/query.md. "
    "Answers are cached and never older than the newest stored point they cover "
    "(`meta.cache`); send `Cache-Control: no-cache` to recompute. `Accept: text/csv` (or "
    "`?format=csv`) returns CSV with the meta in `X-Query-*` headers. A rejected query is a "
    "400 whose `error.field` is the JSON path of the bad part.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": ref("Query"), "examples": _EXAMPLES}}}},
    response_model=QueryAnswer,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
               410: {"description": "the listing a cursor pages through expired "
                                    "(code cursor_expired): start again without `cursor`"}},
)
async def advanced(
    request: Request,
    _principal: Annotated[Principal, Depends(require("read"))],
) -> Response:
    service = query_service(request)
    limit = service.max_body_bytes
    raw = await request.body()
    if len(raw) > limit:
        raise ValidationError(f"the query is {len(raw)} bytes; at most {limit} are accepted")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValidationError(f"the body is not valid JSON: {exc}") from None
    use_cache = "no-cache" not in request.headers.get("cache-control", "").lower()
    answer = await service.advanced(body, use_cache=use_cache)
    meta = {"x-query-cache": answer.cache, "x-query-took-ms": str(answer.took_ms),
            "x-query-count": str(answer.page.count)}
    if answer.page.as_of is not None:
        meta["x-query-as-of"] = str(answer.page.as_of)
    if answer.page.next_cursor is not None:
        meta["x-query-next-cursor"] = answer.page.next_cursor
    if wants_csv(request):
        return Response(answer.csv(), media_type="text/csv; charset=utf-8", headers=meta)
    return Response(answer.json(), media_type="application/json", headers=meta)


@router.get("/fields", summary="Datasets and their fields (the whitelist queries use)",
            response_model=QueryFields)
async def fields(_principal: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    return {name: {"description": ds.description, "history": ds.history,
                   "fields": {f.name: {"type": f.type.value, "description": f.description}
                              for f in ds.fields.values()}}
            for name, ds in DATASETS.items()}
