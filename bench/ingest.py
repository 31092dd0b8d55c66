#!/usr/bin/env python
"""Ingest benchmark: points/s from ingest to stream, and commit-to-stream latency.

Input: the bundled real replay (`defiwatch.ingest.replay.iter_records`), points only (protocol
metadata records are skipped). When `--points` asks for more than the data holds, the data is
repeated with every subject suffixed `-r2`, `-r3`, ... (new series, same values), and the output
says so.

Two modes per backend, each on a fresh store and stream:

throughput
    Every point as fast as possible through `IngestService.ingest_points` (per-source batches of
    `--batch`, one transaction each) while a processor runs. Reports points/s committed,
    points/s through the processor (change_log rows to stream), events published, and the
    duration from the first commit until the processor cursor has caught up. Default
    thresholds (what users get), so only significant changes become events.

latency
    Points paced at `--rate` points/s for `--duration` s (after `--warmup` s not counted), in
    ticks of `--tick-ms`. Thresholds are set to 0 (tvl_threshold_pct=0, tvl_threshold_abs=0,
    price_threshold_pct=0), so every new point of a series that already has a point becomes an
    event; an observer in the load process reads the stream (`wait` + `read`) and stamps each
    event on arrival. Latency per point = arrival in the stream reader - return of the
    `ingest_points` call that committed it (the commit plus a few microseconds of bookkeeping).
    Per-batch latency = the slowest point of each committed batch.

Backends:

embedded
    SQLite file in a temp dir + in-process stream and cache, ONE process: load generator,
    processor and stream reader share one event loop (the embedded deployment). Not pinned.
production
    A fresh PostgreSQL database (created and dropped here) + Redis under a unique key prefix
    (deleted afterwards). The processor is a separate process, `defiwatch run processor`, pinned
    with `taskset -c 0`; this load process (load generator + stream reader) is pinned to core 1.
    PostgreSQL and Redis are not pinned.

Prints one JSON document on stdout and writes it to bench/results/ingest-<date>.json (or
`--out`). Touches only loopback services; stops by itself; cleans up on failure.

    .venv/bin/python bench/ingest.py                     # both backends, a few minutes
    .venv/bin/python bench/ingest.py --backends production --duration 60
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
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from measure import CpuMeter, dist_ms
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.app import open_platform, run_roles
from defiwatch.config import Settings
from defiwatch.domain import Point, validate_point
from defiwatch.ingest.replay import PointRecord, iter_records
from defiwatch.ingest.service import IngestService
from defiwatch.ops import configure_logging
from defiwatch.stream import EventStream

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"

PG_HOST = os.environ.get("DEFIWATCH_BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DEFIWATCH_BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("DEFIWATCH_BENCH_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("DEFIWATCH_BENCH_PG_DB", "test")
REDIS_URL = os.environ.get("DEFIWATCH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

ZERO_THRESHOLDS: dict[str, Any] = {
    "tvl_threshold_pct": 0.0, "tvl_threshold_abs": 0.0, "price_threshold_pct": 0.0}
PROCESSOR_CORE = 0
LOAD_CORE = 1

Key = tuple[str, str, str, int]
Raw = dict[str, Any]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- input


@dataclass
class Input:
    points: list[tuple[str, Raw]]  # (source, raw point) in data-time order
    available: int  # points in one pass over the bundled data
    repeats: int  # passes used (1 = real data only)


def load_points(n: int | None) -> Input:
    base: list[tuple[str, Raw]] = []
    records = iter_records()
    try:
        for rec in records:
            if isinstance(rec, PointRecord):
                base.append((rec.source, rec.as_raw()))
    finally:
        records.close()
    want = len(base) if n is None else n
    out = base[:want]
    passes = 1
    while len(out) < want:
        passes += 1
        suffix = f"-r{passes}"
        out += [(s, {**raw, "subject": raw["subject"] + suffix}) for s, raw in base[: want - len(out)]]
    return Input(out, len(base), passes)


def throughput_batches(points: Sequence[tuple[str, Raw]], size: int) -> list[tuple[str, list[Raw]]]:
    """Per-source batches of `size` in data order (each series has one source: order is kept)."""
    pending: dict[str, list[Raw]] = {}
    out: list[tuple[str, list[Raw]]] = []
    for source, raw in points:
        buf = pending.setdefault(source, [])
        buf.append(raw)
        if len(buf) >= size:
            out.append((source, buf))
            pending[source] = []
    out += [(s, b) for s, b in pending.items() if b]
    return out


@dataclass
class TickBatch:
    source: str
    raw: list[Raw]
    keys: list[Key]  # normalised (series, ts) as events carry them


def latency_ticks(points: Sequence[tuple[str, Raw]], per_tick: int) -> list[list[TickBatch]]:
    now = time.time()
    ticks: list[list[TickBatch]] = []
    for start in range(0, len(points), per_tick):
        groups: dict[str, TickBatch] = {}
        for source, raw in points[start : start + per_tick]:
            p = validate_point(raw, index=0, now=now, source=source)
            if not isinstance(p, Point):
                raise SystemExit(f"bench input point rejected: {raw} {p}")
            g = groups.setdefault(source, TickBatch(source, [], []))
            g.raw.append(raw)
            g.keys.append((p.metric, p.subject, p.chain, p.ts))
        ticks.append(list(groups.values()))
    return ticks


# ---------------------------------------------------------------- measurement helpers


async def cursor_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        row = (await conn.execute(
            text("SELECT position_id FROM processor_cursors WHERE name = 'main'"))).first()
    return int(row[0]) if row else 0


async def max_change_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT max(id) FROM change_log"))).first()
    return int(row[0]) if row and row[0] is not None else 0


async def wait_caught_up(engine: AsyncEngine, target: int, timeout: float) -> float:
    """Poll the processor cursor until it reaches change_log id `target`; the time it did."""
    deadline = time.perf_counter() + timeout
    while True:
        if await cursor_id(engine) >= target:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"processor did not catch up to change_log id {target} "
                               f"within {timeout} s (cursor at {await cursor_id(engine)})")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- backends


@dataclass
class Env:
    backend: str
    ingest: IngestService
    engine: AsyncEngine
    stream: EventStream
    processor_pid: int | None
    redis_pid: int | None
    details: dict[str, Any]
    processor_log: Path | None = None


def _common_settings(state_dir: Path) -> dict[str, Any]:
    return {"state_dir": state_dir, "replay_enabled": False, "poller_enabled": False,
            "demo_key": False, "log_format": "console", "log_level": "warning"}


@contextlib.asynccontextmanager
async def embedded_env(tmp: Path, tag: str, zero: bool, args: argparse.Namespace
                       ) -> AsyncIterator[Env]:
    state = tmp / tag
    state.mkdir()
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{state}/defiwatch.db", redis_url=None,
        processor_batch=args.processor_batch, **_common_settings(state),
        **(ZERO_THRESHOLDS if zero else {}),
    )
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    async with open_platform(settings) as platform:
        stop = asyncio.Event()
        roles = asyncio.create_task(run_roles(platform, ["processor"], stop), name="bench-proc")
        try:
            yield Env("embedded", platform.ingest, platform.engine, platform.stream, None, None,
                      {"database": "SQLite (WAL, synchronous=NORMAL) in a temp dir",
                       "stream": "in-process MemoryEventStream",
                       "processes": "one: load generator, processor and stream reader share "
                                    "one asyncio loop", "pinning": "none"})
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(roles, 30)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB,
                                 timeout=10)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close()


async def _delete_redis_prefix(prefix: str) -> int:
    client = aioredis.from_url(REDIS_URL, socket_timeout=10)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


async def _wait_for_log(path: Path, needle: str, proc: asyncio.subprocess.Process,
                        timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        logged = await asyncio.to_thread(path.read_text, errors="replace")
        if proc.returncode is not None:
            raise RuntimeError(f"processor exited with {proc.returncode}: {logged[-2000:]}")
        if needle in logged:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
    raise TimeoutError(f"processor did not log {needle!r} within {timeout} s")


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


@contextlib.asynccontextmanager
async def production_env(tmp: Path, tag: str, zero: bool, args: argparse.Namespace
                         ) -> AsyncIterator[Env]:
    state = tmp / tag
    state.mkdir()
    dbname = f"dwbench_{tag}_{secrets.token_hex(4)}"
    prefix = f"dwbench:{tag}:{secrets.token_hex(4)}:"
    url = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"
    proc: asyncio.subprocess.Process | None = None
    created = False
    try:
        await _pg_admin(f'CREATE DATABASE "{dbname}"')
        created = True
        settings = Settings(
            database_url=url, redis_url=REDIS_URL, redis_prefix=prefix,
            processor_batch=args.processor_batch, **_common_settings(state),
            **(ZERO_THRESHOLDS if zero else {}),
        )
        async with open_platform(settings) as platform:  # migrates before the processor starts
            assert platform.redis is not None
            redis_pid = int((await platform.redis.info("server"))["process_id"])
            env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
            env.update({
                "DEFIWATCH_DATABASE_URL": url, "DEFIWATCH_REDIS_URL": REDIS_URL,
                "DEFIWATCH_REDIS_PREFIX": prefix, "DEFIWATCH_LOG_FORMAT": "json",
                "DEFIWATCH_LOG_LEVEL": "info", "DEFIWATCH_DEMO_KEY": "false",
                "DEFIWATCH_REPLAY_ENABLED": "false", "DEFIWATCH_STATE_DIR": str(state),
                "DEFIWATCH_CONFIG": str(state / "absent.toml"),
                "DEFIWATCH_PROCESSOR_BATCH": str(args.processor_batch),
            })
            if zero:
                env.update({f"DEFIWATCH_{k.upper()}": str(v) for k, v in ZERO_THRESHOLDS.items()})
            logfile = state / "processor.log"
            cmd = ["taskset", "-c", str(PROCESSOR_CORE), str(VENV_BIN / "defiwatch"), "run",
                   "processor"]
            with logfile.open("wb") as fh:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, env=env, cwd=state, stdout=fh, stderr=asyncio.subprocess.STDOUT,
                    stdin=asyncio.subprocess.DEVNULL)
            await _wait_for_log(logfile, "processor.listening", proc, 60)
            os.sched_setaffinity(0, {LOAD_CORE})
            try:
                yield Env("production", platform.ingest, platform.engine, platform.stream,
                          proc.pid, redis_pid, processor_log=logfile, details=
                          {"database": f"PostgreSQL database {dbname} (created and dropped)",
                           "stream": f"Redis Streams, prefix {prefix!r} (deleted afterwards)",
                           "processes": "processor: separate `defiwatch run processor` process; "
                                        "load generator + stream reader: this process",
                           "pinning": f"processor taskset -c {PROCESSOR_CORE}; load process "
                                      f"sched_setaffinity {{{LOAD_CORE}}}; PostgreSQL and Redis "
                                      "unpinned"})
            finally:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
                await _stop_process(proc)
                if proc.returncode not in (0, -signal.SIGTERM):
                    log(f"processor exit code {proc.returncode}; log tail:\n"
                        + logfile.read_text(errors="replace")[-3000:])
    finally:
        if proc is not None:
            await _stop_process(proc)
        if created:
            try:
                await _pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            except Exception as exc:  # report and go on cleaning
                log(f"could not drop database {dbname}: {exc!r}")
        try:
            await _delete_redis_prefix(prefix)
        except Exception as exc:
            log(f"could not delete Redis keys {prefix}*: {exc!r}")


# ---------------------------------------------------------------- modes


async def run_throughput(env: Env, batches: list[tuple[str, list[Raw]]], args: argparse.Namespace
                         ) -> dict[str, Any]:
    cpu = CpuMeter("load_process", {
        name: [pid] for name, pid in (("processor_process", env.processor_pid),
                                      ("redis_server", env.redis_pid)) if pid})
    samples: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), await cursor_id(env.engine)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)

    accepted = duplicates = rejected = 0
    durations: list[float] = []
    cpu.begin()
    t_start = time.perf_counter()
    sampler = asyncio.create_task(sample())
    first_commit: float | None = None
    deadline = t_start + args.timeout
    try:
        for source, raw in batches:
            s = time.perf_counter()
            res = await env.ingest.ingest_points(raw, source=source)
            c = time.perf_counter()
            first_commit = first_commit or c
            durations.append(c - s)
            accepted += res.accepted
            duplicates += len(res.duplicates)
            rejected += len(res.rejected)
            if c > deadline:
                raise TimeoutError(f"ingest did not finish within {args.timeout} s")
        t_end = time.perf_counter()
        target = await max_change_id(env.engine)
        behind_at_end = target - await cursor_id(env.engine)
        t_caught = await wait_caught_up(env.engine, target, max(deadline - t_end, 30))
    finally:
        done.set()
        await sampler
    cpu_out = {"cpu_seconds": cpu.end()}
    events = await env.stream.last_offset()
    assert first_commit is not None
    e2e = t_caught - first_commit
    drain = t_caught - t_end
    return {
        "thresholds": "defaults (tvl 1 % or $10,000, price 0.1 %)",
        "batches": len(batches),
        "points_offered": sum(len(b) for _, b in batches),
        "accepted": accepted, "duplicates": duplicates, "rejected": rejected,
        "change_log_rows": target,
        "ingest_seconds": round(t_end - t_start, 3),
        "ingest_points_per_s": round(accepted / (t_end - t_start)),
        "ingest_call_seconds": {k.replace("_ms", "_s"): (None if v is None else round(v / 1000, 4))
                                for k, v in dist_ms(durations).items() if k != "n"},
        "processor_backlog_rows_at_ingest_end": behind_at_end,
        "processor_drain_seconds_after_ingest_end": round(drain, 3),
        "processor_points_per_s": round(target / e2e),
        "processor_points_per_s_alone_after_ingest_end":
            round(behind_at_end / drain) if drain > 0.05 else None,
        "end_to_end_seconds_first_commit_to_caught_up": round(e2e, 3),
        "ingest_to_stream_points_per_s": round(accepted / (t_caught - t_start)),
        "events_published": events,
        "cursor_samples_every_0.25s": [[round(t - t_start, 2), c] for t, c in samples],
        **cpu_out,
    }


async def run_latency(env: Env, ticks: list[list[TickBatch]], warmup_ticks: int,
                      args: argparse.Namespace) -> dict[str, Any]:
    tick_s = args.tick_ms / 1000
    arrivals: dict[Key, tuple[float, float, float]] = {}  # key -> (perf, wall, emitted_at)
    stop_observer = asyncio.Event()
    advanced = asyncio.Event()
    seen_offset = 0

    async def observe() -> None:
        nonlocal seen_offset
        while not stop_observer.is_set():
            last = await env.stream.wait(seen_offset, 0.5)
            t, w = time.perf_counter(), time.time()
            if last <= seen_offset:
                continue
            while seen_offset < last:
                sl = await env.stream.read(seen_offset, 10_000)
                t2, w2 = time.perf_counter(), time.time()
                if not sl.events:
                    break
                for e in sl.events:
                    stamp = (t, w) if e.offset <= last else (t2, w2)
                    arrivals[(e.metric, e.subject, e.chain, e.ts)] = (*stamp, e.emitted_at)
                seen_offset = sl.events[-1].offset
                advanced.set()

    pg_sampler_out: dict[str, Any] = {}
    pg_stop = asyncio.Event()

    async def pg_other_xacts() -> None:
        # The PostgreSQL cursor only reads rows of transactions older than the oldest running
        # one in the WHOLE CLUSTER (store/changelog.py, pg_snapshot_xmin): a write transaction
        # in another database delays our events for as long as it runs. Sampled every 100 ms
        # on a connection of its own (not the pool the load generator uses).
        worst = 0.0
        samples = busy = seen = 0
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=env.engine.url.database, timeout=10)
        try:
            while not pg_stop.is_set():
                row = await conn.fetchrow(
                    "SELECT count(*), coalesce(max(extract(epoch FROM clock_timestamp() - "
                    "xact_start)), 0) FROM pg_stat_activity WHERE backend_xid IS NOT NULL "
                    "AND datname IS DISTINCT FROM current_database()", timeout=10)
                assert row is not None
                samples += 1
                busy += row[0] > 0
                seen = max(seen, int(row[0]))
                worst = max(worst, float(row[1]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pg_stop.wait(), 0.1)
        finally:
            await conn.close()
        pg_sampler_out.update({
            "what": "write (xid-holding) transactions in OTHER databases of the same cluster, "
                    "sampled every 100 ms; each holds back the processor's read horizon",
            "samples": samples,
            "samples_with_one_running_pct": round(100 * busy / max(samples, 1), 1),
            "max_concurrent": seen,
            "oldest_age_seen_s": round(worst, 3)})

    cpu = CpuMeter("load_process", {
        name: [pid] for name, pid in (("processor_process", env.processor_pid),
                                      ("redis_server", env.redis_pid)) if pid})
    observer = asyncio.create_task(observe())
    pg_task = asyncio.create_task(pg_other_xacts()) if env.backend == "production" else None
    commits: list[tuple[int, float, float, list[Key], float]] = []  # tick, perf, wall, keys, dur
    late = 0
    try:
        await asyncio.sleep(0.2)  # let the observer block on the stream
        cpu.begin()
        t0 = time.perf_counter() + 0.01
        t0_wall = time.time() + 0.01
        for i, tick in enumerate(ticks):
            if i == warmup_ticks:
                cpu.begin()
            delay = t0 + i * tick_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -tick_s:
                late += 1
            for b in tick:
                s = time.perf_counter()
                await env.ingest.ingest_points(b.raw, source=b.source)
                c = time.perf_counter()
                commits.append((i, c, time.time(), b.keys, c - s))
        t_end = time.perf_counter()
        measured_s = t_end - (t0 + warmup_ticks * tick_s)
        target = await max_change_id(env.engine)
        await wait_caught_up(env.engine, target, 60)
        final = await env.stream.last_offset()
        deadline = time.perf_counter() + 30
        while seen_offset < final and time.perf_counter() < deadline:
            advanced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(advanced.wait(), 1.0)
        cpu_out = {"cpu_seconds": cpu.end()}
    finally:
        stop_observer.set()
        pg_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(observer, 10)
        if pg_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pg_task, 10)

    per_point: list[float] = []
    per_batch: list[float] = []
    pickup: list[float] = []  # commit (wall) -> event emitted_at (processor detect time)
    delivery: list[float] = []  # emitted_at -> arrival at the stream reader (wall)
    commit_dur: list[float] = []
    measured_points = unobserved = 0
    worst_batches: list[tuple[float, float, int, float]] = []  # latency, at s, points, pickup
    for i, c, w, keys, d in commits:
        if i < warmup_ticks:
            continue
        commit_dur.append(d)
        measured_points += len(keys)
        worst: float | None = None
        for k in keys:
            a = arrivals.get(k)
            if a is None:
                unobserved += 1
                continue
            lat = a[0] - c
            per_point.append(lat)
            pickup.append(a[2] - w)
            delivery.append(a[1] - a[2])
            worst = lat if worst is None else max(worst, lat)
        if worst is not None:
            per_batch.append(worst)
            picked = [arrivals[k][2] - w for k in keys if k in arrivals]
            worst_batches.append((worst, c - t0, len(keys), max(picked)))
    worst_batches.sort(reverse=True)
    offered = sum(len(b.raw) for tick in ticks[warmup_ticks:] for b in tick)
    return {
        "method": "thresholds set to 0 (tvl_threshold_pct=0, tvl_threshold_abs=0, "
                  "price_threshold_pct=0) so every new point is an event; latency = arrival "
                  "at a stream reader in the load process (EventStream.wait + read) minus the "
                  "return of the ingest_points call that committed the point",
        "rate_points_per_s_target": args.rate,
        "ticks_started_at_unix": round(t0_wall, 3),
        "tick_ms": args.tick_ms,
        "points_per_tick": args.rate * args.tick_ms // 1000,
        "warmup_s_excluded": args.warmup,
        "measured_seconds": round(measured_s, 3),
        "measured_points": measured_points,
        "achieved_points_per_s": round(offered / measured_s, 1),
        "ticks_late_by_more_than_a_tick": late,
        "commits": len([c for c in commits if c[0] >= warmup_ticks]),
        "points_without_event": unobserved,
        "points_without_event_note": "first point of a series (no reference: no event by "
                                     "design) or out of order",
        "commit_to_stream_per_point": dist_ms(per_point),
        "commit_to_stream_per_batch_slowest_point": dist_ms(per_batch),
        "breakdown_commit_to_processor_detect": dist_ms(pickup),
        "breakdown_processor_detect_to_reader_arrival": dist_ms(delivery),
        "ingest_call_duration": dist_ms(commit_dur),
        "slowest_batches": [
            {"at_s": round(at, 2), "latency_ms": round(lat * 1000, 2), "points": n,
             "commit_to_detect_ms": round(pick * 1000, 2)}
            for lat, at, n, pick in worst_batches[:5]],
        "events_published_total_incl_warmup": await env.stream.last_offset(),
        **({"other_postgres_activity": pg_sampler_out} if pg_sampler_out else {}),
        **cpu_out,
    }


# ---------------------------------------------------------------- driver


async def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=PG_ADMIN_DB, timeout=10)
        try:
            out["postgresql"] = await conn.fetchval("SHOW server_version")
            out["postgresql_settings"] = {
                k: await conn.fetchval(f"SHOW {k}")
                for k in ("synchronous_commit", "fsync", "shared_buffers", "wal_level")
            }
        finally:
            await conn.close()
    except Exception as exc:
        out["postgresql"] = f"unreachable: {exc!r}"
    try:
        client = aioredis.from_url(REDIS_URL, socket_timeout=10)
        try:
            info = await client.info("server")
            out["redis"] = info["redis_version"]
            out["redis_appendonly"] = (await client.config_get("appendonly")).get("appendonly")
        finally:
            await client.aclose()
    except Exception as exc:
        out["redis"] = f"unreachable: {exc!r}"
    return out


def source_fingerprint() -> dict[str, Any]:
    """sha256 over src/defiwatch's code files: tells runs of different working trees apart
    (the repository has no commit to name yet, and files change between runs)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / "src" / "defiwatch").rglob("*")
                   if p.suffix in (".py", ".lua") and p.is_file())
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    newest = max(files, key=lambda f: f.stat().st_mtime)
    return {"sha256": h.hexdigest()[:16], "files": len(files),
            "newest_file": str(newest.relative_to(ROOT)),
            "newest_mtime": dt.datetime.fromtimestamp(newest.stat().st_mtime, dt.UTC)
            .isoformat(timespec="seconds")}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import sqlite3

    import aiosqlite
    import msgspec
    import redis
    import sqlalchemy

    return {
        "nproc": os.cpu_count(), "cpu": model, "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "libs": {"sqlalchemy": sqlalchemy.__version__, "asyncpg": asyncpg.__version__,
                 "redis-py": redis.__version__, "aiosqlite": aiosqlite.__version__,
                 "sqlite": sqlite3.sqlite_version, "msgspec": msgspec.__version__},
    }


