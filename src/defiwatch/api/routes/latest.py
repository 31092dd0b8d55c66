"""Newest values with windowed changes, from the hot cache."""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Query, Request, Response

from defiwatch.api.auth import require
from defiwatch.api.params import Name
from defiwatch.api.schemas import LatestPage
from defiwatch.domain import METRICS, normalize_chain, normalize_subject
from defiwatch.errors import ValidationError
from defiwatch.store.keys import Principal

router = APIRouter(prefix="/v1", tags=["latest"])

_ENCODER = msgspec.json.Encoder()


@router.get("/latest", summary="Newest value per series, filtered by metric, subject, chain",
            response_model=LatestPage)
async def latest(
    request: Request,
    _principal: Annotated[Principal, Depends(require("read"))],
    metric: Annotated[str | None, Query(description="e.g. tvl, chain_tvl, price")] = None,
    subject: Annotated[Name | None, Query(description="protocol slug or coingecko:{id}")] = None,
    chain: Annotated[Name | None, Query(description="chain slug; '-' = all chains")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> Response:
    if metric is not None and metric not in METRICS:
        raise ValidationError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}",
                              field="metric")
    if subject is not None:
        subject = normalize_subject(metric or "tvl", subject)
    if chain is not None:
        chain = normalize_chain(chain)
    items = await request.app.state.ctx.cache.get_latest(metric, subject, chain, limit)
    body = {"data": items, "meta": {"count": len(items)}}
    return Response(_ENCODER.encode(body), media_type="application/json")
