"""Per-tier rate limits: the GCRA step (pure), one contract for the memory and Redis stores,
and the middleware on every API route (headers, 429 + Retry-After, exemptions, sharing)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from defiwatch.api.ratelimit import (
    Decision,
    MemoryRateStore,
    RateLimiter,
    RateStore,
    RedisRateStore,
    gcra,
    key_from_scope,
)
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings

from .conftest import app_for, make_key, make_service

S = 1_000_000  # µs


@pytest.mark.parametrize(("tat", "now", "limit", "allowed", "remaining", "new_tat"), [
    (None, 0, 60, True, 59, 1 * S),  # a new caller: one interval used
    (30 * S, 0, 60, True, 29, 31 * S),
    (59 * S, 0, 60, True, 0, 60 * S),  # the 60th request within a minute
    (60 * S, 0, 60, False, 0, None),  # the 61st: wait one interval
    (120 * S, 100 * S, 60, True, 39, 121 * S),
    (5 * S, 100 * S, 60, True, 59, 101 * S),  # long idle: full quota back
    (None, 0, 0, False, 0, None),  # a zero limit refuses everything
    (None, 0, 6_000, True, 5_999, 10_000),
])
def test_gcra_steps(tat: int | None, now: int, limit: int, allowed: bool, remaining: int,
                    new_tat: int | None) -> None:
    decision, tat_after = gcra(tat, now, limit)
    assert (decision.allowed, decision.remaining, tat_after) == (allowed, remaining, new_tat)
    if not allowed and limit:
        assert decision.retry_after_s == pytest.approx(1.0)
        assert ("retry-after", "1") in [(k.decode(), v.decode()) for k, v in decision.headers()]


def test_headers() -> None:
    assert dict(Decision(True, 60, 12, 47.2, 0.0).headers()) == {
        b"x-ratelimit-limit": b"60", b"x-ratelimit-remaining": b"12", b"x-ratelimit-reset": b"48"}


@pytest.mark.parametrize(("scope", "key"), [
    ({"headers": [(b"authorization", b"Bearer dw_a_b")], "path": "/x"}, "dw_a_b"),
    ({"headers": [(b"x-api-key", b"dw_c_d")], "path": "/x"}, "dw_c_d"),
    ({"headers": [], "query_string": b"a=1&apiKey=dw_e_f", "path": "/x"}, "dw_e_f"),
    ({"headers": [], "path": "/dw_g_h/protocols"}, "dw_g_h"),
    ({"headers": [], "path": "/protocols"}, None),
])
def test_the_key_is_found_where_routes_look(scope: dict[str, object], key: str | None) -> None:
    assert key_from_scope(scope) == key


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RateStore]:
    if request.param == "memory":
        yield MemoryRateStore()
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    client = aioredis.from_url(url)
    try:
        yield RedisRateStore(client, prefix=prefix)
    finally:
        await client.aclose()


async def test_store_contract(store: RateStore) -> None:
    who = f"key:{uuid.uuid4().hex}"
    decisions = [await store.hit(who, 5) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)
    refused = decisions[-1]
    assert 0 < refused.retry_after_s <= 12.0 and 48.0 <= refused.reset_s <= 60.0
    other = await store.hit(f"key:{uuid.uuid4().hex}", 5)  # callers are independent
    assert other.allowed and other.remaining == 4
    assert not (await store.hit(who, 0)).allowed


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with open_platform(settings) as p:
        yield p


def limiter_for(platform: Platform, limits: dict[str, int]) -> RateLimiter:
    store: RateStore = (RedisRateStore(platform.redis, prefix=platform.settings.redis_prefix)
                        if platform.redis else MemoryRateStore())
    return RateLimiter(platform.engine, store, limits)


async def test_every_route_is_limited_per_key_and_tier(platform: Platform) -> None:
    service = make_service(platform)
    limiter = limiter_for(platform, {"free": 3, "pro": 5})
    free = await make_key(platform, "read", user="f")
    pro = await make_key(platform, "read", user="p", tier="pro")
    async with app_for(platform, service, rate_limiter=limiter) as client:
        for i in range(3):
            ok = await client.get("/v1/events", headers={"X-API-Key": free})
            assert ok.status_code == 200
            assert ok.headers["x-ratelimit-limit"] == "3"
            assert ok.headers["x-ratelimit-remaining"] == str(2 - i)
            assert int(ok.headers["x-ratelimit-reset"]) >= 1
        # The quota is per key, whichever route: the query route is refused now too.
        refused = await client.post("/v1/query/advanced", json={},
                                    headers={"Authorization": f"Bearer {free}"})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert refused.json()["error"] == {
            "code": "rate_limited", "field": None, "temporary": True,
            "message": refused.json()["error"]["message"]}
        assert "'free' tier" in refused.json()["error"]["message"]
        # Compat routes too, whichever way the key is given.
        assert (await client.get(f"/{free}/v2/chains")).status_code == 429
        # Another tier, another budget.
        for _ in range(5):
            assert (await client.get("/v1/events", headers={"X-API-Key": pro})).status_code == 200
        assert (await client.get("/v1/events", headers={"X-API-Key": pro})).status_code == 429
        # Operational routes are never limited.
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            response = await client.get(path)
            assert response.status_code == 200 and "x-ratelimit-limit" not in response.headers


async def test_requests_without_a_valid_key_are_limited_per_address(platform: Platform) -> None:
    limiter = limiter_for(platform, {"free": 2})
    async with app_for(platform, make_service(platform), rate_limiter=limiter) as client:
        statuses = [(await client.get("/v1/events", headers={"X-API-Key": "dw_guess_guess"})
                     ).status_code for _ in range(3)]
        assert statuses == [401, 401, 429]  # key guessing runs out of budget


async def test_limits_are_shared_between_api_processes(platform: Platform) -> None:
    if platform.redis is None:
        pytest.skip("the embedded deployment is one process: its limits are in-process")
    key = await make_key(platform, "read")
    one = limiter_for(platform, {"free": 4})
    two = limiter_for(platform, {"free": 4})  # a second API process: its own limiter object
    async with app_for(platform, make_service(platform), rate_limiter=one) as a, \
            app_for(platform, make_service(platform), rate_limiter=two) as b:
        statuses = [(await client.get("/v1/events", headers={"X-API-Key": key})).status_code
                    for client in (a, b, a, b, a)]
    assert statuses == [200, 200, 200, 200, 429]


async def test_an_unreachable_limiter_lets_requests_through(tmp_path: object) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", replay_enabled=False,
                        demo_key=False)
    async with open_platform(settings) as p:
        broken = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        limiter = RateLimiter(p.engine, RedisRateStore(broken, prefix="x:"), {"free": 1})
        key = await make_key(p, "read")
        async with app_for(p, make_service(p), rate_limiter=limiter) as client:
            for _ in range(2):
                response = await client.get("/v1/events", headers={"X-API-Key": key})
                assert response.status_code == 200 and "x-ratelimit-limit" not in response.headers
        await broken.aclose()
