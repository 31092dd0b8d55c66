"""The FastAPI application; receives its collaborators, picks none itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch import __version__
from defiwatch.api.errors import install_error_handlers
from defiwatch.api.routes import events, health, ingest, latest
from defiwatch.cache import HotCache
from defiwatch.ingest.service import IngestService
from defiwatch.stream import EventStream

__all__ = ["ApiContext", "create_app"]


@dataclass
class ApiContext:
    engine: AsyncEngine
    stream: EventStream
    cache: HotCache
    ingest: IngestService
    touched: dict[int, float] = field(default_factory=dict)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="defiwatch",
        version=__version__,
        description="Real-time DeFi TVL and price events. Authenticate with "
        "`Authorization: Bearer <key>` (create one with `defiwatch keys create`).",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (health, events, latest, ingest):
        app.include_router(module.router)
    return app
