"""Replay of the bundled real demo data (data/demo) into a `PointSink`, paced by data time.

The demo files are built by `scripts/build_demo_data.py` from real DefiLlama, CoinGecko, Coinbase
and CoinMarketCap captures (see data/demo/manifest.json for origins and attribution). Each file
holds one source, one JSON array per line, sorted by ts:

    ["p", metric, subject, chain, ts, value]                       a normalised point
    ["m", ts, slug, name, category, [chains], gecko_id, symbol, url, listed_at]   metadata

Files are streamed line by line and merged in time order with `heapq.merge`, so a replay holds
one decoded line per file in memory, not the data set.

Pacing has two phases, so a first `defiwatch run` shows current-looking data within seconds
instead of after half an hour of history: records before `backfill_until` are delivered as
fast as the store takes them (the backfill), later ones are paced by data time (streaming).
Data the store already holds also plays at full speed (it answers duplicates), so a restarted
replay catches up in seconds and paces only what is new. Sink failures a restart of the
database cures (down, restarting, tables not migrated yet) are retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import heapq
import math
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError

from defiwatch.domain import ProtocolMeta
from defiwatch.errors import BackendUnavailable, ValidationError
from defiwatch.ingest.base import PointSink
from defiwatch.ops import health
from defiwatch.ops.supervisor import Backoff

__all__ = [
    "DEMO_DIR",
    "MAX_WAIT",
    "STREAMED_TAIL_S",
    "Manifest",
    "ManifestEntry",
    "PointRecord",
    "ProtocolRecord",
    "Record",
    "ReplayStats",
    "backfill_end",
    "count_records",
    "iter_records",
    "load_manifest",
    "newest_ts",
    "replay",
    "select_entries",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Path(__file__) rather than importlib.resources: gzip needs a real file, and the package is
# always installed unzipped (setuptools package-data), so the two agree.
DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"

# No single pacing wait is longer than this (wall seconds). The data has multi-month gaps (the
# 2017 CoinMarketCap year ends before later series start); at speed 3600 an 8-month gap would
# otherwise stall a demo for 1.6 hours. A longer gap plays as MAX_WAIT, then pacing resumes.
MAX_WAIT = 1.0
# Pacing waits shorter than this are deferred and added up, so dense data (5-minute ticks at
# high speed) becomes a few batches per second instead of one sleep and one tiny batch per tick.
_GRANULARITY = 0.05
# The default streamed part of a window: its last 30 days of data (30 wall seconds at one day
# per second), enough to watch events arrive; everything older is backfilled at full speed.
STREAMED_TAIL_S = 30 * 86_400
# What a sink raises while the database is down, restarting or not migrated yet (SQLite's
# "no such table" while another process migrates). Retrying is safe: the store is idempotent.
_RETRYABLE: tuple[type[Exception], ...] = (SQLAlchemyError, OSError, BackendUnavailable)

RECORDS = Counter("defiwatch_replay_records_total", "Demo records replayed into the sink",
                  ["source", "kind"])
RETRIES = Counter("defiwatch_replay_sink_retries_total",
                  "Sink calls of the replay that failed and were retried")
WAITED = Counter("defiwatch_replay_wait_seconds_total", "Wall seconds spent pacing by data time")
GAPS = Counter("defiwatch_replay_gaps_capped_total",
               "Pacing waits cut to MAX_WAIT because of a long gap in data time")
DATA_TS = Gauge("defiwatch_replay_data_timestamp_seconds",
                "Data time (epoch s) of the newest record handed to the sink")


class ManifestEntry(msgspec.Struct, frozen=True):
    """One demo file; `source` is what its points carry as `Point.source`."""

    file: str
    source: str
    description: str
    origin: str
    attribution: str
    rows: int
    first_ts: int | None
    last_ts: int | None
    notes: list[str] = []
    bytes: int = 0
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.file.removesuffix(".jsonl.gz")


class Manifest(msgspec.Struct, frozen=True):
    generated_by: str
    sources: list[ManifestEntry]


class PointRecord(msgspec.Struct, array_like=True, tag="p", gc=False):
    """A point as stored in a demo line. `source` is filled in by the reader: a file holds one
    source, so its lines do not repeat it."""

    metric: str
    subject: str
    chain: str
    ts: int
    value: float
    source: str = ""

    def as_raw(self) -> dict[str, Any]:
        """The mapping `PointSink.ingest_points` takes."""
        return {"metric": self.metric, "subject": self.subject, "chain": self.chain,
                "ts": self.ts, "value": self.value}


class _MetaRow(msgspec.Struct, array_like=True, tag="m", frozen=True, gc=False):
    ts: int
    slug: str
    name: str
    category: str | None
    chains: tuple[str, ...]
    gecko_id: str | None
    symbol: str | None
    url: str | None
    listed_at: int | None


class ProtocolRecord(msgspec.Struct, frozen=True):
    """Protocol metadata as observed at `ts` by `source`."""

    ts: int
    source: str
    meta: ProtocolMeta


Record = PointRecord | ProtocolRecord

_DECODER = msgspec.json.Decoder(PointRecord | _MetaRow)
_TS = attrgetter("ts")


class ReplayStats(msgspec.Struct):
    """What a replay did. `first_ts`/`last_ts` span the data time delivered (epoch s);
    `wall_seconds` is measured with the injected clock; `passes` counts loops over the data."""

    records: int = 0
    points: int = 0
    protocols: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    protocol_changes: int = 0
    batches: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    wall_seconds: float = 0.0
    passes: int = 0
    gaps_capped: int = 0
    stopped: bool = False


def load_manifest(data_dir: Path | None = None) -> Manifest:
    """Read and check `manifest.json` of `data_dir` (default: the bundled demo data)."""
    path = (data_dir or DEMO_DIR) / "manifest.json"
    return msgspec.json.decode(path.read_bytes(), type=Manifest)


def select_entries(manifest: Manifest, sources: Iterable[str] | None = None) -> list[ManifestEntry]:
    """The manifest entries picked by `sources`, in manifest order (None: all).

    A selector matches a file name (with or without `.jsonl.gz`) or a source name, so
    `["coingecko", "defillama_chain_tvl_6chains"]` is valid.

    Raises:
        ValidationError: a selector matches nothing (the message lists what exists).
    """
    if sources is None:
        return list(manifest.sources)
    wanted = [sources] if isinstance(sources, str) else list(sources)
    known = {e.file for e in manifest.sources} | {e.name for e in manifest.sources} | {
        e.source for e in manifest.sources
    }
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValidationError(
            f"unknown demo source(s) {unknown}; known: {sorted(known)}", field="sources"
        )
    chosen = set(wanted)
    return [e for e in manifest.sources if chosen & {e.file, e.name, e.source}]


def _read(
    fh: Iterable[bytes], source: str, start_ts: int | None, end_ts: int | None
) -> Iterator[Record]:
    for line in fh:
        row = _DECODER.decode(line)
        if start_ts is not None and row.ts < start_ts:
            continue
        if end_ts is not None and row.ts >= end_ts:
            return  # the file is sorted by ts: nothing later qualifies
        if isinstance(row, PointRecord):
            row.source = source
            yield row
        else:
            meta = ProtocolMeta(
                slug=row.slug, name=row.name, category=row.category, chains=row.chains,
                gecko_id=row.gecko_id, symbol=row.symbol, url=row.url, listed_at=row.listed_at,
            )
            yield ProtocolRecord(ts=row.ts, source=source, meta=meta)


def iter_records(
    data_dir: Path | None = None,
    sources: Iterable[str] | None = None,
    start_ts: int | None = None,
    end_ts: int | None = None,
) -> Generator[Record, None, None]:
    """Stream the selected files' records merged in ts order, within [start_ts, end_ts).

    Ties keep manifest order, then file order (metadata sorts before points of the same ts).
    Files stay open while the iterator lives; close it (or exhaust it) to release them.
    """
    base = data_dir or DEMO_DIR
    entries = select_entries(load_manifest(data_dir), sources)
    with contextlib.ExitStack() as files:
        streams = [
            _read(files.enter_context(gzip.open(base / e.file, "rb")), e.source, start_ts, end_ts)
            for e in entries
        ]
        yield from heapq.merge(*streams, key=_TS)


def count_records(
    data_dir: Path | None = None,
    sources: Iterable[str] | None = None,
    start_ts: int | None = None,
    end_ts: int | None = None,
) -> int:
    """How many records `iter_records` yields for the same arguments.

    From the manifest where a file lies wholly inside or outside the window; a file cut by the
    window is counted by streaming it (a fraction of a second for the bundled data).
    """
    base = data_dir or DEMO_DIR
    total = 0
    for e in select_entries(load_manifest(data_dir), sources):
        if e.first_ts is None or e.last_ts is None:
            continue
        if (end_ts is not None and e.first_ts >= end_ts) or (
            start_ts is not None and e.last_ts < start_ts
        ):
            continue
        if (start_ts is None or e.first_ts >= start_ts) and (end_ts is None or e.last_ts < end_ts):
            total += e.rows
            continue
        with gzip.open(base / e.file, "rb") as fh:
            for _ in _read(fh, e.source, start_ts, end_ts):
                total += 1
    return total


def backfill_end(
    start_ts: int | None = None,
    end_ts: int | None = None,
    *,
    setting: int | None = None,
    sources: Iterable[str] | None = None,
    data_dir: Path | None = None,
    tail_s: int = STREAMED_TAIL_S,
) -> int | None:
    """Where the backfill of a window [start_ts, end_ts) ends (epoch s): `setting` when given,
    else `tail_s` data seconds before the window's newest record, not before `start_ts`. None
    when the window holds no data."""
    if setting is not None:
        return setting
    newest = newest_ts(start_ts, end_ts, sources=sources, data_dir=data_dir)
    if newest is None:
        return None
    return newest - tail_s if start_ts is None else max(newest - tail_s, start_ts)


def newest_ts(
    start_ts: int | None = None,
    end_ts: int | None = None,
    *,
    sources: Iterable[str] | None = None,
    data_dir: Path | None = None,
) -> int | None:
    """The data time of the newest record in [start_ts, end_ts), from the manifest (`end_ts - 1`
    when the window cuts a file); None when the window holds no data."""
    newest = [
        min(e.last_ts, end_ts - 1) if end_ts is not None else e.last_ts
        for e in select_entries(load_manifest(data_dir), sources)
        if e.first_ts is not None and e.last_ts is not None
        and (end_ts is None or e.first_ts < end_ts)
        and (start_ts is None or e.last_ts >= start_ts)
    ]
    return max(newest, default=None)


class _Run:
    """State of one replay: pending batches, pacing anchor and stats.

    Order: points are buffered per source and flushed together, sources in the order their
    first pending point arrived; metadata is never buffered across a point, and a metadata
    record first flushes every pending point. Each series has one source at a time in the
    demo data, so per-series order is exact and global order is kept to within one batch.
    """

    def __init__(
        self,
        sink: PointSink,
        *,
        speed: float,
        batch_size: int,
        total: int,
        on_progress: Callable[[int, int], object] | None,
        stop: asyncio.Event | None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[object]],
        max_wait: float,
        backfill_until: int | None,
    ) -> None:
        self.sink = sink
        self.speed = speed
        self.backfill_until = backfill_until
        # True while the store answers nothing but duplicates (a restarted replay going over
        # what it already delivered): such data is not paced.
        self.catching_up = False
        self.batch_size = batch_size
        self.total = total
        self.on_progress = on_progress
        self.stop = stop
        self.clock = clock
        self.sleep = sleep
        self.max_wait = max_wait
        self.stats = ReplayStats()
        self.done = 0
        self.points: dict[str, list[dict[str, Any]]] = {}
        self.n_points = 0
        self.metas: list[ProtocolMeta] = []
        self.meta_key: tuple[int, str] | None = None
        self.tally: Tally[tuple[str, str]] = Tally()
        self.anchor: tuple[int, float] | None = None  # (data ts, wall time) pacing reference
        self.newest_ts: int | None = None

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run_pass(self, records: Iterator[Record]) -> None:
        self.done = 0
        self.anchor = None
        for rec in records:
            if self.stopping():
                break
            if self.paced(rec.ts):
                await self.pace(rec.ts)
                if self.stopping():
                    break
            else:
                self.anchor = None  # pacing starts afresh at the next paced record
            if isinstance(rec, PointRecord):
                await self.flush_metas()
                self.points.setdefault(rec.source, []).append(rec.as_raw())
                self.n_points += 1
                self.tally[rec.source, "point"] += 1
                self.stats.points += 1
            else:
                await self.flush_points()
                if self.meta_key != (rec.ts, rec.source):
                    await self.flush_metas()
                self.meta_key = (rec.ts, rec.source)
                self.metas.append(rec.meta)
                self.tally[rec.source, "protocol"] += 1
                self.stats.protocols += 1
            self.done += 1
            self.stats.records += 1
            self.newest_ts = rec.ts
            if self.stats.first_ts is None:
                self.stats.first_ts = rec.ts
            self.stats.last_ts = rec.ts if self.stats.last_ts is None else max(
                self.stats.last_ts, rec.ts)
            if self.n_points >= self.batch_size or len(self.metas) >= self.batch_size:
                await self.flush()
        await self.flush()
        self.progress()

    def paced(self, ts: int) -> bool:
        """Whether a record of data time `ts` waits for its time: not during the backfill, nor
        while catching up over stored data in the first pass (in later passes of a loop
        everything is stored, and full speed would spin)."""
        if self.speed == 0 or (self.catching_up and self.stats.passes == 1):
            return False
        return self.backfill_until is None or ts >= self.backfill_until

    async def pace(self, ts: int) -> None:
        """Wait until `ts` is due: data seconds / speed after the anchor, in wall seconds."""
        now = self.clock()
        if self.anchor is None:
            self.anchor = (ts, now)
            return
        due = self.anchor[1] + (ts - self.anchor[0]) / self.speed
        wait = due - now
        if wait < -self.max_wait:
            # The sink is slower than the requested speed: re-anchor instead of bursting to
            # catch up, so a slow store slows the replay down rather than flooding it.
            self.anchor = (ts, now)
            return
        if wait < _GRANULARITY:
            return
        # Subscribers should see everything up to now before we idle.
        await self.flush()
        if not self.paced(ts):
            return  # the store answered duplicates only: catching up, no wait
        capped = wait > self.max_wait
        slept = min(wait, self.max_wait)
        health.beat("replay", idle_s=slept)
        await self.sleep(slept)
        WAITED.inc(slept)
        if capped:
            self.stats.gaps_capped += 1
            GAPS.inc()
            self.anchor = (ts, self.clock())

    async def flush(self) -> None:
        await self.flush_points()
        await self.flush_metas()
        health.beat("replay")
        if self.speed == 0:
            await asyncio.sleep(0)  # let other tasks run between batches at full speed

    async def flush_points(self) -> None:
        if not self.points:
            return
        batches, self.points, self.n_points = self.points, {}, 0
        accepted = duplicates = 0
        for source, raw in batches.items():
            result = await self.deliver(partial(self.sink.ingest_points, raw, source=source))
            if result is None:
                return  # stopped while the store was unreachable
            accepted += result.accepted
            duplicates += len(result.duplicates)
            self.stats.accepted += result.accepted
            self.stats.duplicates += len(result.duplicates)
            self.stats.rejected += len(result.rejected)
            self.stats.batches += 1
            if result.rejected:
                first = result.rejected[0]
                log.info("replay.rejected", source=source, count=len(result.rejected),
                         first_field=first.field, first_reason=first.reason)
        self.catching_up = accepted == 0 and duplicates > 0
        self.after_flush()

    async def flush_metas(self) -> None:
        if not self.metas or self.meta_key is None:
            return
        (ts, source), metas = self.meta_key, self.metas
        self.metas, self.meta_key = [], None
        changes = await self.deliver(partial(self.sink.ingest_protocols, metas, ts=ts,
                                             source=source))
        self.stats.protocol_changes += changes or 0
        self.stats.batches += 1
        self.after_flush()

    async def deliver(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()` into the sink, retried with `Backoff` (0.5 s doubling to 30 s) while the
        store is unreachable; None when `stop` is set before it succeeded."""
        delay: float | None = None
        while True:
            try:
                return await call()
            except _RETRYABLE as exc:
                RETRIES.inc()
                delay = Backoff().delay(delay)
                log.warning("replay.sink_failed", error=str(exc), error_type=type(exc).__name__,
                            retry_in_s=delay)
                health.beat("replay", error=str(exc), idle_s=delay)
                await self.rest(delay)
                if self.stopping():
                    return None

    async def rest(self, seconds: float) -> None:
        """Sleep `seconds` (with the injected sleep), cut short when `stop` is set."""
        if self.stop is None:
            await self.sleep(seconds)
            return
        sleeping = asyncio.ensure_future(self.sleep(seconds))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            stopping.cancel()

    def after_flush(self) -> None:
        for (source, kind), n in self.tally.items():
            RECORDS.labels(source, kind).inc(n)
        self.tally.clear()
        if self.newest_ts is not None:
            DATA_TS.set(self.newest_ts)
        self.progress()

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)


