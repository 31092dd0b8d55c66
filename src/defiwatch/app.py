"""Composition root: picks backends from settings and wires the roles. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.alerts.config import AlertsApiConfig, EngineConfig
from defiwatch.alerts.engine import AlertEngine
from defiwatch.alerts.events import alert_stream_key
from defiwatch.api import ApiContext, create_app
from defiwatch.api.ratelimit import MemoryRateStore, RateLimiter, RateStore, RedisRateStore
from defiwatch.cache import HotCache, MemoryHotCache, RedisHotCache
from defiwatch.config import Settings
from defiwatch.cooldown import REQUEST_PATH_COOLDOWN_S, Cooldown
from defiwatch.domain import ChangeDetector, Thresholds
from defiwatch.gateway import Gateway, SocketIOServer
from defiwatch.gateway.gcpolicy import FreezeAfterFullCollections
from defiwatch.ingest.defillama import DefiLlamaPoller
from defiwatch.ingest.replay import backfill_end, replay
from defiwatch.ingest.service import IngestService
from defiwatch.notify.factory import breaker as notify_breaker
from defiwatch.notify.factory import build_senders, retry_policy
from defiwatch.notify.worker import Notifier, NotifierConfig
from defiwatch.ops.health import Health
from defiwatch.ops.listener import listener_port, serve_ops
from defiwatch.ops.supervisor import supervise
from defiwatch.processor import CacheFiller, Processor, Wakeup, listen_postgres
from defiwatch.query import (
    CoolingResultCache,
    Limits,
    MemoryResultCache,
    QueryService,
    ReadModel,
    RedisResultCache,
)
from defiwatch.query.cache import ResultCache
from defiwatch.store import create_engine, upgrade
from defiwatch.store.db import raw_dsn
from defiwatch.store.delivery import NOTIFY_CHANNEL
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream
from defiwatch.stream.group import MemoryStreamGroup, RedisStreamGroup, StreamGroup

__all__ = ["Platform", "open_platform", "run_roles"]


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
    # Redis for the API's request path (rate limiter, result cache, latest values, events):
    # short timeouts and no retries, so a hung Redis costs a request at most
    # redis_request_timeout_s. `redis` keeps the long timeout blocking stream reads need.
    request_redis: aioredis.Redis | None = None

    def processor(self) -> Processor:
        s = self.settings
        detector = ChangeDetector(Thresholds(
            tvl_pct=s.tvl_threshold_pct, tvl_abs=s.tvl_threshold_abs,
            price_pct=s.price_threshold_pct, price_abs=s.price_threshold_abs,
        ))
        filler = CacheFiller(self.engine, self.cache, check_s=s.processor_cache_check_s)
        return Processor(self.engine, self.stream, self.cache, detector=detector,
                         wakeup=self.wakeup, batch=s.processor_batch, poll_s=s.processor_poll_s,
                         filler=filler)


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
                        if settings.is_postgres else None,
                        request_redis=request_redis(settings))
    try:
        yield platform
    finally:
        for task in platform.tasks:
            task.cancel()
        await asyncio.gather(*platform.tasks, return_exceptions=True)
        await stream.close()
        await alerts.close()
        await cache.close()
        for redis_client in (client, platform.request_redis):
            if redis_client is not None:
                await redis_client.aclose()
        if platform.reads is not None:
            await platform.reads.dispose()
        await engine.dispose()


def request_redis(settings: Settings) -> aioredis.Redis | None:
    """The API's request-path Redis client (see `Platform.request_redis`), None when embedded.

    Every wait is bounded by `redis_request_timeout_s`: connecting, each reply, and waiting for
    a free pooled connection; redis-py's default retries (up to 10, with backoff) are off, since
    retrying a stalled server only multiplies the stall."""
    if not settings.redis_dsn:
        return None
    timeout = settings.redis_request_timeout_s
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_dsn, max_connections=64, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_pool(pool)


def api_backends(platform: Platform) -> tuple[EventStream, HotCache]:
    """The stream and cache the API reads, on the request-path client when on Redis."""
    client, s = platform.request_redis, platform.settings
    if client is None:
        return platform.stream, platform.cache
    return (RedisEventStream(client, prefix=s.redis_prefix, retention=s.stream_retention),
            RedisHotCache(client, prefix=s.redis_prefix))


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `run_roles` owns shutdown for every role."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def query_service(platform: Platform) -> QueryService:
    s = platform.settings
    cache: ResultCache = (
        CoolingResultCache(RedisResultCache(platform.request_redis, prefix=s.redis_prefix),
                           Cooldown(REQUEST_PATH_COOLDOWN_S))
        if platform.request_redis is not None else MemoryResultCache(s.query_cache_max_entries)
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
        RedisRateStore(platform.request_redis, prefix=s.redis_prefix)
        if platform.request_redis is not None else MemoryRateStore()
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


def api_server(platform: Platform, health: Health | None = None) -> _Server:
    s = platform.settings
    query = query_service(platform)
    stream, cache = api_backends(platform)
    app = create_app(ApiContext(
        platform.engine, stream, cache, platform.ingest,
        alerts=AlertsApiConfig.from_settings(s), query=query, settings=s, reads=platform.reads,
        rate_limiter=rate_limiter(platform), compat_public=s.query_compat_public,
        health=health,
    ))
    # Warm the protocols read model so the first query does not pay for building it.
    platform.tasks.append(asyncio.create_task(query.read_model.refresh(), name="query-warmup"))
    config = uvicorn.Config(app, host=s.api_host, port=s.api_port, log_config=None,
                            access_log=False, lifespan="off")
    return _Server(config)


async def run_api(platform: Platform, stop: asyncio.Event, health: Health) -> None:
    """The API until `stop` is set; raises what uvicorn raised."""
    server = api_server(platform, health)
    serving = asyncio.create_task(server.serve(), name="api-serve")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await serving


async def run_gateway(platform: Platform, stop: asyncio.Event) -> None:
    """The WebSocket gateway and the Socket.IO server sharing its hub (one fan-out for both);
    one failing stops the other, so a restart starts both afresh."""
    s = platform.settings
    gateway = Gateway(settings=s, engine=platform.engine, stream=platform.stream,
                      cache=platform.cache, alerts=platform.alerts,
                      key_cache_ttl_s=s.gateway_key_cache_ttl_s,
                      revalidate_interval_s=s.gateway_revalidate_s)
    socketio_server = SocketIOServer(settings=s, engine=platform.engine, hub=gateway.hub,
                                     stream=platform.stream, cache=platform.cache)
    async with asyncio.TaskGroup() as group:
        group.create_task(gateway.serve(stop), name="gateway")
        group.create_task(socketio_server.serve(stop), name="socketio")


def poller(platform: Platform) -> DefiLlamaPoller:
    s = platform.settings
    return DefiLlamaPoller(platform.ingest, api_url=s.defillama_api_url,
                           coins_url=s.defillama_coins_url, interval_s=s.poller_interval_s,
                           coins=s.poller_coins)


@dataclass(frozen=True)
class _Unit:
    """One supervised task of a role: `run` starts it afresh (again after each failure)."""

    role: str
    run: Callable[[], Awaitable[object]]
    name: str | None = None  # the task's name when not the role's own (a role's helper)


async def run_roles(
    platform: Platform,
    roles: Sequence[str],
    stop: asyncio.Event,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run the given roles until `stop` is set (or every role is finite and has ended).

    Each role runs supervised (ops/supervisor.py): one that raises is logged and restarted
    with backoff while the others go on. The roles' loops beat into one `Health`, which the
    ops listener (ops/listener.py) and, with `api` among the roles, the API's `/readyz` serve.
    """
    s = platform.settings
    health = Health(s.ops_stale_s)
    for role in roles:
        if role != "api":  # uvicorn has no loop to beat: /readyz checks its dependencies
            health.expect(role)
    gc_policy = FreezeAfterFullCollections() if "gateway" in roles and s.gateway_gc_freeze else None
    if gc_policy is not None:
        gc_policy.install()  # process-wide: the collector is
    units = _units(platform, roles, stop, health, on_progress)
    try:
        async with serve_ops(s.ops_host, listener_port(s, roles), health):
            tasks = [asyncio.create_task(supervise(u.role, u.run, stop, health=health, name=u.name),
                                         name=u.name or u.role) for u in units]
            platform.tasks.extend(tasks)
            await asyncio.gather(*tasks)
    finally:
        if gc_policy is not None:
            gc_policy.uninstall()


