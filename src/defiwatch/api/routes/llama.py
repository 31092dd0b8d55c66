"""DefiLlama-compatible read API: DefiLlama's paths and JSON shapes, answered from our data.

Point an existing DefiLlama client or script at defiwatch by changing its base URL. The routes
need a key with the `read` scope, given as DefiLlama Pro does, in the path
(`https://host/dw_xxx_yyy/protocols`, so a client that only lets you set a base URL works), or
as `?apiKey=`, `Authorization: Bearer` or `X-API-Key`. Why a key, when DefiLlama's free API
has none: our rate limits are per tier and a tier comes from a key; the data is the operator's
to share. `DEFIWATCH_QUERY_COMPAT_PUBLIC=true` opens them keyless, limited per client address
at the free tier.

Answers go through the query service's cache, so they are as fresh as the store: the cache is
checked against change_log on every request (query/freshness.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.api.auth import invalid_key, key_from_request
from defiwatch.api.params import EpochSeconds, Name
from defiwatch.api.routes.query import query_service
from defiwatch.api.schemas import (
    ChainTvl,
    CoinChart,
    CoinPrices,
    DatedTvl,
    LlamaProtocol,
    LlamaProtocolDetail,
)
from defiwatch.domain.series import name_problem
from defiwatch.errors import AuthError, NotFoundError, ScopeError, ValidationError
from defiwatch.query import Deps
from defiwatch.query import llama as data
from defiwatch.query.fields import TVL_DATASET_METRICS
from defiwatch.store.keys import Principal, authenticate

__all__ = ["router"]

router = APIRouter(tags=["DefiLlama-compatible"])

_MAX_COINS = 100
_DEFAULT_WIDTH = "6h"  # coins.llama.fi's default searchWidth for historical prices
_PROTOCOL_DEPS = Deps(TVL_DATASET_METRICS | {"mcap"}, protocols=True)


async def compat_reader(request: Request) -> Principal | None:
    """Authenticate a compat request (key in the path, query or headers; see module doc)."""
    ctx = request.app.state.ctx
    path_key = request.path_params.get("api_key")
    if path_key is not None and not str(path_key).startswith("dw_"):
        raise NotFoundError(f"no route {request.url.path}")
    key = path_key or key_from_request(request)
    if not key:
        if getattr(ctx, "compat_public", False):
            return None
        raise AuthError("missing API key: put it in the path (/<key>/protocols), ?apiKey=, "
                        "'Authorization: Bearer <key>' or 'X-API-Key'")
    async with ctx.engine.connect() as conn:
        principal = await authenticate(conn, key)
    if principal is None:
        raise invalid_key()
    if "read" not in principal.scopes and "admin" not in principal.scopes:
        raise ScopeError("this key lacks the 'read' scope")
    return principal


Reader = Annotated[Principal | None, Depends(compat_reader)]


async def _answer(
    request: Request, label: str, deps: Deps, compute: Callable[[AsyncConnection], Awaitable[Any]],
    *, index: bool = False, cacheable: bool = True,
) -> Response:
    service = query_service(request)
    path = request.url.path
    if "api_key" in request.path_params:
        path = path.split("/", 2)[2] if path.count("/") >= 2 else path
        path = "/" + path.lstrip("/")
    params = sorted((k, v) for k, v in request.query_params.multi_items() if k != "apiKey")
    key = "llama:" + hashlib.sha256(msgspec.json.encode([path, params])).hexdigest()

    async def encoded(conn: AsyncConnection) -> bytes:
        return msgspec.json.encode(await compute(conn))

    no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
    payload, hit = await service.cached(key, deps, index=index, compute=encoded,
                                        use_cache=cacheable and not no_cache,
                                        label=f"llama:{label}")
    return Response(payload, media_type="application/json",
                    headers={"x-query-cache": "hit" if hit else "miss"})


def _coins(raw: str) -> list[str]:
    coins = [c.strip() for c in raw.split(",") if c.strip()]
    if not coins:
        raise ValidationError("name at least one coin, e.g. coingecko:ethereum", field="coins")
    if len(coins) > _MAX_COINS:
        raise ValidationError(f"at most {_MAX_COINS} coins per request", field="coins")
    for coin in coins:
        if problem := name_problem(coin):
            raise ValidationError(f"coin {coin[:40]!r} {problem}", field="coins")
    return list(dict.fromkeys(coins))


@router.get("/protocols", summary="All protocols with current TVL (DefiLlama /protocols)",
            response_model=list[LlamaProtocol])
async def protocols(request: Request, _reader: Reader) -> Response:
    return await _answer(request, "protocols", _PROTOCOL_DEPS, data.protocols_list, index=True)


@router.get("/protocol/{slug}", summary="A protocol's TVL history by chain (/protocol/{slug})",
            response_model=LlamaProtocolDetail)
async def protocol(request: Request, slug: Name, _reader: Reader) -> Response:
    async def compute(conn: AsyncConnection) -> Any:
        found = await data.protocol(conn, slug)
        if found is None:
            raise NotFoundError(f"no protocol {slug!r}", field="slug")
        return found

    return await _answer(request, "protocol", _PROTOCOL_DEPS, compute, index=True)


@router.get("/tvl/{slug}", summary="A protocol's current TVL as a bare number (/tvl/{slug})",
            response_model=float)
async def current_tvl(request: Request, slug: Name, _reader: Reader) -> Response:
    async def compute(conn: AsyncConnection) -> Any:
        value = await data.tvl(conn, slug)
        if value is None:
            raise NotFoundError(f"no TVL for protocol {slug!r}", field="slug")
        return value

    return await _answer(request, "tvl", Deps(frozenset({"tvl"}), protocols=True), compute,
                         index=True)


@router.get("/v2/chains", summary="Current TVL of every chain (/v2/chains)",
            response_model=list[ChainTvl])
async def v2_chains(request: Request, _reader: Reader) -> Response:
    return await _answer(request, "chains", Deps(frozenset({"chain_tvl"})), data.chains,
                         index=True)


@router.get("/v2/historicalChainTvl", summary="Daily TVL summed over chains",
            response_model=list[DatedTvl])
async def historical_all(request: Request, _reader: Reader) -> Response:
    async def compute(conn: AsyncConnection) -> Any:
        return await data.chain_tvl_history(conn, None)

    return await _answer(request, "historical_chain_tvl", Deps(frozenset({"chain_tvl"})),
                         compute)


@router.get("/v2/historicalChainTvl/{chain}", summary="Daily TVL of one chain",
            response_model=list[DatedTvl])
async def historical_chain(request: Request, chain: Name, _reader: Reader) -> Response:
    async def compute(conn: AsyncConnection) -> Any:
        rows = await data.chain_tvl_history(conn, chain)
        if not rows:
            raise NotFoundError(f"no TVL history for chain {chain!r}", field="chain")
        return rows

    return await _answer(request, "historical_chain_tvl", Deps(frozenset({"chain_tvl"})),
                         compute)


@router.get("/prices/current/{coins}", summary="Newest prices (coins.llama.fi /prices/current)",
            response_model=CoinPrices)
async def prices_current(
    request: Request, coins: str, _reader: Reader,
    searchWidth: Annotated[  # DefiLlama's parameter names, hence camelCase
        str | None, Query(description="only prices newer than now minus this")] = None,
) -> Response:
    ids = _coins(coins)
    not_before = None
    if searchWidth is not None:
        not_before = int(time.time()) - data.parse_duration(searchWidth, field="searchWidth")

    async def compute(conn: AsyncConnection) -> Any:
        return await data.prices_current(conn, ids, not_before=not_before)

    return await _answer(request, "prices_current",
                         Deps(frozenset({"price"}), protocols=True), compute, index=True,
                         cacheable=not_before is None)


@router.get("/prices/historical/{timestamp}/{coins}", summary="Prices at a time",
            response_model=CoinPrices)
async def prices_historical(
    request: Request, timestamp: EpochSeconds, coins: str, _reader: Reader,
    searchWidth: str = _DEFAULT_WIDTH,
) -> Response:
    ids = _coins(coins)
    width = data.parse_duration(searchWidth, field="searchWidth")

    async def compute(conn: AsyncConnection) -> Any:
        return await data.prices_at(conn, ids, timestamp, width)

    deps = Deps(frozenset({"price"}), True, timestamp - width, timestamp + width + 1)
    return await _answer(request, "prices_historical", deps, compute)


@router.get("/chart/{coins}", summary="Prices at regular intervals (coins.llama.fi /chart)",
            response_model=CoinChart)
async def chart(
    request: Request, coins: str, _reader: Reader,
    start: EpochSeconds | None = None, end: EpochSeconds | None = None,
    span: Annotated[int | None, Query(ge=1)] = None,
    period: str = "24h",
    searchWidth: str | None = None,
) -> Response:
    ids = _coins(coins)
    step = data.parse_duration(period, field="period")
    width = (data.parse_duration(searchWidth, field="searchWidth") if searchWidth is not None
             else max(1, step // 10))  # DefiLlama's default: 10 % of the period
    stamps = data.chart_timestamps(start, end, span, step, int(time.time()))

    async def compute(conn: AsyncConnection) -> Any:
        return await data.chart(conn, ids, stamps, width)

    deps = Deps(frozenset({"price"}), True, min(stamps) - width, max(stamps) + width + 1)
    return await _answer(request, "chart", deps, compute,
                         cacheable=start is not None or end is not None)
