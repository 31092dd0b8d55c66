"""Liveness, readiness and Prometheus metrics. Readiness really talks to the database, the
stream and the cache, all at once and each within `READY_BUDGET_S`, so a hung dependency (a
stopped Redis, a database that accepts but does not answer) makes `/readyz` a prompt 503 naming
it instead of hanging the probe."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.api.schemas import Readiness
from defiwatch.ops.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["health"])

# Seconds each check may take; they run concurrently, so this bounds the whole answer
# (issue 10 asks for a 503 within 1 s: probes often time out at 1 s).
READY_BUDGET_S = 0.8


async def _check(probe: Callable[[], Awaitable[Any]]) -> str:
    """"ok", or why the probe failed or did not answer within READY_BUDGET_S."""
    try:
        async with asyncio.timeout(READY_BUDGET_S):
            await probe()
    except TimeoutError:
        return f"error: no answer within {READY_BUDGET_S} s"
    except Exception as exc:  # any failure means not ready; the reason is reported
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


async def _select_one(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database, stream and cache reachable",
            response_model=Readiness,
            responses={503: {"model": Readiness, "description": "not ready: `checks` says what "
                                                                "failed"}})
async def readyz(request: Request) -> JSONResponse:
    ctx = request.app.state.ctx
    probes: dict[str, Callable[[], Awaitable[Any]]] = {
        "database": lambda: _select_one(ctx.engine), "stream": ctx.stream.ping,
        "cache": ctx.cache.ping}
    results = await asyncio.gather(*(_check(probe) for probe in probes.values()))
    checks: dict[str, Any] = dict(zip(probes, results, strict=True))
    if ctx.health is not None:  # the other roles of this process (run_roles)
        roles = ctx.health.readiness()
        checks["roles"] = "ok" if roles.ready else f"error: not ready: {', '.join(roles.failing)}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics of this process", include_in_schema=False)
async def metrics() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE)
