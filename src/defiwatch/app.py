"""Composition root: picks backends from settings and wires the roles. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.api import ApiContext, create_app
from defiwatch.cache import HotCache, MemoryHotCache, RedisHotCache
from defiwatch.config import Settings
from defiwatch.domain import ChangeDetector, Thresholds
from defiwatch.ingest.defillama import DefiLlamaPoller
from defiwatch.ingest.replay import replay
from defiwatch.ingest.service import IngestService
from defiwatch.processor import Processor, Wakeup, listen_postgres
from defiwatch.store import create_engine, upgrade
from defiwatch.store.db import raw_dsn
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream

__all__ = ["ROLES", "Platform", "open_platform", "run_roles"]

log = structlog.get_logger(__name__)

ROLES = ("api", "processor", "replay", "poller")


@dataclass
class Platform:
    """The wired parts one process needs, whatever roles it runs."""

    settings: Settings
    engine: AsyncEngine
    stream: EventStream
    cache: HotCache
    wakeup: Wakeup
    ingest: IngestService
    redis: aioredis.Redis | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def processor(self) -> Processor:
        s = self.settings
        detector = ChangeDetector(Thresholds(
            tvl_pct=s.tvl_threshold_pct, tvl_abs=s.tvl_threshold_abs,
            price_pct=s.price_threshold_pct, price_abs=s.price_threshold_abs,
        ))
        return Processor(self.engine, self.stream, self.cache, detector=detector,
                         wakeup=self.wakeup, batch=s.processor_batch, poll_s=s.processor_poll_s)


@contextlib.asynccontextmanager
async def open_platform(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Platform]:
    """Create the engine and backends from settings (migrating the database first)."""
    if migrate:
        await upgrade(settings.database_url)
    engine = create_engine(settings.database_url)
    client: aioredis.Redis | None = None
    stream: EventStream
    cache: HotCache
    if settings.redis_dsn:
        # socket_timeout above the stream's longest blocking read (XREAD BLOCK), see stream/redis.py
        client = aioredis.from_url(settings.redis_dsn, socket_timeout=35, health_check_interval=15)
        stream = RedisEventStream(client, prefix=settings.redis_prefix,
                                  retention=settings.stream_retention)
        cache = RedisHotCache(client, prefix=settings.redis_prefix)
    else:
        stream = MemoryEventStream(retention=settings.stream_retention)
        cache = MemoryHotCache()
    wakeup = Wakeup()
    platform = Platform(settings, engine, stream, cache, wakeup,
                        IngestService(engine, on_commit=wakeup.notify), client)
    try:
        yield platform
    finally:
        for task in platform.tasks:
            task.cancel()
        await asyncio.gather(*platform.tasks, return_exceptions=True)
        await stream.close()
        await cache.close()
        if client is not None:
            await client.aclose()
        await engine.dispose()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `run_roles` owns shutdown for every role."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(platform: Platform) -> _Server:
    s = platform.settings
    app = create_app(ApiContext(platform.engine, platform.stream, platform.cache, platform.ingest))
    config = uvicorn.Config(app, host=s.api_host, port=s.api_port, log_config=None,
                            access_log=False, lifespan="off")
    return _Server(config)


async def run_roles(
    platform: Platform,
    roles: Sequence[str],
    stop: asyncio.Event,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run the given roles until `stop` is set (or every finite role ends and none is lasting)."""
    s = platform.settings
    lasting: list[asyncio.Task[Any]] = []
    if "processor" in roles:
        lasting.append(asyncio.create_task(platform.processor().run(stop), name="processor"))
        if s.is_postgres:
            lasting.append(asyncio.create_task(
                listen_postgres(raw_dsn(s.database_url), platform.wakeup, stop), name="listen"))
    if "poller" in roles:
        poller = DefiLlamaPoller(platform.ingest, api_url=s.defillama_api_url,
                                 coins_url=s.defillama_coins_url, interval_s=s.poller_interval_s,
                                 coins=s.poller_coins)
        lasting.append(asyncio.create_task(poller.run(stop), name="poller"))
    server = api_server(platform) if "api" in roles else None
    if server is not None:
        lasting.append(asyncio.create_task(server.serve(), name="api"))
    if "replay" in roles:
        start_ts, end_ts = s.replay_window
        lasting.append(asyncio.create_task(
            replay(platform.ingest, speed=s.replay_speed, loop=s.replay_loop, stop=stop,
                   start_ts=start_ts, end_ts=end_ts, on_progress=on_progress),
            name="replay"))
    platform.tasks.extend(lasting)
    stopper = asyncio.create_task(stop.wait())
    pending = set(lasting)
    while pending and not stop.is_set():
        done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopper}:
            if not task.cancelled() and task.exception() is not None:
                log.error("role.failed", role=task.get_name(), error=repr(task.exception()))
                stop.set()
            else:
                log.info("role.finished", role=task.get_name())
        pending.discard(stopper)
    if server is not None:
        server.should_exit = True
    stopper.cancel()
    await asyncio.gather(*lasting, return_exceptions=True)
