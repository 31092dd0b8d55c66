"""The FastAPI application; receives its collaborators, picks none itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch import __version__
from defiwatch.alerts.config import AlertsApiConfig
from defiwatch.api.bodylimit import BodyGateMiddleware, BodyLimits
from defiwatch.api.errors import install_error_handlers
from defiwatch.api.jsondepth import JsonDepthMiddleware
from defiwatch.api.keycache import KeyCache
from defiwatch.api.metrics import RequestMetricsMiddleware
from defiwatch.api.openapi import DOCS_STATIC_URL, install_openapi
from defiwatch.api.ratelimit import RateLimiter, RateLimitMiddleware
from defiwatch.api.routes import (
    alerts,
    devices,
    endpoints,
    events,
    health,
    ingest,
    latest,
    llama,
    notifications,
    query,
)
from defiwatch.cache import HotCache
from defiwatch.config import Settings
from defiwatch.ingest.service import IngestService
from defiwatch.ops.health import Health
from defiwatch.query import QueryService
from defiwatch.stream import EventStream

__all__ = ["ApiContext", "create_app"]


@dataclass
class ApiContext:
    engine: AsyncEngine
    stream: EventStream
    cache: HotCache
    ingest: IngestService
    touched: dict[int, float] = field(default_factory=dict)
    alerts: AlertsApiConfig = field(default_factory=AlertsApiConfig)  # rule limits per tier
    query: QueryService | None = None  # None: an in-process one is made on first use
    rate_limiter: RateLimiter | None = None  # None: no rate limits
    compat_public: bool = False  # DefiLlama-compatible routes without a key
    # Delivery routes read notify_* from it (SSRF allow-list, VAPID key, secret grace);
    # None: Settings() from the environment, read on first use.
    settings: Settings | None = None
    # A pool without pre-ping for the per-request reads (key lookup, freshness probe, limiter):
    # see store/db.py read_retrying. None: `engine`.
    reads: AsyncEngine | None = None
    # The roles of this process (run_roles): /readyz also requires them all beating.
    # None: the API alone, readiness is its dependency checks.
    health: Health | None = None


def create_app(ctx: ApiContext) -> FastAPI:
    # Swagger UI (/docs) and ReDoc (/redoc) from assets served here, not from a CDN.
    app = FastAPIOffline(
        static_url=DOCS_STATIC_URL,
        title="defiwatch",
        version=__version__,
        description="Real-time DeFi TVL and price events. Authenticate with "
        "`Authorization: Bearer <key>` (create one with `defiwatch keys create`).",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    install_openapi(app)
    # Within a router, static paths (/v1/notifications/preferences) come before {id} ones.
    for module in (health, events, latest, ingest, alerts, devices, endpoints, notifications):
        app.include_router(module.router)
    app.include_router(query.router)
    app.include_router(llama.router)
    # Last: `/{api_key}/...` (DefiLlama Pro's key-in-path form) must not shadow other routes.
    app.include_router(llama.router, prefix="/{api_key}", include_in_schema=False)
    # Middleware order, innermost first: the body gate (key, then size) runs before any route
    # reads a body; the rate limiter before it, so guessing keys with big bodies is limited too.
    # Both look keys up through one cache.
    keys = ctx.rate_limiter.keys if ctx.rate_limiter else KeyCache(ctx.reads or ctx.engine)
    # Innermost: the JSON depth check reads bodies the gate has already let through.
    app.add_middleware(JsonDepthMiddleware)
    app.add_middleware(BodyGateMiddleware, keys=keys, limits=BodyLimits.from_settings(
        ctx.settings) if ctx.settings is not None else BodyLimits())
    if ctx.rate_limiter is not None:
        app.add_middleware(RateLimitMiddleware, limiter=ctx.rate_limiter)
    # Added last, so outermost: it also counts what the other middleware answer themselves.
    app.add_middleware(RequestMetricsMiddleware)
    return app