def _units(platform: Platform, roles: Sequence[str], stop: asyncio.Event, health: Health,
           on_progress: Callable[[int, int], None] | None) -> list[_Unit]:
    """The supervised tasks of `roles`, each a factory so a restart builds its role afresh."""
    s = platform.settings
    units: list[_Unit] = []
    if "processor" in roles:
        units.append(_Unit("processor", lambda: platform.processor().run(stop)))
        if s.is_postgres:
            units.append(_Unit("processor", lambda: listen_postgres(
                raw_dsn(s.database_url), platform.wakeup, stop), name="listen"))
    if "poller" in roles:
        units.append(_Unit("poller", lambda: poller(platform).run(stop)))
    if "gateway" in roles:
        units.append(_Unit("gateway", lambda: run_gateway(platform, stop)))
    if "alerts" in roles:
        units.append(_Unit("alerts", lambda: alert_engine(platform).run(stop)))
    if "notifier" in roles:
        units.append(_Unit("notifier", lambda: run_notifier(platform, stop)))
    if "api" in roles:
        units.append(_Unit("api", lambda: run_api(platform, stop, health)))
    if "replay" in roles:
        start_ts, end_ts = s.replay_window
        backfill = backfill_end(start_ts, end_ts, setting=s.replay_backfill_ts)
        units.append(_Unit("replay", lambda: (
            replay(platform.ingest, speed=s.replay_speed, loop=s.replay_loop, stop=stop,
                   start_ts=start_ts, end_ts=end_ts, backfill_until=backfill,
                   on_progress=on_progress)
        )))
    return units