def targets(results: dict[str, Any], rate: int) -> dict[str, Any]:
    prod = results.get("production", {})
    out: dict[str, Any] = {}
    tp = prod.get("throughput", {}).get("ingest_to_stream_points_per_s")
    out["production_throughput_>=_20000_points_per_s"] = {
        "value_ingest_to_stream_points_per_s": tp,
        "ingest_only_points_per_s": prod.get("throughput", {}).get("ingest_points_per_s"),
        "processor_points_per_s": prod.get("throughput", {}).get("processor_points_per_s"),
        "met": None if tp is None else tp >= 20_000}
    p99 = prod.get("latency", {}).get("commit_to_stream_per_point", {}).get("p99_ms")
    out["production_p99_commit_to_stream_<_50_ms_at_1000_points_per_s"] = {
        "rate": rate, "value_p99_ms": p99,
        "met": None if p99 is None or rate < 1000 else p99 < 50}
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("embedded", "production"):
            raise SystemExit(f"unknown backend {b!r}: embedded, production")
    if "production" in backends and (os.cpu_count() or 1) < 2:
        raise SystemExit("production needs 2 cores for the pinning")

    log("loading the bundled replay ...")
    data = load_points(args.points)
    per_tick = max(1, args.rate * args.tick_ms // 1000)
    warmup_ticks = round(args.warmup * 1000 / args.tick_ms)
    n_ticks = warmup_ticks + round(args.duration * 1000 / args.tick_ms)
    lat_data = load_points(n_ticks * per_tick) if n_ticks * per_tick > len(data.points) else None
    lat_points = (lat_data or data).points[: n_ticks * per_tick]
    batches = throughput_batches(data.points, args.batch)
    ticks = latency_ticks(lat_points, per_tick)
    log(f"{len(data.points)} points for throughput ({len(batches)} batches), "
        f"{len(lat_points)} for latency ({len(ticks)} ticks)")

    doc: dict[str, Any] = {
        "bench": "bench/ingest.py",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "conditions": {
            "machine": machine(),
            "source": source_fingerprint(),
            "services": await versions(),
            "input": {
                "source": "defiwatch.ingest.replay.iter_records (bundled real data), points only; "
                          "protocol metadata records skipped",
                "points_in_bundled_data": data.available,
                "throughput_points": len(data.points),
                "throughput_passes": data.repeats,
                "repeat_rule": "passes > 1 repeat the data with subjects suffixed -r2, -r3 "
                               "(new series)" if data.repeats > 1 else "real data only, one pass",
                "latency_points": len(lat_points),
                "latency_passes": (lat_data or data).repeats,
                "order": "data time (heapq merge of all files)",
            },
            "throughput_batch_points": args.batch,
            "throughput_batching": "per-source batches (ingest_points takes one source per "
                                   "call), one transaction each",
            "processor_batch": args.processor_batch,
            "latency": {"rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
                        "tick_ms": args.tick_ms},
            "clock": "time.perf_counter in the load process for latency; wall clock only for the "
                     "processor-detect breakdown (same host)",
        },
        "results": {},
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dwbench-") as tmpname:
        tmp = Path(tmpname)
        for backend in backends:
            opener = embedded_env if backend == "embedded" else production_env
            res: dict[str, Any] = {}
            doc["results"][backend] = res
            for mode in ("throughput", "latency"):
                log(f"{backend}: {mode} ...")
                res[f"loadavg_before_{mode}"] = os.getloadavg()
                try:
                    async with opener(tmp, f"{backend[:4]}_{mode[:3]}", mode == "latency",
                                      args) as env:
                        res["setup"] = env.details
                        try:
                            if mode == "throughput":
                                res[mode] = await run_throughput(env, batches, args)
                            else:
                                res[mode] = await run_latency(env, ticks, warmup_ticks, args)
                        except Exception as exc:
                            res[mode] = {"error": repr(exc), "diagnostics": await diagnose(env)}
                            raise
                except Exception as exc:
                    res.setdefault(mode, {"error": repr(exc)})
                    failures.append(f"{backend}/{mode}: {exc!r}")
                    log(f"{backend}: {mode} FAILED: {exc!r}")
                    continue
                log(f"{backend}: {mode}: {summary(res[mode])}")
    doc["failures"] = failures
    r = doc["results"]
    if not failures and "embedded" in r and "production" in r:
        e, p = r["embedded"], r["production"]
        doc["ratios_production_over_embedded"] = {
            "ingest_points_per_s": round(p["throughput"]["ingest_points_per_s"]
                                         / e["throughput"]["ingest_points_per_s"], 2),
            "processor_points_per_s": round(p["throughput"]["processor_points_per_s"]
                                            / e["throughput"]["processor_points_per_s"], 2),
            "latency_p99": _ratio(p["latency"]["commit_to_stream_per_point"]["p99_ms"],
                                  e["latency"]["commit_to_stream_per_point"]["p99_ms"]),
        }
    doc["targets"] = targets(r, args.rate)
    doc["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return doc


def summary(res: dict[str, Any]) -> str:
    if "ingest_points_per_s" in res:
        return (f"{res['ingest_points_per_s']} pts/s ingest, {res['processor_points_per_s']} "
                f"pts/s processor, {res['ingest_to_stream_points_per_s']} pts/s ingest-to-stream")
    d = res["commit_to_stream_per_point"]
    return f"commit-to-stream p50/p99/max {d['p50_ms']}/{d['p99_ms']}/{d['max_ms']} ms"


async def diagnose(env: Env) -> dict[str, Any]:
    """What a stuck run looks like: cursor, change_log head, stream, and on PostgreSQL the
    transactions that hold back the processor's `txid < pg_snapshot_xmin` horizon."""
    out: dict[str, Any] = {}
    for name, probe in (("cursor_id", cursor_id), ("change_log_max_id", max_change_id)):
        try:
            out[name] = await asyncio.wait_for(probe(env.engine), 10)
        except Exception as exc:
            out[name] = repr(exc)
    try:
        out["stream_last_offset"] = await asyncio.wait_for(env.stream.last_offset(), 10)
    except Exception as exc:
        out["stream_last_offset"] = repr(exc)
    if env.backend == "production":
        try:
            async with env.engine.connect() as conn:
                out["pg_snapshot_xmin"] = str((await conn.execute(text(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())"))).scalar())
                out["change_log_txid_after_cursor_min"] = str((await conn.execute(text(
                    "SELECT min(txid) FROM change_log WHERE id > (SELECT position_id FROM "
                    "processor_cursors WHERE name = 'main')"))).scalar())
                rows = (await conn.execute(text(
                    "SELECT pid, datname, state, backend_xid::text, backend_xmin::text, "
                    "round(extract(epoch FROM clock_timestamp() - xact_start)::numeric, 3), "
                    "left(query, 120) FROM pg_stat_activity WHERE backend_xid IS NOT NULL "
                    "OR backend_xmin IS NOT NULL ORDER BY xact_start"))).all()
                out["xid_or_xmin_holding_sessions"] = [
                    {"pid": r[0], "db": r[1], "state": r[2], "xid": r[3], "xmin": r[4],
                     "xact_age_s": float(r[5]) if r[5] is not None else None, "query": r[6]}
                    for r in rows]
        except Exception as exc:
            out["pg"] = repr(exc)
    if env.processor_log is not None:
        lines = (await asyncio.to_thread(env.processor_log.read_text, errors="replace")
                 ).splitlines()
        out["processor_log_tail"] = lines[-40:]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="embedded,production",
                    help="comma-separated: embedded, production (default both)")
    ap.add_argument("--points", type=int, default=None,
                    help="points for the throughput mode (default: all of the bundled data, "
                         "about 357k; more repeats the data with new series)")
    ap.add_argument("--batch", type=int, default=5_000, help="points per ingest call (throughput)")
    ap.add_argument("--processor-batch", type=int, default=5_000,
                    help="DEFIWATCH_PROCESSOR_BATCH for the processor")
    ap.add_argument("--rate", type=int, default=1_000, help="points/s in the latency mode")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds (latency)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before")
    ap.add_argument("--tick-ms", type=int, default=100,
                    help="pacing interval: rate*tick points committed per tick (latency)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="give up a throughput run after this many seconds")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output path (default bench/results/ingest-<date>.json)")
    args = ap.parse_args(argv)
    if args.points is not None and args.points < 1:
        ap.error("--points must be >= 1")
    if args.rate < 1 or args.tick_ms < 1 or args.duration <= 0 or args.warmup < 0:
        ap.error("--rate, --tick-ms, --duration must be positive, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    configure_logging("console", "warning")  # product logs to stderr; stdout is the JSON

    async def guarded() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)  # unwinds every cleanup `finally`
        return await main_async(args)

    doc = asyncio.run(guarded())
    text_out = json.dumps(doc, indent=2, default=str)
    out = args.out or RESULTS / f"ingest-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text_out + "\n")
    print(text_out)
    log(f"written to {out}")
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
