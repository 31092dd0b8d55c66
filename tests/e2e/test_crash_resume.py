"""At-least-once with exactly-once effect: SIGKILL the processor in the middle of a replay,
restart it, and every change is in the stream exactly once per (series, ts).

Runs the real `defiwatch run processor` as a child process against PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text

from defiwatch.cache import MemoryHotCache
from defiwatch.domain import ChangeDetector
from defiwatch.ingest.replay import replay
from defiwatch.ingest.service import IngestService
from defiwatch.processor import Processor, Wakeup
from defiwatch.store import create_engine, upgrade
from defiwatch.stream import MemoryEventStream, RedisEventStream
from loopback import free_port, wait_until_ready

# 20 days of real 5-minute ETH/BTC prices (2017): about 11,500 points.
SOURCES = ["coinmarketcap_5min_eth_btc.jsonl.gz"]
START, END = 1_483_228_800, 1_484_956_800  # 2017-01-01 .. 2017-01-21 UTC
SPEED = (END - START) / 4  # the replay takes about 4 s of wall time


@pytest.fixture
def processor_env(postgres_url: str, redis_url: str, redis_prefix: str) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    env.update({
        "DEFIWATCH_DATABASE_URL": postgres_url,
        "DEFIWATCH_REDIS_URL": redis_url,
        "DEFIWATCH_REDIS_PREFIX": redis_prefix,
        "DEFIWATCH_PROCESSOR_BATCH": "100",  # many small batches: a kill lands mid-way
        "DEFIWATCH_LOG_LEVEL": "warning",
        "DEFIWATCH_OPS_PORT": str(free_port()),  # its readiness tells when the replay may start
    })
    yield env


def start_processor(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "defiwatch", "run", "processor"],
                                env=env, stdout=subprocess.DEVNULL, stderr=sink)


async def cursor_and_end(engine: object) -> tuple[int, int]:
    """(id the processor's cursor is at, id of the last change_log row in processing order)."""
    async with engine.connect() as conn:  # type: ignore[attr-defined]
        at = (await conn.execute(text(
            "SELECT position_id FROM processor_cursors WHERE name = 'main'"))).scalar() or 0
        end = (await conn.execute(text(
            "SELECT id FROM change_log ORDER BY txid DESC, id DESC LIMIT 1"))).scalar() or 0
    return int(at), int(end)


async def test_sigkill_mid_replay_loses_nothing_and_duplicates_nothing(
    postgres_url: str, redis_url: str, redis_prefix: str, processor_env: dict[str, str],
    timeout_factor: float, tmp_path: Path,
) -> None:
    log = tmp_path / "processor.log"
    await upgrade(postgres_url)
    engine = create_engine(postgres_url)
    client = aioredis.from_url(redis_url, socket_timeout=35)
    stream = RedisEventStream(client, prefix=redis_prefix, retention=1_000_000)
    first = start_processor(processor_env, log)
    try:
        # Starting the child takes seconds on a loaded machine; the replay is paced to last about
        # 4 s, so it starts only once the processor is running.
        ready = f"http://127.0.0.1:{processor_env['DEFIWATCH_OPS_PORT']}/readyz"
        async with asyncio.timeout(60 * timeout_factor):
            await wait_until_ready(ready)
        loading = asyncio.create_task(replay(IngestService(engine), speed=SPEED, sources=SOURCES,
                                             start_ts=START, end_ts=END, batch_size=500))
        # Wait until the processor has published a few hundred events, then kill it hard.
        async with asyncio.timeout(60 * timeout_factor):
            seen = 0
            while seen < 300:
                seen = await stream.wait(seen, timeout=5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at, _ = await cursor_and_end(engine)
        assert not loading.done(), "the replay had ended before the kill; nothing was tested"
        stats = await loading
        assert stats.accepted > 10_000
        _, end = await cursor_and_end(engine)
        assert killed_at < end, "the processor had finished before the kill; nothing was tested"

        second = start_processor(processor_env, log)
        try:
            async with asyncio.timeout(120 * timeout_factor):
                while (await cursor_and_end(engine))[0] != end:
                    await stream.wait(await stream.last_offset(), timeout=0.5)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0, log.read_text()

        published = (await stream.read(0, 1_000_000)).events
        keys = [(e.metric, e.subject, e.chain, e.ts) for e in published]
        assert len(keys) == len(set(keys)), "an event was published twice"
        assert [e.offset for e in published] == list(range(1, len(published) + 1))

        # Reference: one uninterrupted processor over the same stored points.
        reference_stream = MemoryEventStream(retention=1_000_000)
        reference = Processor(engine, reference_stream, MemoryHotCache(), detector=ChangeDetector(),
                              wakeup=Wakeup(), name="reference", batch=5_000)
        await reference.drain()
        expected = (await reference_stream.read(0, 1_000_000)).events

        def essence(events: list) -> list[tuple[object, ...]]:  # type: ignore[type-arg]
            return [(e.type, e.metric, e.subject, e.chain, e.ts, e.value, e.previous)
                    for e in events]

        assert len(expected) > 1_000
        assert essence(published) == essence(expected)
    finally:
        if first.poll() is None:
            first.kill()
        await stream.close()
        await client.aclose()
        await engine.dispose()
