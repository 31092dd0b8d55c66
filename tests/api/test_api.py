"""The HTTP API through its real ASGI app on both deployments: auth, scopes, errors, data."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from defiwatch.api import ApiContext, create_app
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.store.keys import create_key

T0 = 1_710_115_200


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with open_platform(settings) as p:
        yield p


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ApiContext(platform.engine, platform.stream, platform.cache, platform.ingest))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://defiwatch.test") as c:
        yield c


async def make_key(platform: Platform, *scopes: str, user: str = "alice") -> str:
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user=user, tier="free", scopes=list(scopes),
                                  tiers=list(platform.settings.tiers))
    return key


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "stream": "ok", "cache": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer dw_nope_nope"},
                                     {"X-API-Key": "garbage"}])
async def test_missing_or_bad_key_is_401_with_json_error(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.get("/v1/events", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_wrong_scope_is_403(client: httpx.AsyncClient, platform: Platform) -> None:
    key = await make_key(platform, "read")
    response = await client.post("/v1/ingest", json={"points": []},
                                 headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403
    assert "ingest" in response.json()["error"]["message"]


async def test_revoked_key_is_refused(client: httpx.AsyncClient, platform: Platform) -> None:
    from defiwatch.store.keys import revoke_key

    key = await make_key(platform, "read")
    assert (await client.get("/v1/events", headers={"X-API-Key": key})).status_code == 200
    async with platform.engine.begin() as conn:
        await revoke_key(conn, key.split("_")[1])
    assert (await client.get("/v1/events", headers={"X-API-Key": key})).status_code == 401


async def test_ingest_then_events_and_latest(client: httpx.AsyncClient, platform: Platform) -> None:
    key = await make_key(platform, "read", "ingest")
    auth = {"Authorization": f"Bearer {key}"}
    body = {"points": [
        {"metric": "tvl", "subject": "Aave", "chain": "Ethereum", "ts": T0, "value": 1e9},
        {"metric": "tvl", "subject": "aave", "chain": "ethereum", "ts": T0 + 3600, "value": 1.1e9},
        {"metric": "tvl", "subject": "aave", "chain": "ethereum", "ts": T0 + 3600, "value": 1.1e9},
        {"metric": "tvl", "subject": "aave", "ts": "yesterday", "value": 1},
        "not an object",
    ]}
    response = await client.post("/v1/ingest", json=body, headers=auth)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["accepted"] == 2 and result["duplicates"] == [2]
    assert [(r["index"], r["field"]) for r in result["rejected"]] == [
        (3, "points[3].ts"), (4, "points[4]")]
    await platform.processor().drain()
    page = (await client.get("/v1/events", params={"since": 0, "limit": 10}, headers=auth)).json()
    assert [(e["type"], e["subject"], e["offset"]) for e in page["data"]] == [
        ("tvl_change", "aave", 1)]
    assert page["meta"]["next_since"] == 1 and page["meta"]["gap"] is False
    empty = (await client.get("/v1/events", params={"since": 1}, headers=auth)).json()
    assert empty["data"] == [] and empty["meta"]["next_since"] == 1
    latest = (await client.get("/v1/latest", params={"subject": "AAVE", "chain": "Ethereum"},
                               headers=auth)).json()
    assert [(x["subject"], x["chain"], x["value"]) for x in latest["data"]] == [
        ("aave", "ethereum", 1.1e9)]
    assert abs(latest["data"][0]["change_1h"] - 10.0) < 1e-9


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("GET", "/v1/events", {"params": {"since": -1}}, 400, "since"),
        ("GET", "/v1/events", {"params": {"limit": 5000}}, 400, "limit"),
        ("GET", "/v1/latest", {"params": {"metric": "volume"}}, 400, "metric"),
        ("POST", "/v1/ingest", {"json": {"nope": []}}, 400, "points"),
        ("POST", "/v1/ingest", {"json": {"points": [], "source": "Bad Source!"}}, 400, "source"),
        ("POST", "/v1/ingest", {"content": b"{not json", "headers": {"content-type":
                                                                       "application/json"}},
         400, None),
        ("GET", "/v1/nothing-here", {}, 404, None),
    ],
)
async def test_bad_requests_get_structured_errors(
    client: httpx.AsyncClient, platform: Platform, method: str, path: str,
    kwargs: dict[str, object], status: int, field: str | None,
) -> None:
    key = await make_key(platform, "read", "ingest")
    headers = {"X-API-Key": key, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    response = await client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field", "temporary"}
    if field is not None:
        assert error["field"] == field


async def test_too_many_points_in_one_batch_is_refused(
    client: httpx.AsyncClient, platform: Platform
) -> None:
    key = await make_key(platform, "ingest")
    points = [{"metric": "tvl", "subject": "x", "ts": T0 + i, "value": 1.0} for i in range(10_001)]
    response = await client.post("/v1/ingest", json={"points": points}, headers={"X-API-Key": key})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "points"


async def test_readiness_reports_an_unreachable_redis(tmp_path: object) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
                        redis_url="redis://127.0.0.1:1/0", replay_enabled=False, demo_key=False)
    async with open_platform(settings) as p:
        app = create_app(ApiContext(p.engine, p.stream, p.cache, p.ingest))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            response = await c.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["stream"].startswith("error")


async def test_keys_with_underscores_in_the_secret_authenticate(platform: Platform) -> None:
    from defiwatch.store.keys import authenticate

    keys = [await make_key(platform, "read", user=f"u{i}") for i in range(40)]
    assert any(k.count("_") > 2 for k in keys)  # token_urlsafe uses "_" about once in 64 chars
    async with platform.engine.connect() as conn:
        for key in keys:
            assert await authenticate(conn, key) is not None


async def test_metrics_are_exported_without_redirect(client: httpx.AsyncClient,
                                                      platform: Platform) -> None:
    source = f"metrics-{uuid.uuid4().hex[:8]}"  # counters are process-wide: a label of our own
    await platform.ingest.ingest_points(
        [{"metric": "tvl", "subject": "aave", "ts": T0, "value": 1.0}], source=source)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert f'defiwatch_ingest_points_total{{outcome="accepted",source="{source}"}} 1.0' in (
        response.text)
