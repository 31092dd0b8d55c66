"""The bundled demo data and its replay: real files, a collecting sink, a fake clock for pacing;
then into the real store, where a restart catches up and an unready store is retried."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from conftest import require_real_data
from defiwatch.config import Settings
from defiwatch.domain import (
    NO_CHAIN,
    Point,
    ProtocolMeta,
    diff_protocol,
    normalize_chain,
    normalize_subject,
    validate_point,
)
from defiwatch.errors import ValidationError
from defiwatch.ingest.base import IngestResult
from defiwatch.ingest.replay import (
    DEMO_DIR,
    STREAMED_TAIL_S,
    PointRecord,
    ProtocolRecord,
    backfill_end,
    count_records,
    iter_records,
    load_manifest,
    newest_ts,
    replay,
)
from defiwatch.ingest.service import IngestService
from defiwatch.store import create_engine, upgrade

REPO = Path(__file__).resolve().parents[2]
DAY = 86_400


def utc(year: int, month: int, day: int) -> int:
    return int(dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp())


class Sink:
    """Records each push in order: ("p", source, points) or ("m", source, ts, metas)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def ingest_points(self, raw: Sequence[Mapping[str, Any]], *, source: str) -> IngestResult:
        self.calls.append(("p", source, [dict(r) for r in raw]))
        return IngestResult(accepted=len(raw))

    async def ingest_protocols(self, metas: Sequence[ProtocolMeta], *, ts: int, source: str) -> int:
        self.calls.append(("m", source, ts, list(metas)))
        return len(metas)

    def flat(self) -> list[tuple[Any, ...]]:
        """Every delivered record as a comparable tuple, in delivery order."""
        out: list[tuple[Any, ...]] = []
        for call in self.calls:
            if call[0] == "p":
                out += [(p["ts"], call[1], p["metric"], p["subject"], p["chain"], p["value"])
                        for p in call[2]]
            else:
                out += [(call[2], call[1], m) for m in call[3]]
        return out