async def replay(
    sink: PointSink,
    *,
    speed: float,
    sources: Iterable[str] | None = None,
    start_ts: int | None = None,
    end_ts: int | None = None,
    backfill_until: int | None = None,
    batch_size: int = 2000,
    loop: bool = False,
    on_progress: Callable[[int, int], object] | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    data_dir: Path | None = None,
    max_wait: float = MAX_WAIT,
) -> ReplayStats:
    """Push the demo records into `sink` in time order: a backfill at full speed, then paced
    by data time.

    Args:
        sink: where points and protocol metadata go (the ingest service).
        speed: data seconds per wall second (86400 = one day of data per second); 0 = as fast
            as possible. A single wait never exceeds `max_wait` wall seconds, so long gaps in
            the data play as `max_wait`.
        sources: file or source names to replay (see `select_entries`); None = all.
        start_ts, end_ts: data-time window [start_ts, end_ts) in epoch seconds; None = open.
        backfill_until: records before this data time (epoch s) are delivered at full speed,
            later ones paced (see `backfill_end`); None = pace from the start.
            Records the store answers only duplicates for are never paced in the first pass.
        batch_size: points per `ingest_points` call (at most; pacing flushes earlier).
        loop: start again when the data ends, until `stop` is set. The sink deduplicates per
            (series, ts), so later passes only re-add what the store no longer holds.
        on_progress: called with (records done in this pass, records per pass) after each
            batch and at the end of a pass.
        stop: when set, pending points are flushed and the replay returns (within one wait,
            at most `max_wait` seconds, also while retrying an unreachable store).
        clock, sleep: monotonic seconds and the sleep used for pacing and retry backoff;
            injectable for tests.
        data_dir: another folder in the demo format (default: the bundled data).
        max_wait: cap on one pacing wait, wall seconds.

    Returns:
        ReplayStats of all passes.

    Raises:
        ValidationError: a negative or non-finite speed, batch_size < 1, or an unknown source.
    """
    if not math.isfinite(speed) or speed < 0:
        raise ValidationError(f"speed must be >= 0 (data s per wall s), got {speed}", field="speed")
    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    selected = [e.file for e in select_entries(load_manifest(data_dir), sources)]
    # A file cut by the window is counted by reading it: off the loop, other roles run on it.
    total = await asyncio.to_thread(count_records, data_dir, selected, start_ts, end_ts)
    run = _Run(
        sink, speed=speed, batch_size=batch_size, total=total, on_progress=on_progress,
        stop=stop, clock=clock, sleep=sleep, max_wait=max_wait, backfill_until=backfill_until,
    )
    log.info("replay.started", files=selected, records=total, speed=speed,
             start_ts=start_ts, end_ts=end_ts, backfill_until=backfill_until, loop=loop)
    started = clock()
    while True:
        run.stats.passes += 1
        with contextlib.closing(iter_records(data_dir, selected, start_ts, end_ts)) as records:
            await run.run_pass(records)
        if run.stopping():
            run.stats.stopped = True
            break
        if not loop or total == 0:
            break
        log.info("replay.looping", passes=run.stats.passes)
    stats = run.stats
    stats.wall_seconds = clock() - started
    log.info("replay.finished", records=stats.records, accepted=stats.accepted,
             duplicates=stats.duplicates, rejected=stats.rejected,
             protocol_changes=stats.protocol_changes, first_ts=stats.first_ts,
             last_ts=stats.last_ts, wall_seconds=round(stats.wall_seconds, 3),
             passes=stats.passes, stopped=stats.stopped)
    return stats
