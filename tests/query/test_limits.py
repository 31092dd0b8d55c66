"""The statement timeout on both databases: a long statement becomes a 400 `query_timeout`,
and the connection is fine for the next query."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert

from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.query import QueryTimeoutError
from defiwatch.query.service import REJECTED
from defiwatch.store.schema import points

from .conftest import T0, make_service, seed


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with open_platform(settings) as p:
        await seed(p)
        async with p.engine.begin() as conn:  # enough rows for a slow percentile
            await conn.execute(insert(points), [
                {"metric": "price", "subject": f"coingecko:c{i % 50}", "chain": "-",
                 "ts": T0 + i * 60, "value": float(i % 977), "source": "t"}
                for i in range(60_000)])
        yield p


async def test_a_slow_statement_is_a_400_and_the_service_recovers(platform: Platform) -> None:
    slow = make_service(platform, statement_timeout_ms=1)
    body = {"dataset": "prices", "where": {"field": "metric", "op": "eq", "value": "price"},
            "group_by": ["coin", {"bucket": "1h"}],
            "aggregations": [{"op": "percentile", "field": "value", "p": 0.5},
                             {"op": "count_distinct", "field": "value"}], "limit": 10_000}
    before = REJECTED.labels("timeout")._value.get()
    with pytest.raises(QueryTimeoutError) as info:
        await slow.advanced(body, use_cache=False)
    assert info.value.http_status == 400 and info.value.code == "query_timeout"
    assert REJECTED.labels("timeout")._value.get() == before + 1
    ok = await make_service(platform).advanced({"select": ["slug"], "limit": 1})
    assert ok.page.count == 1