class FakeTime:
    """Monotonic clock that only moves when the replay sleeps."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.points_at_sleep: list[int] = []
        self.sink = sink

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.sink is not None:
            self.points_at_sleep.append(len(self.sink.flat()))
        self.now += seconds


def as_tuple(rec: PointRecord | ProtocolRecord) -> tuple[Any, ...]:
    if isinstance(rec, PointRecord):
        return (rec.ts, rec.source, rec.metric, rec.subject, rec.chain, rec.value)
    return (rec.ts, rec.source, rec.meta)


def file_rows(name: str) -> list[list[Any]]:
    with gzip.open(DEMO_DIR / name, "rb") as fh:
        return [msgspec.json.decode(line) for line in fh]


def row_ts(row: list[Any]) -> int:
    return int(row[4] if row[0] == "p" else row[1])


# --- the data files -------------------------------------------------------------------------

def test_manifest_matches_files_and_each_file_is_sorted() -> None:
    manifest = load_manifest()
    assert manifest.generated_by == "scripts/build_demo_data.py"
    files = {p.name for p in DEMO_DIR.glob("*.jsonl.gz")}
    assert files == {e.file for e in manifest.sources}
    assert sum(e.bytes for e in manifest.sources) < 6_000_000
    for entry in manifest.sources:
        blob = (DEMO_DIR / entry.file).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry.sha256, entry.file
        lines = gzip.decompress(blob).splitlines()
        rows = [msgspec.json.decode(line) for line in lines]
        keys = [(row_ts(r), line) for r, line in zip(rows, lines, strict=True)]
        assert keys == sorted(keys), f"{entry.file} is not sorted by (ts, line)"
        assert len(set(lines)) == len(lines), f"{entry.file} has duplicate lines"
        assert (len(rows), keys[0][0], keys[-1][0]) == (entry.rows, entry.first_ts, entry.last_ts)
        assert entry.attribution and entry.origin and entry.description


def test_merged_iteration_is_in_ts_order_and_complete() -> None:
    total = 0
    last = 0
    for rec in iter_records():
        assert rec.ts >= last
        last = rec.ts
        total += 1
    assert total == count_records() == sum(e.rows for e in load_manifest().sources)


def test_every_point_passes_the_ingest_gate_unchanged() -> None:
    # The builder promises normalised data: validate_point (the gate of every source) must
    # neither reject nor rewrite any point; metadata slugs and chains are canonical too.
    now = time.time()
    for rec in iter_records():
        if isinstance(rec, PointRecord):
            point = validate_point(rec.as_raw(), index=0, now=now, source=rec.source)
            assert point == Point(rec.metric, rec.subject, rec.chain, rec.ts, rec.value,
                                  rec.source), rec
        else:
            assert normalize_subject("tvl", rec.meta.slug) == rec.meta.slug
            assert all(normalize_chain(c) == c for c in rec.meta.chains), rec


def test_window_counts_match_iteration() -> None:
    window: dict[str, Any] = {"start_ts": utc(2021, 11, 1), "end_ts": utc(2021, 12, 1)}
    recs = list(iter_records(**window))
    assert recs and all(window["start_ts"] <= r.ts < window["end_ts"] for r in recs)
    assert len(recs) == count_records(**window)


@pytest.mark.parametrize(
    ("file", "series", "listed", "value"),
    [
        # chain_tvl_history_all_chains_2018-06_2023-07.csv, row "2022-11-08 19:00:00" (EST), Tron
        ("defillama_chain_tvl_history.jsonl.gz", ("chain_tvl", "tron", "tron"),
         dt.date(2022, 11, 8), 4964448567.364199),
        # same file, row "2022-05-10 20:00:00" (EDT), Terra: the day of the UST collapse
        ("defillama_chain_tvl_history.jsonl.gz", ("chain_tvl", "terra", "terra"),
         dt.date(2022, 5, 10), 9235613721.670218),
        # protocol_uniswap_tvl_by_chain_2018-11_2023-07.csv, row "2022-03-13" (US DST day), Arbitrum
        ("defillama_uniswap_by_chain.jsonl.gz", ("tvl", "uniswap", "arbitrum"),
         dt.date(2022, 3, 13), 58361833.46332),
    ],
)
def test_new_york_dates_land_on_the_next_utc_midnight(
    file: str, series: tuple[str, str, str], listed: dt.date, value: float
) -> None:
    next_day = listed + dt.timedelta(days=1)
    ts = utc(next_day.year, next_day.month, next_day.day)
    found = {row[4]: row[5] for row in file_rows(file) if tuple(row[1:4]) == series}
    assert found[ts] == value
    assert found.get(ts - DAY) != value  # not left on the listed (local) date


def test_snapshot_plain_chains_sum_to_the_total() -> None:
    totals: dict[str, float] = {}
    plain: dict[str, float] = defaultdict(float)
    for row in file_rows("defillama_protocols_2024-03.jsonl.gz"):
        if row[0] == "p" and row[1] == "tvl":
            if row[3] == NO_CHAIN:
                totals[row[2]] = row[5]
            else:
                plain[row[2]] += row[5]
    assert len(totals) > 450
    ok = sum(1 for s, t in totals.items() if abs(plain[s] - t) <= max(1.0, 1e-6 * abs(t)))
    assert ok >= 0.99 * len(totals)


def test_snapshot_and_lite_snapshots_yield_protocol_updates() -> None:
    known: dict[str, ProtocolMeta] = {}
    changes = []
    for rec in iter_records(sources=["defillama_protocols_2024-03",
                                     "defillama_lite_protocols_2025-12"]):
        if isinstance(rec, ProtocolRecord):
            change = diff_protocol(known.get(rec.meta.slug), rec.meta)
            known[rec.meta.slug] = rec.meta
            if change is not None and not change.new:
                changes.append(change)
    assert any(c.category for c in changes)
    assert any(c.chains_added or c.chains_removed for c in changes)
    assert not any(c.listed_at for c in changes)  # lite lacks listedAt: carried, not dropped


def test_one_source_per_price_series_at_a_time() -> None:
    by_source: dict[str, list[int]] = defaultdict(list)
    for rec in iter_records(sources=["coingecko", "coinbase", "coinmarketcap"]):
        if isinstance(rec, PointRecord) and rec.metric == "price" \
                and rec.subject == "coingecko:ethereum":
            by_source[rec.source].append(rec.ts)
    cg, cb, cmc = by_source["coingecko"], by_source["coinbase"], by_source["coinmarketcap"]
    assert max(cg) == utc(2021, 11, 12) < min(cb) == utc(2021, 11, 13)
    lo, hi = min(cmc), max(cmc)
    assert not [ts for ts in cg if lo <= ts <= hi]
    assert len(cmc) > 100_000  # the whole 5-minute year


# --- replay ---------------------------------------------------------------------------------

async def test_replay_at_full_speed_delivers_every_record_once_in_order() -> None:
    window: dict[str, Any] = {"start_ts": utc(2021, 10, 1), "end_ts": utc(2021, 12, 1)}
    sink = Sink()
    progress: list[tuple[int, int]] = []
    stats = await replay(sink, speed=0, batch_size=97,
                         on_progress=lambda d, t: progress.append((d, t)),
                         **window)
    expected = [as_tuple(r) for r in iter_records(**window)]
    got = sink.flat()
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    assert len(got) == len(set(got)) == stats.records == stats.points == stats.accepted
    # Per series, time order is exact; globally, a flush never goes back more than one batch.
    newest: dict[tuple[Any, ...], int] = {}
    for ts, _source, *series, _value in got:
        assert ts > newest.get(tuple(series), -1)
        newest[tuple(series)] = ts
    for call in sink.calls:
        assert [p["ts"] for p in call[2]] == sorted(p["ts"] for p in call[2])
    assert progress[-1] == (len(expected), len(expected))
    assert (stats.first_ts, stats.last_ts) == (expected[0][0], expected[-1][0])
    assert not stats.stopped and stats.passes == 1


async def test_single_source_replay_is_exactly_the_merged_order() -> None:
    args: dict[str, Any] = {"sources": ["defillama"], "start_ts": utc(2025, 12, 1)}
    sink = Sink()
    await replay(sink, speed=0, batch_size=50, **args)
    assert sink.flat() == [as_tuple(r) for r in iter_records(**args)]


async def test_protocol_metadata_is_flushed_in_order_with_points() -> None:
    sink = Sink()
    stats = await replay(sink, speed=0, batch_size=10_000,
                         sources=["defillama_protocols_2024-03",
                                  "defillama_protocols_2024-03_derived"])
    kinds = [(c[0], c[1]) for c in sink.calls]
    # derived references (ts-7d, ts-1d), then the snapshot's metadata, then its points
    assert kinds == [("p", "defillama-snapshot-derived"), ("m", "defillama"), ("p", "defillama")]
    snapshot_ts = sink.calls[1][2]
    assert max(p["ts"] for p in sink.calls[0][2]) < snapshot_ts
    assert {p["ts"] for p in sink.calls[2][2]} == {snapshot_ts}
    assert stats.protocol_changes == stats.protocols == 500


async def test_metadata_never_overtakes_points_across_lite_snapshots() -> None:
    sink = Sink()
    await replay(sink, speed=0, batch_size=10_000, sources=["defillama"],
                 start_ts=utc(2025, 12, 1))
    seen_ts: list[int] = []
    meta_calls = 0
    for call in sink.calls:
        if call[0] == "m":
            meta_calls += 1
            assert all(ts <= call[2] for ts in seen_ts)  # everything earlier was pushed first
            seen_ts.append(call[2])
        else:
            assert min(p["ts"] for p in call[2]) >= max(seen_ts, default=0)
            seen_ts += [p["ts"] for p in call[2]]
    assert meta_calls == 3  # one call per lite snapshot


async def test_pacing_waits_a_second_per_day_at_speed_86400() -> None:
    sink = Sink()
    fake = FakeTime(sink)
    stats = await replay(sink, speed=86_400, sources=["defillama_chain_tvl_6chains"],
                         start_ts=utc(2022, 1, 1), end_ts=utc(2022, 1, 3),
                         clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == [pytest.approx(1.0)]
    assert fake.points_at_sleep == [6]  # the first day's 6 chains were pushed before waiting
    assert stats.records == 12 and stats.gaps_capped == 0
    assert stats.wall_seconds == pytest.approx(1.0)


async def test_the_backfill_is_not_paced_and_what_follows_is() -> None:
    sink = Sink()
    fake = FakeTime(sink)
    stats = await replay(sink, speed=86_400, sources=["defillama_chain_tvl_6chains"],
                         start_ts=utc(2022, 1, 1), end_ts=utc(2022, 1, 6),
                         backfill_until=utc(2022, 1, 4), clock=fake.clock, sleep=fake.sleep)
    # Days 1-3 go at once; day 4 anchors the pacing; day 5 waits one second for its time.
    assert fake.sleeps == [pytest.approx(1.0)]
    assert fake.points_at_sleep == [4 * 6]
    assert stats.records == 5 * 6


def test_the_default_backfill_ends_a_month_before_the_newest_data() -> None:
    newest = max(e.last_ts for e in load_manifest().sources if e.last_ts is not None)
    assert newest_ts() == newest
    assert backfill_end() == newest - STREAMED_TAIL_S == backfill_end(utc(2020, 1, 1))
    # A window ending earlier: a month before its own end; a short window: not before it.
    assert backfill_end(None, utc(2022, 1, 1)) == utc(2022, 1, 1) - 1 - STREAMED_TAIL_S
    assert backfill_end(utc(2021, 12, 25), utc(2022, 1, 1)) == utc(2021, 12, 25)
    assert backfill_end(setting=utc(2021, 1, 1)) == utc(2021, 1, 1)
    assert backfill_end(utc(2030, 1, 1)) is None and newest_ts(utc(2030, 1, 1)) is None


async def test_a_long_gap_is_capped() -> None:
    fake = FakeTime()
    # derived ts-7d, ts-1d, snapshot ts: waits of 6 days (capped) and 1 day
    stats = await replay(Sink(), speed=86_400,
                         sources=["defillama_protocols_2024-03_derived",
                                  "defillama_protocols_2024-03"],
                         clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]
    assert stats.gaps_capped == 1


async def test_stop_during_a_wait_ends_the_replay() -> None:
    stop = asyncio.Event()
    sink = Sink()

    async def sleep_then_stop(seconds: float) -> None:
        stop.set()

    stats = await replay(sink, speed=86_400, sources=["defillama_chain_tvl_6chains"],
                         start_ts=utc(2022, 1, 1), stop=stop, sleep=sleep_then_stop)
    assert stats.stopped and stats.records == 6 == len(sink.flat())


async def test_stop_from_progress_flushes_and_returns() -> None:
    stop = asyncio.Event()
    sink = Sink()
    stats = await replay(sink, speed=0, sources=["coinmarketcap"], batch_size=500,
                         on_progress=lambda done, total: stop.set(), stop=stop)
    assert stats.stopped and stats.records == 500 == len(sink.flat())


async def test_loop_replays_again_until_stopped() -> None:
    stop = asyncio.Event()
    sink = Sink()
    window: dict[str, Any] = {"sources": ["coinbase"], "start_ts": utc(2025, 7, 1)}
    per_pass = count_records(**window)

    def progress(done: int, total: int) -> None:
        if len(sink.flat()) >= 2 * total:
            stop.set()

    stats = await replay(sink, speed=0, loop=True, stop=stop, on_progress=progress,
                         **window)
    assert stats.passes == 2 and stats.records == 2 * per_pass and stats.stopped


async def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        await replay(Sink(), speed=0, sources=["nope"])
    assert exc.value.field == "sources"
    with pytest.raises(ValidationError):
        await replay(Sink(), speed=-1)


def test_builder_reproduces_the_committed_files(tmp_path: Path) -> None:
    shared = require_real_data()
    subprocess.run([sys.executable, str(REPO / "scripts/build_demo_data.py"), str(shared),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for path in sorted(DEMO_DIR.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


# --- into the real store (SQLite and PostgreSQL): restarts and outages ---------------------

# Four days of the six chains' TVL: 24 points, one pacing wait per day after the first.
WINDOW: dict[str, Any] = {"sources": ["defillama_chain_tvl_6chains"],
                          "start_ts": utc(2022, 1, 1), "end_ts": utc(2022, 1, 5)}


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's empty database, not migrated: each test decides when."""
    engine = create_engine(settings.database_url)
    yield engine
    await engine.dispose()


