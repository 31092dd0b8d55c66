"""The API's own /metrics, /readyz: request metrics by route template, build info, no
`_created` series, and readiness that includes the roles of the process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY

from defiwatch.api import ApiContext, create_app
from defiwatch.api.ratelimit import MemoryRateStore, RateLimiter
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.ops.health import Health
from defiwatch.store.keys import create_key


@pytest.fixture
async def platform(tmp_path: object) -> AsyncIterator[Platform]:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/dw.db", replay_enabled=False,
                        demo_key=False)
    async with open_platform(settings) as p:
        yield p


def client_for(platform: Platform, health: Health | None = None,
               limiter: RateLimiter | None = None) -> httpx.AsyncClient:
    app = create_app(ApiContext(platform.engine, platform.stream, platform.cache, platform.ingest,
                                health=health, rate_limiter=limiter))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def requests(route: str, method: str, status: int) -> float:
    return REGISTRY.get_sample_value(
        "defiwatch_api_requests_total",
        {"route": route, "method": method, "status": str(status)}) or 0.0


def latency_count(route: str, method: str) -> float:
    return REGISTRY.get_sample_value("defiwatch_api_request_seconds_count",
                                     {"route": route, "method": method}) or 0.0


async def test_requests_are_counted_by_route_template(platform: Platform) -> None:
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user="alice", tier="pro", scopes=["alerts"],
                                  tiers=list(platform.settings.tiers))
    template = "/v1/alerts/rules/{rule_id}"
    before = requests(template, "GET", 404), latency_count(template, "GET")
    unauthorized = requests(template, "GET", 401)
    unmatched = requests("<unmatched>", "GET", 404)
    async with client_for(platform) as client:
        for rule_id in (424242, 434343):
            response = await client.get(f"/v1/alerts/rules/{rule_id}",
                                        headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 404
        assert (await client.get("/v1/alerts/rules/1")).status_code == 401
        assert (await client.get("/no/such/route")).status_code == 404
        text = (await client.get("/metrics")).text
    assert (requests(template, "GET", 404), latency_count(template, "GET")) == (
        before[0] + 2, before[1] + 3)
    assert requests(template, "GET", 401) == unauthorized + 1
    assert requests("<unmatched>", "GET", 404) == unmatched + 1
    assert "424242" not in text and "/no/such/route" not in text  # no raw paths as labels


async def test_answers_of_middleware_before_routing_carry_the_route_too(
        platform: Platform) -> None:
    limiter = RateLimiter(platform.engine, MemoryRateStore(),
                          dict.fromkeys(platform.settings.tiers, 1))
    template = "/v1/latest"
    before = requests(template, "GET", 429)
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user="bob", tier="free", scopes=["read"],
                                  tiers=list(platform.settings.tiers))
    async with client_for(platform, limiter=limiter) as client:
        auth = {"Authorization": f"Bearer {key}"}
        statuses = [(await client.get("/v1/latest", headers=auth)).status_code for _ in range(2)]
    assert statuses[1] == 429
    assert requests(template, "GET", 429) == before + 1


async def test_metrics_carry_build_info_and_no_created_series(platform: Platform) -> None:
    async with client_for(platform) as client:
        await client.get("/healthz")
        response = await client.get("/metrics")
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert any(line.startswith('defiwatch_build_info{python="') and line.endswith(" 1.0")
               for line in lines)
    assert any(line.startswith("defiwatch_api_request_seconds_bucket{") for line in lines)
    assert not [line for line in lines if "_created" in line]


async def test_readyz_includes_the_roles_of_the_process(platform: Platform) -> None:
    health = Health()
    health.expect("processor")
    async with client_for(platform, health) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["roles"] == "ok"
        health.failed("processor", "boom")
        not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["roles"] == "error: not ready: processor"
