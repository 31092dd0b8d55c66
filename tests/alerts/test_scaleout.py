"""Scale-out: two alert workers share the event stream through a Redis consumer group against
real PostgreSQL. Every transition is recorded, queued and streamed exactly once, also when a
worker dies mid-batch and the other claims its pending entries."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from defiwatch.alerts import AlertsApiConfig
from defiwatch.api import ApiContext, create_app
from defiwatch.app import open_platform
from defiwatch.config import Settings
from defiwatch.store.schema import alert_history, notification_logs

from .conftest import HOUR, T0, Alerting, Clock, alerts_stream_for, point
from .test_engine import alert_events, create_rule, rows

PROTOCOLS = [f"proto-{i:03d}" for i in range(120)]
STEPS = (1.5e9, 0.9e9, 0.8e9)  # each protocol's TVL over three hours (times 1 + i/1000)


class Crash(Exception):
    """Stands for the worker process dying at this point."""


@pytest.fixture
async def prod(postgres_url: str, redis_url: str, redis_prefix: str,
               tmp_path: Path) -> AsyncIterator[Alerting]:
    settings = Settings(database_url=postgres_url, redis_url=redis_url, redis_prefix=redis_prefix,
                        state_dir=tmp_path, replay_enabled=False, demo_key=False)
    async with open_platform(settings) as p:
        yield Alerting(p, alerts_stream_for(p), Clock())


@pytest.fixture
async def api(prod: Alerting) -> AsyncIterator[httpx.AsyncClient]:
    p = prod.platform
    ctx = ApiContext(p.engine, p.stream, p.cache, p.ingest, alerts=AlertsApiConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)),
                                 base_url="http://t") as c:
        yield c


async def setup_rules(prod: Alerting, api: httpx.AsyncClient) -> None:
    from defiwatch.store.keys import create_key

    async with prod.platform.engine.begin() as conn:
        key, _ = await create_key(conn, user="ops", tier="enterprise", scopes=["alerts"],
                                  tiers=["free", "pro", "enterprise"])
    auth = {"Authorization": f"Bearer {key}"}
    # One wildcard rule (an instance per protocol) and one rule on a single protocol.
    await create_rule(api, auth, name="any below 1B", throttle_minutes=0, condition={
        "metric": "tvl", "subject": "*", "chain": "arbitrum", "op": "lt", "threshold": 1e9})
    await create_rule(api, auth, name="proto-007 below 1B", condition={
        "metric": "tvl", "subject": "proto-007", "chain": "arbitrum", "op": "lt",
        "threshold": 1e9})


async def feed(prod: Alerting) -> None:
    """Each protocol: above the line, then below it (one fire), then lower still (no fire)."""
    for step, value in enumerate(STEPS):
        await prod.ingest(*(point(p, T0 + step * HOUR, value * (1 + i / 1000), chain="arbitrum")
                            for i, p in enumerate(PROTOCOLS)))


async def assert_exactly_once(prod: Alerting) -> None:
    history = await rows(prod, alert_history)
    per_instance = Counter((a["rule_id"], a["instance"]) for a in history)
    assert len(per_instance) == len(PROTOCOLS) + 1  # every protocol, plus the single rule
    assert set(per_instance.values()) == {1}
    outbox = await rows(prod, notification_logs)
    assert Counter(o["alert_id"] for o in outbox) == Counter({a["id"]: 1 for a in history})
    events = await alert_events(prod)
    assert sorted(e.detail["alert_id"] for e in events if e.detail) == sorted(
        a["id"] for a in history)


async def test_two_workers_share_the_stream_and_fire_each_transition_once(
    prod: Alerting, api: httpx.AsyncClient
) -> None:
    await setup_rules(prod, api)
    one, two = prod.engine("w1", batch=25), prod.engine("w2", batch=25)
    await asyncio.gather(one.start(), two.start())
    loading = asyncio.create_task(feed(prod))
    done = [0, 0]

    async def work(i: int, engine: Any) -> None:
        while not loading.done():
            done[i] += await engine.drain()
            await asyncio.sleep(0)
        done[i] += await engine.drain()

    await asyncio.gather(work(0, one), work(1, two), loading)
    assert all(done), done  # both workers took a share
    await assert_exactly_once(prod)


async def test_a_worker_dying_mid_batch_is_taken_over(
    prod: Alerting, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await setup_rules(prod, api)
    dying = prod.engine("w1", batch=50)
    survivor = prod.engine("w2", batch=50, claim_idle_s=0.2)
    await asyncio.gather(dying.start(), survivor.start())
    await feed(prod)
    # w1 takes a batch, commits its transitions, and dies before publishing and acknowledging.
    real_publish = prod.alerts.publish

    async def die(*_args: Any, **_kwargs: Any) -> Any:
        raise Crash

    monkeypatch.setattr(prod.alerts, "publish", die)
    batch = await dying._events.read(50, 0)
    with pytest.raises(Crash):
        await dying.process(batch)
    # ... and another batch it took but never started on.
    untouched = await dying._events.read(50, 0)
    assert batch and untouched
    monkeypatch.setattr(prod.alerts, "publish", real_publish)
    # w2 processes the rest, then claims w1's pending entries once they are idle long enough.
    await survivor.drain()
    await asyncio.sleep(0.3)
    claimed = 0
    while (n := await survivor.recover_stale()) > 0:
        claimed += n
    assert claimed == len(batch) + len(untouched)
    assert await survivor.republish(older_than_s=0) >= 0
    await assert_exactly_once(prod)
    # Nothing is pending any more.
    assert await survivor.recover_stale() == 0


async def test_a_restarted_worker_first_takes_over_what_its_predecessor_left(
    prod: Alerting, api: httpx.AsyncClient
) -> None:
    """A worker restarted under a new name (a new pid) processes the entries its predecessor
    took but did not acknowledge before any newer event: applying the newer ones first would
    make it skip those as stale when it claimed them, and lose their transitions."""
    await setup_rules(prod, api)
    step = len(PROTOCOLS)
    dying = prod.engine("w1", batch=step)
    await dying.start()
    await feed(prod)
    await dying.process(await dying._events.read(step, 0))  # step 1: above the line
    assert await dying._events.read(step, 0)  # step 2 (the fires): taken, then it died
    successor = prod.engine("w2", batch=step)  # w1's claim-idle time has not passed
    await successor.drain()
    await assert_exactly_once(prod)
    # Each fired at the first point below the line (as `feed` made them), none a step late.
    first_below = {p: next(v * (1 + i / 1000) for v in STEPS if v * (1 + i / 1000) < 1e9)
                   for i, p in enumerate(PROTOCOLS)}
    for alert in await rows(prod, alert_history):
        assert alert["value"] == first_below[alert["subject"]], alert