async def test_a_restarted_replay_catches_up_without_pacing(
    settings: Settings, engine: AsyncEngine
) -> None:
    await upgrade(settings.database_url)
    first, again = FakeTime(), FakeTime()
    stats = await replay(IngestService(engine), speed=86_400, clock=first.clock,
                         sleep=first.sleep, **WINDOW)
    assert stats.accepted == count_records(**WINDOW) == 24
    assert len(first.sleeps) == 3  # paced: a second per day of data
    stats = await replay(IngestService(engine), speed=86_400, clock=again.clock,
                         sleep=again.sleep, **WINDOW)
    assert again.sleeps == []  # all stored already: nothing waits
    assert (stats.accepted, stats.duplicates) == (0, 24)


async def test_an_unmigrated_store_is_retried_until_it_is_ready(
    settings: Settings, engine: AsyncEngine
) -> None:
    backoffs: list[float] = []

    async def migrate_while_backing_off(seconds: float) -> None:
        # The replay's first backoff: another process finishes migrating meanwhile.
        backoffs.append(seconds)
        await upgrade(settings.database_url)

    with capture_logs() as logs:
        stats = await replay(IngestService(engine), speed=0, sleep=migrate_while_backing_off,
                             **WINDOW)
    assert backoffs == [0.5]
    assert stats.accepted == 24 and not stats.stopped
    failed = [e for e in logs if e["event"] == "replay.sink_failed"]
    assert len(failed) == 1 and failed[0]["retry_in_s"] == 0.5
    assert "points" in failed[0]["error"]  # the database's own text: no such table / relation
