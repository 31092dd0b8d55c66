"""The tail of the event stream over HTTP (the WebSocket gateway is the push path)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Query, Request, Response

from defiwatch.api.auth import require
from defiwatch.api.params import Offset
from defiwatch.api.schemas import EventPage
from defiwatch.store.keys import Principal

router = APIRouter(prefix="/v1", tags=["events"])

_ENCODER = msgspec.json.Encoder()


@router.get(
    "/events",
    summary="Events with offset > since, oldest first",
    description="Page with `since=meta.next_since`. `meta.gap` is true when events after "
    "`since` were already trimmed from the stream's retention.",
    response_model=EventPage,
)
async def list_events(
    request: Request,
    _principal: Annotated[Principal, Depends(require("read"))],
    since: Annotated[Offset, Query(description="offset already seen; 0 = from the oldest")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    page = await request.app.state.ctx.stream.read(since, limit)
    next_since = page.events[-1].offset if page.events else max(since, 0)
    body = {
        "data": page.events,
        "meta": {"since": since, "next_since": next_since, "count": len(page.events),
                 "first_offset": page.first_offset, "last_offset": page.last_offset,
                 "gap": page.gap},
    }
    return Response(_ENCODER.encode(body), media_type="application/json")
