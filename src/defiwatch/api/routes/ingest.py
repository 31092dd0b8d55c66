"""POST /v1/ingest: batches of points from other programs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from defiwatch.api.auth import require
from defiwatch.ingest.service import MAX_BATCH
from defiwatch.store.keys import Principal

router = APIRouter(prefix="/v1", tags=["ingest"])


class IngestRequest(BaseModel):
    points: list[Any] = Field(
        max_length=MAX_BATCH,
        description="Each point: metric, subject, chain (optional), ts (epoch s), value.",
        examples=[[{"metric": "tvl", "subject": "aave", "chain": "ethereum",
                    "ts": 1710115200, "value": 1.2e10}]],
    )
    source: str = Field(default="api", max_length=40, pattern=r"^[a-z0-9_.-]+$")


class Rejection(BaseModel):
    index: int
    field: str
    reason: str


class IngestResponse(BaseModel):
    accepted: int
    duplicates: list[int] = Field(description="indexes of points already stored")
    rejected: list[Rejection] = Field(description="field is the JSON path, e.g. points[2].ts")


@router.post("/ingest", summary="Store a batch of points; each is accepted, duplicate or rejected")
async def ingest(
    body: IngestRequest,
    request: Request,
    _principal: Annotated[Principal, Depends(require("ingest"))],
) -> IngestResponse:
    result = await request.app.state.ctx.ingest.ingest_points(body.points, source=body.source)
    return IngestResponse(
        accepted=result.accepted,
        duplicates=result.duplicates,
        rejected=[
            Rejection(index=r.index, field=f"points[{r.index}].{r.field}".rstrip("."),
                      reason=r.reason)
            for r in result.rejected
        ],
    )
