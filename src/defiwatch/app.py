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

from defiwatch.alerts.config import AlertsApiConfig, EngineConfig
from defiwatch.alerts.engine import AlertEngine
from defiwatch.alerts.events import alert_stream_key
from defiwatch.api import ApiContext, create_app
from defiwatch.api.ratelimit import MemoryRateStore, RateLimiter, RateStore, RedisRateStore
from defiwatch.cache import HotCache, MemoryHotCache, RedisHotCache
from defiwatch.config import Settings
from defiwatch.domain import ChangeDetector, Thresholds
from defiwatch.gateway import Gateway, SocketIOServer
from defiwatch.gateway.gcpolicy import FreezeAfterFullCollections
from defiwatch.ingest.defillama import DefiLlamaPoller
from defiwatch.ingest.replay import replay
from defiwatch.ingest.service import IngestService
from defiwatch.notify.factory import breaker as notify_breaker
from defiwatch.notify.factory import build_senders, retry_policy
from defiwatch.notify.worker import Notifier, NotifierConfig
from defiwatch.processor import Processor, Wakeup, listen_postgres
from defiwatch.query import Limits, MemoryResultCache, QueryService, ReadModel, RedisResultCache
from defiwatch.query.cache import ResultCache
from defiwatch.store import create_engine, upgrade
from defiwatch.store.db import raw_dsn
from defiwatch.store.delivery import NOTIFY_CHANNEL
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream
from defiwatch.stream.group import MemoryStreamGroup, RedisStreamGroup, StreamGroup

__all__ = ["Platform", "open_platform", "run_roles"]

log = structlog.get_logger(__name__)


@dataclass
class Platform:
    """The wired parts one process needs, whatever roles it runs."""

    settings: Settings
    engine: AsyncEngine
    stream: EventStream
    cache: HotCache
    alerts: EventStream  # fired and resolved alerts, for the private `alerts` channel
    wakeup: Wakeup
    ingest: IngestService
    redis: aioredis.Redis | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    notify_wakeup: Wakeup = field(default_factory=Wakeup)  # alert engine -> notifier, in-process
    # Per-request API reads (key lookup, freshness probe, limiter) on PostgreSQL: a pool
    # without pre-ping, whose reads retry once on a dropped connection (store/db.py).
    reads: AsyncEngine | None = None

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
    alerts: EventStream
    cache: HotCache
    if settings.redis_dsn:
        # socket_timeout above the stream's longest blocking read (XREAD BLOCK), see stream/redis.py.
        # A blocking pool: under load, callers wait for a connection instead of failing at 100.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_dsn, max_connections=64, timeout=10, socket_timeout=35,
            health_check_interval=15)
        client = aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
        stream = RedisEventStream(client, prefix=settings.redis_prefix,
                                  retention=settings.stream_retention)
        alerts = RedisEventStream(client, prefix=settings.redis_prefix, name="alerts",
                                  retention=settings.alerts_stream_retention,
                                  dedup_key=alert_stream_key)
        cache = RedisHotCache(client, prefix=settings.redis_prefix)
    else:
        stream = MemoryEventStream(retention=settings.stream_retention)
        alerts = MemoryEventStream(retention=settings.alerts_stream_retention,
                                   dedup_key=alert_stream_key)
        cache = MemoryHotCache()
    wakeup = Wakeup()
    platform = Platform(settings, engine, stream, cache, alerts, wakeup,
                        IngestService(engine, on_commit=wakeup.notify), client,
                        reads=create_engine(settings.database_url, pre_ping=False)
                        if settings.is_postgres else None)
    try:
        yield platform
    finally:
        for task in platform.tasks:
            task.cancel()
        await asyncio.gather(*platform.tasks, return_exceptions=True)
        await stream.close()
        await alerts.close()
        await cache.close()
        if client is not None:
            await client.aclose()
        if platform.reads is not None:
            await platform.reads.dispose()
        await engine.dispose()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `run_roles` owns shutdown for every role."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def query_service(platform: Platform) -> QueryService:
    s = platform.settings
    cache: ResultCache = (
        RedisResultCache(platform.redis, prefix=s.redis_prefix) if platform.redis is not None
        else MemoryResultCache(s.query_cache_max_entries)
    )
    return QueryService(platform.engine, cache, read_model=ReadModel(platform.engine),
                        limits=Limits.from_settings(s),
                        statement_timeout_ms=s.query_statement_timeout_ms,
                        cache_ttl_s=s.query_cache_ttl_s, max_body_bytes=s.query_max_body_bytes,
                        snapshot_ttl_s=s.query_snapshot_ttl_s,
                        probe_engine=platform.reads or platform.engine)


