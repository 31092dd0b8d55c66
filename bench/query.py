#!/usr/bin/env python
"""Query benchmark: POST /v1/query/advanced and the DefiLlama-compatible routes on PostgreSQL.

Data: the bundled real replay (`iter_records`: DefiLlama TVL, CoinGecko/Coinbase/CoinMarketCap
prices) plus, when present, the full real 2024-03 `/protocols` capture from ../shared/defi-data,
all through the ingest service (capture trigger on). Then the data is EXTENDED to at least
`--points` points: every real series is copied `k` times with its subject suffixed `~r{k}`
(protocol metadata copied likewise: same category and chains, name "… (replica k)"), values
and timestamps unchanged, points labelled `source = 'bench-replica'`. The replicas are
bulk-loaded with COPY with the change_log trigger disabled for the load (the read model is
rebuilt from the tables afterwards, as after any restore); the output says how many points are
real and how many replicas.

Server: one API process (uvicorn + uvloop) wired like `defiwatch run api` in production:
PostgreSQL, Redis result cache, Redis rate limits (a `bench` tier with an unlimited budget so the
limiter runs but never refuses). Pinned with `taskset -c 0`; this load process pins itself to
core 1. PostgreSQL and Redis are not pinned (2 cores: they share with both).

Measured, per query of a realistic mix (snapshot filters, group-bys, percentiles, time-bucketed
history, a page of raw history, compat routes):
- latency, one request at a time: `uncached` (header `Cache-Control: no-cache`: parse, probe,
  run the SQL, store) and `cached` (a hit: Redis GET + change_log probe), p50/p95/p99;
- throughput: `--clients` concurrent keep-alive connections cycling through the mix (cached)
  for `--duration` s: requests/s, status counts, latency percentiles under that load.

Prints one JSON document and writes bench/results/query-<date>.json (or `--out`). Creates and
drops its own database `dw_bench_query_*` and Redis prefix.

    .venv/bin/python bench/query.py                       # ~5.3 M points, a few minutes
    .venv/bin/python bench/query.py --points 1000000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CAPTURE = ROOT.parent / "shared" / "defi-data" / "defillama" / "protocols_snapshot_2024-03.json"
SERVER_CORE, LOAD_CORE = 0, 1
SNAPSHOT_TS = 1_710_126_000


def _day(text: str) -> int:
    return int(dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())


# The mix. Names say what they exercise; bodies are what a dashboard or analyst would send.
QUERIES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "snapshot_filter": ("POST", "/v1/query/advanced", {
        "dataset": "protocols",
        "where": {"and": [{"field": "category", "op": "in", "value": ["Dexes", "Lending"]},
                          {"field": "tvl", "op": "gte", "value": 1e6},
                          {"field": "chains", "op": "contains", "value": "ethereum"}]},
        "select": ["slug", "name", "category", "tvl", "change_24h", "change_7d"],
        "sort": ["-tvl"], "limit": 50}),
    "snapshot_original_shape": ("POST", "/v1/query/advanced", {
        "filters": {"chains": ["Ethereum"], "tvl_range": {"min": 1e5},
                    "change_24h": {"min": -50, "max": 50}},
        "aggregations": [{"field": "tvl", "operation": "sum", "group_by": "category"}],
        "sort": {"field": "tvl", "order": "desc"}, "limit": 20}),
    "snapshot_group_percentiles": ("POST", "/v1/query/advanced", {
        "dataset": "protocols", "group_by": ["category"],
        "aggregations": [{"op": "count"}, {"op": "sum", "field": "tvl"},
                         {"op": "percentile", "field": "tvl", "p": 0.5},
                         {"op": "percentile", "field": "tvl", "p": 0.9}],
        "having": {"field": "count", "op": "gte", "value": 10},
        "sort": ["-sum_tvl"], "limit": 50}),
    "history_weekly_chain_tvl": ("POST", "/v1/query/advanced", {
        "dataset": "tvl", "time": {"from": _day("2021-01-01"), "to": _day("2025-01-01")},
        "where": {"and": [{"field": "metric", "op": "eq", "value": "chain_tvl"},
                          {"field": "subject", "op": "in",
                           "value": ["ethereum", "bsc", "arbitrum", "polygon"]}]},
        "group_by": ["subject", {"field": "ts", "bucket": "1w"}],
        "aggregations": [{"op": "avg", "field": "value"}, {"op": "max", "field": "value"}],
        "sort": ["subject", "bucket"], "limit": 1000}),
    "history_daily_price_percentiles": ("POST", "/v1/query/advanced", {
        "dataset": "prices", "time": {"from": _day("2017-06-01"), "to": _day("2017-07-01")},
        "where": {"and": [{"field": "coin", "op": "eq", "value": "ethereum"},
                          {"field": "metric", "op": "eq", "value": "price"}]},
        "group_by": [{"field": "ts", "bucket": "1d"}],
        "aggregations": [{"op": "percentile", "field": "value", "p": 0.5},
                         {"op": "min", "field": "value"}, {"op": "max", "field": "value"}],
        "limit": 100}),
    "history_monthly_borrowed_by_protocol": ("POST", "/v1/query/advanced", {
        "dataset": "tvl", "time": {"from": _day("2022-01-01"), "to": _day("2023-01-01")},
        "where": {"and": [{"field": "metric", "op": "eq", "value": "tvl_borrowed"},
                          {"field": "subject", "op": "in",
                           "value": ["aave-v2", "compound", "venus", "benqi-lending"]}]},
        "group_by": ["subject", {"field": "ts", "bucket": "1mo"}],
        "aggregations": [{"op": "avg", "field": "value"}], "limit": 200}),
    "history_page": ("POST", "/v1/query/advanced", {
        "dataset": "prices", "where": {"field": "coin", "op": "eq", "value": "bitcoin"},
        "select": ["ts", "value"], "sort": ["-ts"], "limit": 100}),
    "compat_tvl": ("GET", "/tvl/lido", None),
    "compat_chains": ("GET", "/v2/chains", None),
    "compat_prices_current": ("GET", "/prices/current/coingecko:ethereum,coingecko:bitcoin", None),
    "compat_chain_history": ("GET", "/v2/historicalChainTvl/ethereum", None),
}


# ------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client: httpx costs more CPU per request than the server
# under test spends on a cache hit, and the load generator has one core.
# ------------------------------------------------------------------------------------------


class Http:
    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None,
                      extra: str = "") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {self.key}\r\n"
                f"{extra}")
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summary(ms: Sequence[float]) -> dict[str, Any]:
    return {"n": len(ms), "p50_ms": pct(ms, 0.50), "p95_ms": pct(ms, 0.95),
            "p99_ms": pct(ms, 0.99), "mean_ms": round(statistics.fmean(ms), 3)}


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


async def load(url: str, target: int) -> dict[str, Any]:
    from defiwatch.app import open_platform
    from defiwatch.config import Settings
    from defiwatch.ingest.defillama import parse_protocols
    from defiwatch.ingest.replay import PointRecord, ProtocolRecord, iter_records

    started = time.perf_counter()
    settings = Settings(database_url=url, replay_enabled=False, demo_key=False)
    async with open_platform(settings) as p:
        if CAPTURE.is_file():
            metas, raw = parse_protocols(json.loads(CAPTURE.read_text()), ts=SNAPSHOT_TS)
            await p.ingest.ingest_protocols(metas, ts=SNAPSHOT_TS, source="defillama")
            for i in range(0, len(raw), 10_000):
                await p.ingest.ingest_points(list(raw[i : i + 10_000]), source="defillama")
        batch: dict[str, list[dict[str, Any]]] = {}
        for record in iter_records():
            if isinstance(record, ProtocolRecord):
                await p.ingest.ingest_protocols([record.meta], ts=record.ts, source=record.source)
                continue
            assert isinstance(record, PointRecord)
            rows = batch.setdefault(record.source, [])
            rows.append(record.as_raw())
            if len(rows) >= 10_000:
                await p.ingest.ingest_points(rows, source=record.source)
                batch[record.source] = []
        for source, rows in batch.items():
            if rows:
                await p.ingest.ingest_points(rows, source=source)
    real_seconds = time.perf_counter() - started
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        real = await conn.fetchval("SELECT count(*) FROM points")
        copies = max(0, -(-(target - real) // real))  # ceil
        started = time.perf_counter()
        series = await conn.fetch("SELECT metric, subject, chain, ts, value FROM points")
        metas = await conn.fetch("SELECT * FROM protocols")
        await conn.execute("ALTER TABLE points DISABLE TRIGGER points_change_log")
        try:
            cols = list(metas[0].keys())  # asyncpg records iterate over values, not names
            for k in range(1, copies + 1):
                await conn.copy_records_to_table(
                    "points", columns=["metric", "subject", "chain", "ts", "value", "source"],
                    records=[(m, f"{s}~r{k}", c, t, v, "bench-replica") for m, s, c, t, v in series])
                await conn.copy_records_to_table(
                    "protocols", columns=cols,
                    records=[tuple(f"{r['slug']}~r{k}" if col == "slug" else
                                   f"{r['name']} (replica {k})" if col == "name" else r[col]
                                   for col in cols) for r in metas])
        finally:
            await conn.execute("ALTER TABLE points ENABLE TRIGGER points_change_log")
        await conn.execute("ANALYZE")
        total = await conn.fetchval("SELECT count(*) FROM points")
        protocols = await conn.fetchval("SELECT count(*) FROM protocols")
    finally:
        await conn.close()
    return {"points_total": total, "points_real": real, "points_replica": total - real,
            "replica_copies": copies, "protocols": protocols,
            "real_load_seconds": round(real_seconds, 1),
            "replica_load_seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------------
# The server (subcommand `serve`, run under taskset by the benchmark)
# ------------------------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from defiwatch.api import ApiContext, create_app
    from defiwatch.api.ratelimit import RateLimiter, RedisRateStore
    from defiwatch.app import open_platform
    from defiwatch.config import load_settings
    from defiwatch.query import Limits, QueryService, ReadModel, RedisResultCache

    s = load_settings()
    # The query cache and the limiter get a Redis pool sized for the load: redis-py's default
    # pool fails past 100 connections (MaxConnectionsError) instead of waiting.
    redis_client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
        s.redis_dsn or "", max_connections=64, timeout=10))
    async with open_platform(s, migrate=False) as p:
        assert p.redis is not None
        # As app.py wires it: per-request reads (key lookup, freshness probe, limiter) on the
        # pool without pre-ping; `--api-pool pre-ping` puts them on the main pool instead.
        engine = p.engine if args.api_pool == "pre-ping" or p.reads is None else p.reads
        query = QueryService(
            p.engine, RedisResultCache(redis_client, prefix=s.redis_prefix),
            read_model=ReadModel(p.engine),
            limits=Limits.from_settings(s),
            statement_timeout_ms=s.query_statement_timeout_ms, cache_ttl_s=s.query_cache_ttl_s,
            max_body_bytes=s.query_max_body_bytes, probe_engine=engine)
        limiter = RateLimiter(engine, RedisRateStore(redis_client, prefix=s.redis_prefix),
                              {name: t.api_requests_per_minute for name, t in s.tiers.items()})
        app = create_app(ApiContext(p.engine, p.stream, p.cache, p.ingest, query=query,
                                    rate_limiter=limiter, reads=engine))
        config = uvicorn.Config(app, host="127.0.0.1", port=args.port, loop="uvloop",
                                http="httptools", log_config=None, access_log=False,
                                lifespan="off")
        await uvicorn.Server(config).serve()


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------


async def wait_ready(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: b\r\n\r\n")
            if b"200" in await reader.readline():
                writer.close()
                return
            writer.close()
        await asyncio.sleep(0.2)
    raise RuntimeError("the API server did not come up")


async def latencies(http: Http, rounds: int, rounds_uncached: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (method, path, body) in QUERIES.items():
        raw = json.dumps(body).encode() if body is not None else None
        status, payload = await http.request(method, path, raw)  # warm: builds what it needs
        if status != 200:
            raise RuntimeError(f"{name}: {status} {payload[:300]!r}")
        result: dict[str, Any] = {"response_bytes": len(payload)}
        for label, n, extra in (("uncached", rounds_uncached, "Cache-Control: no-cache\r\n"),
                                ("cached", rounds, "")):
            ms = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _ = await http.request(method, path, raw, extra)
                ms.append((time.perf_counter() - t0) * 1000)
                assert status == 200, (name, status)
            result[label] = summary(ms)
        out[name] = result
    return out


async def throughput(port: int, key: str, clients: int, duration: float) -> dict[str, Any]:
    mix = [(m, p, json.dumps(b).encode() if b is not None else None)
           for m, p, b in QUERIES.values()]
    statuses: Counter[int] = Counter()
    ms: list[float] = []
    errors: Counter[str] = Counter()
    stop = time.monotonic() + duration

    async def client(i: int) -> None:
        http = Http("127.0.0.1", port, key)
        n = i
        try:
            while time.monotonic() < stop:
                method, path, raw = mix[n % len(mix)]
                n += 1
                t0 = time.perf_counter()
                try:
                    status, _ = await http.request(method, path, raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors[type(exc).__name__] += 1
                    await http.close()
                    http = Http("127.0.0.1", port, key)
                    continue
                ms.append((time.perf_counter() - t0) * 1000)
                statuses[status] += 1
        finally:
            await http.close()

    started = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    elapsed = time.perf_counter() - started
    total = sum(statuses.values())
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": total,
            "requests_per_s": round(total / elapsed, 1),
            "status": {str(k): v for k, v in sorted(statuses.items())},
            "transport_errors": dict(errors), "latency": summary(ms) if ms else None}


@contextlib.asynccontextmanager
async def database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"dw_bench_query_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        yield name
    finally:
        conn = await asyncpg.connect(admin_dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from defiwatch.app import open_platform
    from defiwatch.config import Settings
    from defiwatch.store.keys import create_key

    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {LOAD_CORE})
    prefix = f"dwbench:{secrets.token_hex(4)}:"
    async with database(args.admin_dsn) as name:
        url = f"postgresql+asyncpg://{args.pg_user}@{args.pg_host}:{args.pg_port}/{name}"
        data = await load(url, args.points)
        env = {**os.environ, "DEFIWATCH_DATABASE_URL": url, "DEFIWATCH_REDIS_URL": args.redis,
               "DEFIWATCH_REDIS_PREFIX": prefix, "DEFIWATCH_REPLAY_ENABLED": "false",
               "DEFIWATCH_DEMO_KEY": "false", "DEFIWATCH_LOG_LEVEL": "warning",
               "DEFIWATCH_TIERS__BENCH__API_REQUESTS_PER_MINUTE": "100000000",
               "DEFIWATCH_TIERS__BENCH__WS_CONNECTIONS": "1",
               "DEFIWATCH_TIERS__BENCH__WS_MESSAGES_PER_MINUTE": "1",
               "DEFIWATCH_TIERS__BENCH__ALERT_RULES": "1"}
        cmd = ["taskset", "-c", str(SERVER_CORE), sys.executable, __file__, "serve",
               "--port", str(args.port), "--api-pool", args.api_pool]
        server = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT)
        try:
            await wait_ready(args.port, 60)
            settings = Settings(database_url=url, redis_url=args.redis, redis_prefix=prefix,
                                replay_enabled=False, demo_key=False,
                                tiers={"bench": {"ws_connections": 1, "ws_messages_per_minute": 1,
                                                 "api_requests_per_minute": 100_000_000,
                                                 "alert_rules": 1}})
            async with open_platform(settings, migrate=False) as p, p.engine.begin() as conn:
                key, _ = await create_key(conn, user="bench", tier="bench", scopes=["read"],
                                          tiers=list(settings.tiers))
            http = Http("127.0.0.1", args.port, key)
            t0 = time.perf_counter()
            status, _ = await http.request("GET", "/tvl/lido", None)
            first_ms = round((time.perf_counter() - t0) * 1000, 1)
            assert status == 200, status
            lat = await latencies(http, args.rounds, args.rounds_uncached)
            await http.close()
            thr = await throughput(args.port, key, args.clients, args.duration)
        finally:
            server.terminate()
            try:
                await asyncio.wait_for(server.wait(), 15)
            except TimeoutError:
                server.kill()
                await server.wait()
            client = aioredis.from_url(args.redis)
            keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    return {
        "benchmark": "query", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "conditions": {"backend": "PostgreSQL + Redis", "server": f"1 uvicorn process, taskset "
                       f"-c {SERVER_CORE}", "load": f"this process, core {LOAD_CORE}",
                       "postgres_redis": "not pinned", "rate_limiter": "on (bench tier)",
                       "api_pool": args.api_pool},
        "data": data, "first_request_ms_incl_read_model_rebuild": first_ms,
        "latency_one_at_a_time": lat, "throughput_cached_mix": thr,
        "targets": {"uncached_p95_ms": 100, "cached_p95_ms": 5},
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    srv = sub.add_parser("serve", help="(internal) run the API server")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--api-pool", choices=["product", "pre-ping"], default="product")
    ap.add_argument("--points", type=int, default=5_000_000, help="points to reach (at least)")
    ap.add_argument("--rounds", type=int, default=300, help="cached requests per query")
    ap.add_argument("--rounds-uncached", type=int, default=60, help="uncached requests per query")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=20.0, help="throughput seconds")
    ap.add_argument("--port", type=int, default=18_770)
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-user", default="postgres")
    ap.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--api-pool", choices=["product", "pre-ping"], default="product",
                    help="product: per-request reads (key lookup, freshness probe) on the pool "
                    "without pre-ping, as app.py wires them; pre-ping: on the main pool")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "serve":
        asyncio.run(serve(args))
        return 0
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or RESULTS / f"query-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
