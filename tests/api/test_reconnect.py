"""Per-request reads go through a pool without pre-ping (store/db.py read_retrying): a
connection PostgreSQL dropped since it was pooled costs a retry, never a failed request."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from defiwatch.alerts.config import AlertsApiConfig
from defiwatch.api import ApiContext, create_app
from defiwatch.app import Platform, query_service, rate_limiter
from defiwatch.config import Settings
from defiwatch.store.db import raw_dsn
from defiwatch.store.keys import create_key

QUERY = {"dataset": "protocols", "select": ["slug", "tvl"], "limit": 5}


@pytest.mark.parametrize("settings", ["production"], indirect=True)
async def test_requests_survive_connections_the_database_dropped(
        platform: Platform, settings: Settings) -> None:
    assert platform.reads is not None  # PostgreSQL: the lean pool is in use
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user="bob", tier="pro", scopes=["read"],
                                  tiers=list(settings.tiers))
    ctx = ApiContext(platform.engine, platform.stream, platform.cache, platform.ingest,
                     alerts=AlertsApiConfig.from_settings(settings), settings=settings,
                     query=query_service(platform), rate_limiter=rate_limiter(platform),
                     reads=platform.reads)
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)),
                                 base_url="http://defiwatch.test") as client:
        first = await client.post("/v1/query/advanced", headers=auth, json=QUERY)
        assert first.status_code == 200, first.text
        async with platform.reads.connect() as conn:  # the pool holds connections now
            pids = {(await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()}
        admin = await asyncpg.connect(raw_dsn(settings.database_url))
        try:  # a database restart, as far as the pooled connections can tell
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        assert killed >= len(pids)
        again = await client.post("/v1/query/advanced", headers=auth, json=QUERY)
        assert again.status_code == 200, again.text
        assert again.json()["data"] == first.json()["data"]
