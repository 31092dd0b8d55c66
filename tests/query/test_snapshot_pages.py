"""Pages of a `protocols` listing are the pages of one snapshot (both deployments).

Between two pages the snapshot moves (tvl changes reorder protocols, a protocol appears): the
later pages still come from the result as it was when the first page ran, with no row twice
and none missing. A cursor whose snapshot is gone is a 410 on `cursor`; a cursor from another
query is a 400 on `cursor`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.domain import ProtocolMeta
from defiwatch.errors import BackendUnavailable
from defiwatch.query import Limits, MemoryResultCache, QueryService, RedisResultCache

from .conftest import HOUR, NOW_TS, app_for, make_key, make_service, seed


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with open_platform(settings) as p:
        await seed(p)
        yield p


@pytest.fixture
def service(platform: Platform) -> QueryService:
    return make_service(platform)


LATER = NOW_TS + HOUR

ROWS = {"select": ["slug", "tvl"], "sort": ["-tvl"]}
ROWS_BEFORE = [{"slug": "lido", "tvl": 5000.0}, {"slug": "uniswap", "tvl": 2000.0},
               {"slug": "aave", "tvl": 1000.0}, {"slug": "compound", "tvl": 400.0},
               {"slug": "pancakeswap", "tvl": 300.0}, {"slug": "mystery", "tvl": None}]
ROWS_AFTER = [{"slug": "aave", "tvl": 6000.0}, {"slug": "lido", "tvl": 5000.0},
              {"slug": "newfi", "tvl": 1500.0}, {"slug": "compound", "tvl": 400.0},
              {"slug": "pancakeswap", "tvl": 300.0}, {"slug": "uniswap", "tvl": 100.0},
              {"slug": "mystery", "tvl": None}]
GROUPS = {"group_by": ["category"], "aggregations": [{"op": "sum", "field": "tvl"}],
          "sort": ["-sum_tvl"]}
GROUPS_BEFORE = [{"category": "Liquid Staking", "sum_tvl": 5000.0},
                 {"category": "Dexes", "sum_tvl": 2300.0},
                 {"category": "Lending", "sum_tvl": 1400.0}, {"category": None, "sum_tvl": None}]
GROUPS_AFTER = [{"category": "Lending", "sum_tvl": 6400.0},
                {"category": "Liquid Staking", "sum_tvl": 5000.0},
                {"category": "Dexes", "sum_tvl": 1900.0}, {"category": None, "sum_tvl": None}]


async def reorder(platform: Platform) -> None:
    """Through the ingest path: aave jumps to the top, uniswap drops to the bottom, and a new
    protocol lands between pages already served and pages still to come."""
    await platform.ingest.ingest_protocols(
        [ProtocolMeta("newfi", "NewFi", "Dexes", ("ethereum",), None, None)], ts=LATER,
        source="t")
    result = await platform.ingest.ingest_points(
        [{"metric": "tvl", "subject": s, "chain": "-", "ts": LATER, "value": v}
         for s, v in (("aave", 6000.0), ("uniswap", 100.0), ("newfi", 1500.0))], source="t")
    assert not result.rejected, result.rejected


def rows(answer: Any) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = msgspec.json.decode(answer.page.data)
    return data


@pytest.mark.parametrize(("body", "limit", "before", "after"), [
    (ROWS, 1, ROWS_BEFORE, ROWS_AFTER),
    (ROWS, 2, ROWS_BEFORE, ROWS_AFTER),
    (GROUPS, 1, GROUPS_BEFORE, GROUPS_AFTER),
], ids=["rows by 1", "rows by 2", "groups by 1"])
async def test_later_pages_are_the_first_pages_snapshot(
    platform: Platform, service: QueryService, body: dict[str, Any], limit: int,
    before: list[dict[str, Any]], after: list[dict[str, Any]],
) -> None:
    request: dict[str, Any] = {**body, "limit": limit}
    first = await service.advanced(request)
    assert rows(first) == before[:limit] and first.page.next_cursor is not None

    await reorder(platform)
    # A listing started now sees the change (so the pages below could have seen it too).
    fresh = await service.advanced({**body, "limit": 100})
    assert rows(fresh) == after and fresh.page.as_of == LATER

    pages = [first]
    while pages[-1].page.next_cursor is not None:
        request["cursor"] = pages[-1].page.next_cursor
        pages.append(await service.advanced(request))
        assert len(pages) <= len(before), "more pages than rows"
    listed = [row for page in pages for row in rows(page)]
    assert listed == before  # the page-1-time result exactly: in order, no duplicate, no gap
    assert all(p.page.count == len(rows(p)) <= limit for p in pages)
    # as_of is the snapshot's: no row served had seen the points ingested at LATER.
    assert max(p.page.as_of or 0 for p in pages) == NOW_TS


async def test_limit_may_change_between_pages_of_a_snapshot(
    platform: Platform, service: QueryService
) -> None:
    first = await service.advanced({**ROWS, "limit": 2})
    await reorder(platform)
    second = await service.advanced({**ROWS, "limit": 3, "cursor": first.page.next_cursor})
    third = await service.advanced({**ROWS, "limit": 3, "cursor": second.page.next_cursor})
    assert rows(second) == ROWS_BEFORE[2:5] and rows(third) == ROWS_BEFORE[5:]
    assert third.page.next_cursor is None


async def test_a_snapshot_is_shared_by_api_processes(platform: Platform) -> None:
    """In production the snapshot lives in Redis: another process serves the later pages."""
    if platform.redis is None:
        pytest.skip("embedded: one process, its own in-process cache")
    first = await make_service(platform).advanced({**ROWS, "limit": 3})
    await reorder(platform)
    other = make_service(platform)
    rest = await other.advanced({**ROWS, "limit": 3, "cursor": first.page.next_cursor})
    assert rows(first) + rows(rest) == ROWS_BEFORE and rest.cache == "hit"


async def test_an_expired_snapshot_asks_to_start_again(platform: Platform) -> None:
    now = [0.0]
    service = QueryService(platform.engine, MemoryResultCache(clock=lambda: now[0]),
                           limits=Limits.from_settings(platform.settings), cache_ttl_s=300,
                           snapshot_ttl_s=60)
    key = await make_key(platform, "read")
    headers = {"Authorization": f"Bearer {key}"}
    body = {**ROWS, "limit": 2}
    async with app_for(platform, service) as client:
        async def page(cursor: str | None = None) -> Any:
            extra = {"cursor": cursor} if cursor else {}
            return await client.post("/v1/query/advanced", json={**body, **extra},
                                      headers=headers)

        first = (await page()).json()
        now[0] = 50.0
        # A first page served from the cache renews its snapshot (it was just proved current).
        again = (await page()).json()
        assert again["meta"]["cache"] == "hit"
        assert again["meta"]["next_cursor"] == first["meta"]["next_cursor"]
        now[0] = 100.0  # 100 s after the first page, 50 s after the renewal
        second = await page(first["meta"]["next_cursor"])
        assert second.status_code == 200 and second.json()["data"] == ROWS_BEFORE[2:4]

        now[0] = 200.0  # the snapshot's 60 s are over; the cached first page (300 s) is not
        expired = await page(second.json()["meta"]["next_cursor"])
        assert expired.status_code == 410
        error = expired.json()["error"]
        assert (error["code"], error["field"], error["temporary"]) == (
            "cursor_expired", "cursor", False)
        assert "first page" in error["message"]

        # Starting again must not hand out the dead cursor of the cached first page.
        restart = (await page()).json()
        assert restart["data"] == ROWS_BEFORE[:2]
        assert restart["meta"]["next_cursor"] != first["meta"]["next_cursor"]
        resumed = await page(restart["meta"]["next_cursor"])
        assert resumed.status_code == 200 and resumed.json()["data"] == ROWS_BEFORE[2:4]


async def test_a_snapshot_cursor_from_another_query_is_refused(
    platform: Platform, service: QueryService
) -> None:
    key = await make_key(platform, "read")
    first = await service.advanced({**ROWS, "limit": 2})
    cursor: str | None = first.page.next_cursor
    assert cursor is not None and first.page.snapshot is not None
    async with app_for(platform, service) as client:
        for other in ({"select": ["slug"], "sort": ["-tvl"]}, {**ROWS, "sort": ["tvl"]},
                      {**ROWS, "where": {"field": "tvl", "op": "gt", "value": 0}}):
            response = await client.post(
                "/v1/query/advanced", json={**other, "limit": 2, "cursor": cursor},
                headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 400, other
            error = response.json()["error"]
            assert (error["code"], error["field"]) == ("invalid_request", "cursor")
            assert "different query" in error["message"]


async def test_history_pages_keep_their_keyset_pin(
    platform: Platform, service: QueryService
) -> None:
    """History datasets are pinned by points.id, not snapshotted: their cursors stay keyset,
    and a point ingested after the first page does not show up on a later one."""
    body: dict[str, Any] = {"dataset": "tvl", "select": ["ts", "value"],
                            "where": {"and": [{"field": "subject", "op": "eq", "value": "aave"},
                                              {"field": "chain", "op": "eq", "value": "-"},
                                              {"field": "metric", "op": "eq", "value": "tvl"}]},
                            "sort": ["ts"], "limit": 5}
    first = await service.advanced(body)
    assert first.page.snapshot is None and first.page.next_cursor is not None
    await reorder(platform)
    listed = rows(first)
    cursor: str | None = first.page.next_cursor
    while cursor is not None:
        answer = await service.advanced({**body, "cursor": cursor})
        listed += rows(answer)
        cursor = answer.page.next_cursor
    assert [r["ts"] for r in listed] == sorted(r["ts"] for r in listed)
    assert len(listed) == 12 and max(r["ts"] for r in listed) == NOW_TS


async def test_past_the_snapshot_cap_paging_goes_on_by_keyset(platform: Platform) -> None:
    service = make_service(platform, snapshot_max_rows=3)
    first = await service.advanced({**ROWS, "limit": 2})
    second = await service.advanced({**ROWS, "limit": 2, "cursor": first.page.next_cursor})
    assert rows(second) == ROWS_BEFORE[2:3]  # the rest of the 3 stored rows
    assert second.page.snapshot is None and second.page.next_cursor is not None
    listed = rows(first) + rows(second)
    cursor: str | None = second.page.next_cursor
    while cursor is not None:
        answer = await service.advanced({**ROWS, "limit": 2, "cursor": cursor})
        listed += rows(answer)
        cursor = answer.page.next_cursor
    assert listed == ROWS_BEFORE


async def test_an_unreachable_cache_is_temporary_for_snapshot_pages(platform: Platform) -> None:
    broken_client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        broken = QueryService(platform.engine, RedisResultCache(broken_client, prefix="x:"))
        first = await make_service(platform).advanced({**ROWS, "limit": 2})
        with pytest.raises(BackendUnavailable) as info:
            await broken.advanced({**ROWS, "limit": 2, "cursor": first.page.next_cursor})
        assert info.value.temporary
        # With nowhere to keep a snapshot, a first page still answers, with a keyset cursor.
        alone = await broken.advanced({**ROWS, "limit": 2})
        assert rows(alone) == ROWS_BEFORE[:2] and alone.page.snapshot is None
        rest = await broken.advanced({**ROWS, "limit": 4, "cursor": alone.page.next_cursor})
        assert rows(rest) == ROWS_BEFORE[2:]
    finally:
        await broken_client.aclose()
