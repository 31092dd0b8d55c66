"""A small, hand-computable data set and fixtures that serve it from SQLite and PostgreSQL.

Days are UTC; NOW_TS is the newest observation. Protocol totals are chosen so that the snapshot
has round numbers: aave 1000 (+25 % in 24 h, +100 % in 7 d), compound 400 (-20 %), uniswap
2000 (0 %, +100 %), pancakeswap 300 (+50 %), lido 5000 (no history) and `mystery` with no TVL,
no category and a name that is a spreadsheet formula.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from conftest import PG_HOST, PG_PORT, _pg_admin, pg_url, require_service
from defiwatch.api import ApiContext, create_app
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.domain import ProtocolMeta
from defiwatch.query import Limits, MemoryResultCache, QueryService, RedisResultCache
from defiwatch.store.keys import create_key

DAY = 86_400
HOUR = 3_600
T0 = 1_704_067_200  # 2024-01-01 00:00 UTC, a Monday
NOW_TS = T0 + 10 * DAY

PROTOCOLS = [
    ProtocolMeta("aave", "Aave", "Lending", ("ethereum", "polygon"), "aave", "AAVE",
                 "https://aave.com", 1_600_000_000),
    ProtocolMeta("compound", "Compound", "Lending", ("ethereum",), "compound-governance-token",
                 "COMP"),
    ProtocolMeta("uniswap", "Uniswap", "Dexes", ("ethereum", "arbitrum", "bsc"), "uniswap", "UNI"),
    ProtocolMeta("pancakeswap", "PancakeSwap", "Dexes", ("bsc",), "pancakeswap-token", "CAKE"),
    ProtocolMeta("lido", "Lido", "Liquid Staking", ("ethereum",), "lido-dao", "LDO"),
    ProtocolMeta("mystery", "=HYPERLINK(\"x\")", None, (), None, None),
]

# Daily protocol totals, day 0..10 (None = no point that day).
TOTALS: dict[str, list[float | None]] = {
    "aave": [100, 200, 300, 500, 550, 600, 650, 700, 750, 800, 1000],
    "compound": [None] * 9 + [500, 400],
    "uniswap": [1500, 1500, 1500, 1000, 1500, 1500, 1500, 1500, 1500, 2000, 2000],
    "pancakeswap": [None] * 9 + [200, 300],
    "lido": [None] * 10 + [5000],
}
CHAIN_TVL_NOW = {
    ("aave", "ethereum"): 700.0, ("aave", "polygon"): 300.0, ("compound", "ethereum"): 400.0,
    ("uniswap", "ethereum"): 1500.0, ("uniswap", "arbitrum"): 300.0, ("uniswap", "bsc"): 200.0,
    ("pancakeswap", "bsc"): 300.0, ("lido", "ethereum"): 5000.0,
}
CHAIN_DAYS = range(-29, 11)  # chain_tvl and daily prices from 2023-12-03 to NOW


def chain_tvl(chain: str, d: int) -> float:
    base = {"ethereum": 10_000.0, "bsc": 3_000.0, "arbitrum": 2_000.0}[chain]
    return base + {"ethereum": 10, "bsc": 1, "arbitrum": -1}[chain] * (d + 29)


def eth_price(d: int) -> float:
    return 2_000.0 + d + 29


def eth_hourly(h: int) -> float:
    """Hourly ETH prices during the last day before NOW (h = 1..23)."""
    return 2_100.0 + h * 0.5


def points() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(metric: str, subject: str, chain: str, ts: int, value: float) -> None:
        out.append({"metric": metric, "subject": subject, "chain": chain, "ts": ts,
                    "value": value})

    for slug, values in TOTALS.items():
        for d, v in enumerate(values):
            if v is not None:
                add("tvl", slug, "-", T0 + d * DAY, v)
    add("tvl", "aave", "-", NOW_TS - HOUR, 990.0)  # gives aave a 1 h change
    for (slug, chain), v in CHAIN_TVL_NOW.items():
        add("tvl", slug, chain, NOW_TS, v)
    add("tvl_borrowed", "aave", "-", NOW_TS, 400.0)
    for d in CHAIN_DAYS:
        for chain in ("ethereum", "bsc", "arbitrum"):
            add("chain_tvl", chain, chain, T0 + d * DAY, chain_tvl(chain, d))
        add("price", "coingecko:ethereum", "-", T0 + d * DAY, eth_price(d))
        add("price", "coingecko:bitcoin", "-", T0 + d * DAY, 40_000.0 + 100 * (d + 29))
    for h in range(1, 24):
        add("price", "coingecko:ethereum", "-", NOW_TS - DAY + h * HOUR, eth_hourly(h))
    for coin, v in (("aave", 50.0), ("uniswap", 300.0), ("lido-dao", 700.0)):
        add("mcap", f"coingecko:{coin}", "-", NOW_TS, v)
    return out


async def seed(platform: Platform) -> None:
    await platform.ingest.ingest_protocols(PROTOCOLS, ts=T0, source="test")
    result = await platform.ingest.ingest_points(points(), source="test")
    assert not result.rejected, result.rejected


@dataclass
class Served:
    """A seeded platform with a query service and an HTTP client with a read key."""

    platform: Platform
    service: QueryService
    client: httpx.AsyncClient
    key: str
    backend: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def query(self, body: Any, **headers: str) -> httpx.Response:
        return await self.client.post("/v1/query/advanced", json=body,
                                      headers={**self.auth, **headers})


def make_service(platform: Platform, **kwargs: Any) -> QueryService:
    s = platform.settings
    cache = (RedisResultCache(platform.redis, prefix=s.redis_prefix) if platform.redis
             else MemoryResultCache())
    return QueryService(platform.engine, cache, limits=Limits.from_settings(s), **kwargs)


async def make_key(platform: Platform, *scopes: str, user: str = "alice", tier: str = "free"
                   ) -> str:
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user=user, tier=tier, scopes=list(scopes or ("read",)),
                                  tiers=list(platform.settings.tiers))
    return key


def api_for(platform: Platform, service: QueryService, **ctx: Any) -> FastAPI:
    return create_app(ApiContext(platform.engine, platform.stream, platform.cache,
                                 platform.ingest, query=service, **ctx))


def app_for(platform: Platform, service: QueryService, **ctx: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api_for(platform, service, **ctx)),
                             base_url="http://defiwatch.test")


@contextlib.asynccontextmanager
async def over_http(app: FastAPI) -> AsyncIterator[str]:
    """`app` served by uvicorn on a loopback port (its base URL). The socket listens before
    the server starts, so a client may connect at once: nothing to wait for."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            await task


