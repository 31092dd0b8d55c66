"""The consumer group's committed position: an alert worker started after Redis lost the group
still evaluates what was published since (stream/group.py start_id, store.save_group_position,
the engine committing it with each batch). Redis-backed on both databases."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from defiwatch.config import Settings
from defiwatch.redis_keys import RedisKeys
from defiwatch.store import alerts as store
from defiwatch.store.schema import alert_history
from defiwatch.stream.group import GroupStart, start_id
from stream.redis_loss import lose_redis_data

from .conftest import HOUR, T0, Alerting, point
from .test_engine import create_rule, rows

BELOW = {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9}


@pytest.mark.parametrize(("start", "epoch", "committed", "expected"), [
    ("latest", "e1", None, ("$", GroupStart.CONFIGURED)),
    ("earliest", "e1", None, ("0", GroupStart.CONFIGURED)),
    ("latest", "e1", ("e1", 7), ("7-0", GroupStart.RESUMED)),
    ("earliest", "e1", ("e1", 7), ("7-0", GroupStart.RESUMED)),
    ("latest", "e2", ("e1", 7), ("0", GroupStart.NEW_LIFE)),
])
def test_start_id(start: Any, epoch: str, committed: tuple[str, int] | None,
                  expected: tuple[str, GroupStart]) -> None:
    assert start_id(start, epoch, committed) == expected


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: os.PathLike[str], redis_url: str,
             redis_prefix: str) -> Settings:
    """Redis for the stream, either database for the position (overrides tests/conftest.py)."""
    database = (f"sqlite+aiosqlite:///{tmp_path}/defiwatch.db" if request.param == "sqlite"
                else request.getfixturevalue("postgres_url"))
    return Settings(database_url=database, redis_url=redis_url, redis_prefix=redis_prefix,
                    state_dir=tmp_path, replay_enabled=False, demo_key=False,
                    processor_poll_s=0.2)


async def _position(alerting: Alerting) -> tuple[str, int] | None:
    async with alerting.platform.engine.connect() as conn:
        return await store.load_group_position(conn, alerting.platform.settings.alerts_consumer_group)


async def test_the_position_moves_forward_within_an_epoch_and_follows_a_new_one(
        alerting: Alerting) -> None:
    """Workers commit batches out of order: an older offset of the same life never moves the
    position back; any offset of another life replaces it."""
    async with alerting.platform.engine.begin() as conn:
        await store.save_group_position(conn, "g", "e1", 10, 1.0)
        await store.save_group_position(conn, "g", "e1", 4, 2.0)
        await store.save_group_position(conn, "other", "e1", 1, 2.0)
    async with alerting.platform.engine.connect() as conn:
        assert await store.load_group_position(conn, "g") == ("e1", 10)
        assert await store.load_group_position(conn, "nobody") is None
    async with alerting.platform.engine.begin() as conn:
        await store.save_group_position(conn, "g", "e2", 3, 3.0)
    async with alerting.platform.engine.connect() as conn:
        assert await store.load_group_position(conn, "g") == ("e2", 3)
        assert await store.load_group_position(conn, "other") == ("e1", 1)


async def test_a_worker_started_after_redis_lost_its_data_evaluates_what_was_published(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any, redis_url: str,
) -> None:
    await create_rule(client, await make_key(), condition=BELOW)
    first = alerting.engine("a")
    await first.start()
    # A series' first point is no event: the second is offset 1.
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 1.1e9))
    assert await first.drain() == 1
    committed = await _position(alerting)
    assert committed is not None and committed[1] == 1
    # Worker "a" is gone; Redis loses everything; the processor publishes into a new stream.
    await lose_redis_data(redis_url, alerting.platform.settings.redis_prefix)
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 0.9e9))
    second = alerting.engine("b")
    assert await second.drain() == 1
    assert [r["state"] for r in await rows(alerting, alert_history)] == ["firing"]
    position = await _position(alerting)
    assert position is not None and position[0] != committed[0] and position[1] == 1


async def test_a_worker_started_after_the_group_was_lost_resumes_after_the_committed_offset(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any,
) -> None:
    """Only the group is gone (same stream life): what was committed is not delivered again,
    what came after it is."""
    await create_rule(client, await make_key(), condition=BELOW)
    first = alerting.engine("a")
    await first.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 1.1e9))
    assert await first.drain() == 1
    p = alerting.platform
    assert p.redis is not None
    await p.redis.xgroup_destroy(RedisKeys(p.settings.redis_prefix).stream_events,
                                 p.settings.alerts_consumer_group)
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 0.9e9))
    second = alerting.engine("b")
    assert await second.drain() == 1
    assert [r["state"] for r in await rows(alerting, alert_history)] == ["firing"]


async def test_a_first_deployment_starts_at_the_newest_event(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any,
) -> None:
    """Nothing committed yet: history published before the first worker is not fired on."""
    await create_rule(client, await make_key(), condition=BELOW)
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))  # offset 1
    engine = alerting.engine()
    assert await engine.drain() == 0
    assert await rows(alerting, alert_history) == []
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 0.8e9))
    assert await engine.drain() == 1
    assert [r["state"] for r in await rows(alerting, alert_history)] == ["firing"]
