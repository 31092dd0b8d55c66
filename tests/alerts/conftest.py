"""Fixtures for the alert tests: a platform on both deployments, its alerts stream, consumer
groups, engines with a controllable clock, and the API with keys of several users."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from defiwatch.alerts import AlertEngine, AlertsApiConfig, EngineConfig, alert_stream_key
from defiwatch.api import ApiContext, create_app
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.store.keys import create_key
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream
from defiwatch.stream.group import MemoryStreamGroup, RedisStreamGroup, StreamGroup

T0 = 1_710_115_200  # 2024-03-11 00:00 UTC
HOUR = 3_600
DAY = 86_400


class Clock:
    """A wall clock the test moves by hand (the lifecycle's `now`)."""

    def __init__(self, now: float | None = None) -> None:
        # Starts at the real time: the API (snooze, ack) uses the real clock.
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Alerting:
    """A platform with what the lead wires for `defiwatch run alerts`."""

    platform: Platform
    alerts: EventStream
    clock: Clock
    _memory_group: MemoryStreamGroup | None = None

    def group(self, consumer: str = "w1") -> StreamGroup:
        p = self.platform
        if p.redis is not None:
            return RedisStreamGroup(p.redis, prefix=p.settings.redis_prefix,
                                    group=p.settings.alerts_consumer_group, consumer=consumer)
        if self._memory_group is None:
            self._memory_group = MemoryStreamGroup(p.stream, consumer=consumer)
            return self._memory_group
        return self._memory_group.with_consumer(consumer)

    def engine(self, consumer: str = "w1", **config: object) -> AlertEngine:
        cfg = EngineConfig(consumer=consumer, rule_refresh_s=0.0, **config)  # type: ignore[arg-type]
        return AlertEngine(self.platform.engine, self.group(consumer), self.alerts,
                           self.platform.cache, cfg, clock=self.clock)

    async def ingest(self, *points: dict[str, object]) -> None:
        result = await self.platform.ingest.ingest_points(list(points), source="test")
        assert not result.rejected, result.rejected
        await self.platform.processor().drain()


def point(subject: str, ts: int, value: float, metric: str = "tvl", chain: str = "-"
          ) -> dict[str, object]:
    return {"metric": metric, "subject": subject, "chain": chain, "ts": ts, "value": value}


def alerts_stream_for(p: Platform) -> EventStream:
    if p.redis is not None:
        return RedisEventStream(p.redis, prefix=p.settings.redis_prefix, retention=10_000,
                                name="alerts", dedup_key=alert_stream_key)
    return MemoryEventStream(retention=10_000, dedup_key=alert_stream_key)


@pytest.fixture
async def alerting(settings: Settings) -> AsyncIterator[Alerting]:
    async with open_platform(settings) as p:
        yield Alerting(p, alerts_stream_for(p), Clock())


@pytest.fixture
async def client(alerting: Alerting) -> AsyncIterator[httpx.AsyncClient]:
    p = alerting.platform
    ctx = ApiContext(p.engine, p.stream, p.cache, p.ingest,
                     alerts=AlertsApiConfig.from_settings(p.settings))
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://defiwatch.test") as c:
        yield c


KeyMaker = Callable[..., object]


@pytest.fixture
def make_key(alerting: Alerting) -> Callable[..., object]:
    async def make(user: str = "alice", tier: str = "pro", scopes: tuple[str, ...] = ("alerts",)
                   ) -> dict[str, str]:
        p = alerting.platform
        async with p.engine.begin() as conn:
            key, _ = await create_key(conn, user=user, tier=tier, scopes=list(scopes),
                                      tiers=list(p.settings.tiers))
        return {"Authorization": f"Bearer {key}"}

    return make