@contextlib.asynccontextmanager
async def open_served(backend: str, tmp: Path) -> AsyncIterator[Served]:
    """The seeded data set on `backend` ("sqlite" or "postgres", a database of its own)."""
    common: dict[str, Any] = {"state_dir": tmp, "replay_enabled": False, "demo_key": False}
    database: str | None = None
    if backend == "sqlite":
        settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp}/q.db", **common)
    else:
        require_service("PostgreSQL", PG_HOST, PG_PORT)
        database = f"dw_qtest_{uuid.uuid4().hex[:12]}"
        await _pg_admin(f'CREATE DATABASE "{database}"')
        settings = Settings(database_url=pg_url(database), **common)
    try:
        async with open_platform(settings) as platform:
            await seed(platform)
            service = make_service(platform)
            key = await make_key(platform, "read")
            async with app_for(platform, service) as client:
                yield Served(platform, service, client, key, backend)
    finally:
        if database is not None:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgres"])
async def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Served]:
    """The seeded data set on each backend, shared by a module's read-only tests."""
    async with open_served(request.param, tmp_path_factory.mktemp("q")) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Served, Served]]:
    """The seeded data set on SQLite and on PostgreSQL at once, to compare answers."""
    async with open_served("sqlite", tmp_path_factory.mktemp("q")) as lite, \
            open_served("postgres", tmp_path_factory.mktemp("q")) as pg:
        yield lite, pg