def rate_limiter(platform: Platform) -> RateLimiter | None:
    s = platform.settings
    if not s.query_rate_limit_enabled:
        return None
    store: RateStore = (
        RedisRateStore(platform.redis, prefix=s.redis_prefix) if platform.redis is not None
        else MemoryRateStore()
    )
    return RateLimiter(platform.reads or platform.engine, store,
                       {name: tier.api_requests_per_minute for name, tier in s.tiers.items()})


def alert_engine(platform: Platform) -> AlertEngine:
    """One alert worker: a member of the Redis consumer group (several share the stream), or
    the single in-process consumer of the embedded stream."""
    s = platform.settings
    config = EngineConfig.from_settings(s)
    group: StreamGroup = (
        RedisStreamGroup(platform.redis, prefix=s.redis_prefix, group=s.alerts_consumer_group,
                         consumer=config.consumer)
        if platform.redis is not None else MemoryStreamGroup(platform.stream)
    )
    return AlertEngine(platform.engine, group, platform.alerts, platform.cache, config,
                       on_queued=platform.notify_wakeup.notify)


async def run_notifier(platform: Platform, stop: asyncio.Event) -> None:
    """The notifier with its senders, woken by the alert engine in this process and by NOTIFY
    on PostgreSQL; it also polls."""
    s = platform.settings
    senders = build_senders(s)
    notifier = Notifier(platform.engine, senders, config=NotifierConfig.from_settings(s),
                        retry=retry_policy(s), breaker=notify_breaker(s), alerts=platform.alerts)
    wakeup = platform.notify_wakeup
    listener = (asyncio.create_task(listen_postgres(raw_dsn(s.database_url), wakeup, stop,
                                                    channel=NOTIFY_CHANNEL), name="notify-listen")
                if s.is_postgres else None)
    try:
        await notifier.run(stop, wakeup)
    finally:
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        await senders.aclose()


def api_server(platform: Platform) -> _Server:
    s = platform.settings
    query = query_service(platform)
    app = create_app(ApiContext(
        platform.engine, platform.stream, platform.cache, platform.ingest,
        alerts=AlertsApiConfig.from_settings(s), query=query, settings=s, reads=platform.reads,
        rate_limiter=rate_limiter(platform), compat_public=s.query_compat_public,
    ))
    # Warm the protocols read model so the first query does not pay for building it.
    platform.tasks.append(asyncio.create_task(query.read_model.refresh(), name="query-warmup"))
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
    gc_policy = FreezeAfterFullCollections() if "gateway" in roles and s.gateway_gc_freeze else None
    if gc_policy is not None:
        gc_policy.install()  # process-wide: the collector is
    if "gateway" in roles:
        gateway = Gateway(settings=s, engine=platform.engine, stream=platform.stream,
                          cache=platform.cache, alerts=platform.alerts,
                          key_cache_ttl_s=s.gateway_key_cache_ttl_s,
                          revalidate_interval_s=s.gateway_revalidate_s)
        lasting.append(asyncio.create_task(gateway.serve(stop), name="gateway"))
        # The Socket.IO compatibility server shares the gateway's hub: one fan-out for both.
        socketio_server = SocketIOServer(settings=s, engine=platform.engine, hub=gateway.hub,
                                         stream=platform.stream, cache=platform.cache)
        lasting.append(asyncio.create_task(socketio_server.serve(stop), name="socketio"))
    if "alerts" in roles:
        lasting.append(asyncio.create_task(alert_engine(platform).run(stop), name="alerts"))
    if "notifier" in roles:
        lasting.append(asyncio.create_task(run_notifier(platform, stop), name="notifier"))
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
    if gc_policy is not None:
        gc_policy.uninstall()
