"""The query service: parse, compile, run under limits, and cache answers that stay fresh.

Order of one request (`cached`):

1. Look the answer up in the result cache (Redis or in-process).
2. Probe change_log in one statement (freshness.py): the current watermark, whether anything
   the answer depends on changed after the entry's watermark, and whether the read model is
   behind. Unchanged: serve the entry (a hit), re-stamped with the new watermark when the log
   moved on for unrelated reasons, so later probes scan less.
3. Otherwise (a miss): end the probe's transaction (a SQLite read transaction would keep its old
   snapshot), bring the read model up to date if the answer reads it, run the statement
   read-only under the statement timeout, and store the answer with the watermark from step 2,
   which was taken before any of its data was read.

The guarantee, proved by tests/query/test_freshness.py: an answer served from the cache is
never older than a change_log row committed before the request began. Concurrent misses of one
key in a process wait for the first computation and then re-check instead of all running it;
a waiter never takes that result without its own probe.

Paging the `protocols` dataset (tests/query/test_snapshot_pages.py): its rows change in place
(a tvl moves, a protocol appears), so keyset pages alone could show a row twice or never. When
a first page has more rows than `limit`, the whole ordered result (at most
`snapshot_max_rows` rows) is computed in that one read and stored in the result cache under a
random snapshot id (`snap:{query digest}:{id}`, for `snapshot_ttl_s`); the cursor names the
snapshot and an offset, and later pages are slices of it, served without touching the
database. A cursor whose snapshot is gone is refused (CursorExpiredError, 410): the client
starts again from the first page. A first page served from the cache renews its snapshot's
lifetime (the answer was just proved current), or is recomputed when the snapshot is gone, so
a cached first page never hands out a dead cursor. History datasets page by keyset with a pin
(compile.py) and need no snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import io
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import RowMapping, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from defiwatch.errors import BackendUnavailable, ValidationError
from defiwatch.query.cache import CacheEntry, ResultCache
from defiwatch.query.compile import Compiled, compile_query, sort_columns
from defiwatch.query.cursor import Cursor, SnapshotRef, decode_cursor, encode_cursor
from defiwatch.query.dsl import Limits, OutputColumn, Query, Scalar, parse_query
from defiwatch.query.fields import FieldType
from defiwatch.query.freshness import Deps, Probe, probe, same_position
from defiwatch.query.index import ReadModel
from defiwatch.store.db import read_retrying

__all__ = [
    "CACHE_ERRORS",
    "QUERIES",
    "QUERY_SECONDS",
    "REJECTED",
    "SNAPSHOT_MAX_ROWS",
    "SNAPSHOT_TTL_S",
    "Answer",
    "CursorExpiredError",
    "Page",
    "QueryService",
    "QueryTimeoutError",
]

log = structlog.get_logger(__name__)

QUERIES = Counter("defiwatch_query_requests_total",
                  "Answered queries by dataset (or compat route) and cache outcome",
                  ["dataset", "cache"])
QUERY_SECONDS = Histogram(
    "defiwatch_query_seconds", "Time to answer a query, by dataset and cache outcome",
    ["dataset", "cache"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REJECTED = Counter("defiwatch_query_rejected_total", "Queries refused, by reason",
                   ["reason"])
CACHE_ERRORS = Counter("defiwatch_query_cache_errors_total",
                       "Result cache operations that failed (the query was answered uncached)")

_PG_CANCELED = "57014"  # query_canceled: statement_timeout fired

# How long the pages of one `protocols` listing stay available after its first page (s), and
# the most rows one snapshot holds (beyond them, paging goes on by keyset, unpinned).
# Defaults of QueryService; DEFIWATCH_QUERY_SNAPSHOT_TTL_S sets the lifetime.
SNAPSHOT_TTL_S = 600.0
SNAPSHOT_MAX_ROWS = 25_000


class QueryTimeoutError(ValidationError):
    """The statement ran longer than DEFIWATCH_QUERY_STATEMENT_TIMEOUT_MS (HTTP 400)."""

    code = "query_timeout"


class CursorExpiredError(ValidationError):
    """The snapshot a cursor pages through is no longer stored (HTTP 410, field `cursor`):
    start again from the first page."""

    code = "cursor_expired"
    http_status = 410

    def __init__(self, ttl_s: float) -> None:
        super().__init__(
            f"the listing this cursor pages through has expired (pages are kept for "
            f"{ttl_s:g} s after the first page); send the query again without `cursor` to "
            "start from the first page", field="cursor")
        self.ttl_s = ttl_s


class Page(msgspec.Struct, array_like=True, frozen=True):
    """One page of an answer as cached: `data` is the JSON array of row objects.

    `snapshot`: the id of the stored snapshot `next_cursor` reads from (None: keyset cursor or
    last page).
    """

    data: bytes
    columns: list[str]
    count: int
    next_cursor: str | None
    as_of: int | None
    snapshot: str | None = None


class Snapshot(msgspec.Struct, array_like=True, frozen=True):
    """The full ordered result of a `protocols` query at its first page.

    `rows[i]` is row i as a JSON object and `stamps[i]` its as_of; `tail` holds the sort
    values of the last row when the result went on past SNAPSHOT_MAX_ROWS (paging continues
    by keyset from there), else None.
    """

    columns: list[str]
    rows: list[bytes]
    stamps: list[int | None]
    tail: list[Scalar] | None


class Answer(msgspec.Struct, frozen=True):
    page: Page
    cache: str  # "hit" or "miss"
    took_ms: float

    def json(self) -> bytes:
        meta = msgspec.json.encode({
            "count": self.page.count, "next_cursor": self.page.next_cursor,
            "as_of": self.page.as_of, "cache": self.cache, "took_ms": self.took_ms,
        })
        return b'{"data":' + self.page.data + b',"meta":' + meta + b"}"

    def csv(self) -> str:
        """The rows as CSV with a header. Lists are joined with ';'. Text cells that a
        spreadsheet would run as a formula (=, +, -, @, tab, CR first) get a leading quote
        (OWASP CSV injection)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.page.columns)
        for row in msgspec.json.decode(self.page.data):
            writer.writerow([_csv_cell(row.get(c)) for c in self.page.columns])
        return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        value = ";".join(str(v) for v in value)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot_key(identity: str, snapshot_id: str) -> str:
    # Under the query's digest: a forged snapshot id can only reach a snapshot of this query.
    return f"snap:{identity}:{snapshot_id}"


def _slice(snap: Snapshot, identity: str, snapshot_id: str, offset: int, limit: int) -> Page:
    """Rows [offset, offset + limit) of `snap`, with the cursor to the rows after them."""
    start = min(offset, len(snap.rows))
    end = min(start + limit, len(snap.rows))
    next_cursor = None
    ref = None
    if end < len(snap.rows):
        ref = snapshot_id
        next_cursor = encode_cursor(identity, None, [], SnapshotRef(snapshot_id, end))
    elif snap.tail is not None:
        next_cursor = encode_cursor(identity, None, snap.tail)
    stamps = [t for t in snap.stamps[start:end] if t is not None]
    return Page(b"[" + b",".join(snap.rows[start:end]) + b"]", snap.columns, end - start,
                next_cursor, max(stamps) if stamps else None, ref)


class QueryService:
    """Answers queries (and caches any JSON answer for the compat routes).

    Args:
        engine: the database.
        cache: where answers are kept; None disables caching.
        read_model: the protocol snapshot tables (refreshed on demand).
        limits: complexity ceilings for parse_query.
        statement_timeout_ms: per statement; exceeded = QueryTimeoutError (HTTP 400).
        cache_ttl_s: lifetime of cached answers (0 = do not cache).
        max_body_bytes: largest request body the route accepts.
        probe_engine: the pool for the per-request freshness probe (default: `engine`). A pool
            without pre-ping saves three round trips per cache hit on asyncpg (its ping is
            BEGIN, `;`, ROLLBACK); a connection found dead there is retried once on a new one.
        snapshot_ttl_s: how long the pages of a `protocols` listing stay available after its
            first page (0, or no `cache`: keyset paging only, unpinned).
        snapshot_max_rows: most rows one snapshot holds; paging goes on by keyset after them.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        cache: ResultCache | None,
        *,
        read_model: ReadModel | None = None,
        limits: Limits | None = None,
        statement_timeout_ms: int = 5_000,
        cache_ttl_s: float = 300.0,
        max_body_bytes: int = 65_536,
        probe_engine: AsyncEngine | None = None,
        snapshot_ttl_s: float = SNAPSHOT_TTL_S,
        snapshot_max_rows: int = SNAPSHOT_MAX_ROWS,
    ) -> None:
        self.engine = engine
        self._cache = cache
        self.read_model = read_model or ReadModel(engine)
        self.limits = limits or Limits()
        self._timeout_ms = statement_timeout_ms
        self._ttl = cache_ttl_s if cache is not None else 0.0
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._dialect = engine.dialect.name
        self.max_body_bytes = max_body_bytes
        self._probe_engine = probe_engine or engine
        self._snapshot_ttl = snapshot_ttl_s if cache is not None else 0.0
        self._snapshot_max = max(1, snapshot_max_rows)

    # -- the advanced query ------------------------------------------------------------------

    async def advanced(self, body: Any, *, use_cache: bool = True) -> Answer:
        """Parse and answer one POST /v1/query/advanced body.

        Raises:
            ValidationError: the body is invalid (field = JSON path), or the cursor is.
            CursorExpiredError: the cursor's snapshot is no longer stored.
            QueryTimeoutError: the statement hit the timeout.
            BackendUnavailable: the result cache failed while reading a snapshot page.
        """
        started = time.perf_counter()
        try:
            query = parse_query(body, self.limits)
            sort = sort_columns(query)
            identity = _digest(query.canonical(with_page=False))
            cursor = Cursor()
            if query.cursor is not None:
                cursor = decode_cursor(query.cursor, identity, sort)
        except ValidationError:
            REJECTED.labels("invalid").inc()
            raise
        spec = query.spec
        if cursor.snapshot is not None:
            page = await self._snapshot_page(query, identity, cursor.snapshot)
            self._observe(spec.name, "hit", started)
            return Answer(page, "hit", round((time.perf_counter() - started) * 1000, 3))
        uses_join = any(spec.fields[f].join for f in query.fields_used())
        deps = Deps(spec.metrics, spec.protocol_metadata or uses_join, query.time_from,
                    query.time_to)
        # Only a first page starts a snapshot; keyset cursors (past a snapshot's cap, or from
        # before snapshots existed) go on by keyset.
        snapshot = (spec.name == "protocols" and query.cursor is None and bool(sort)
                    and self._snapshot_ttl > 0)

        async def compute(conn: AsyncConnection) -> bytes:
            if snapshot:
                return await self._first_page(conn, query, identity)
            return await self._page(conn, query, identity, cursor.values if query.cursor
                                    else None, cursor.pin)

        key = "q:" + _digest(query.canonical())
        payload, hit = await self.cached(
            key, deps, index=spec.name == "protocols", compute=compute, use_cache=use_cache,
            label=spec.name, started=started)
        page = msgspec.msgpack.decode(payload, type=Page)
        if hit and page.snapshot is not None and not await self._renew(identity, page.snapshot):
            # The cached first page would hand out a cursor to a discarded snapshot.
            payload, hit = await self.cached(
                key, deps, index=True, compute=compute, use_cache=False, label=spec.name,
                started=started)
            page = msgspec.msgpack.decode(payload, type=Page)
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        return Answer(page, "hit" if hit else "miss", took_ms)

    async def _page(self, conn: AsyncConnection, query: Query, identity: str,
                    after: Sequence[Scalar] | None, pin: int | None) -> bytes:
        compiled = compile_query(query, self._dialect, after=after, pin=pin)
        rows = (await conn.execute(compiled.statement)).mappings().all()
        return self._encode_page(query, compiled, rows, identity, pin)

    @staticmethod
    def _encode_page(query: Query, compiled: Compiled, rows: Sequence[RowMapping],
                     identity: str, pin: int | None) -> bytes:
        """One page from the rows of `compiled` (up to `query.limit + 1`: one more means a
        next page follows)."""
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        outputs = compiled.outputs
        data = [{c.name: _convert(r[f"c{i}"], c) for i, c in enumerate(outputs)} for r in rows]
        stamps = [int(r["as_of"]) for r in rows if r["as_of"] is not None]
        next_cursor = None
        if more and rows:
            last = rows[-1]
            values = [_sort_value(last[s.label], s.type) for s in compiled.sort]
            page_pin = pin if pin is not None else (
                int(last["pin"]) if compiled.pinnable and last["pin"] is not None else None)
            next_cursor = encode_cursor(identity, page_pin, values)
        page = Page(msgspec.json.encode(data), [c.name for c in outputs], len(data), next_cursor,
                    max(stamps) if stamps else None)
        return msgspec.msgpack.encode(page)

    # -- snapshot pages of the protocols dataset ---------------------------------------------

    async def _first_page(self, conn: AsyncConnection, query: Query, identity: str) -> bytes:
        """The first page of a `protocols` query; if more pages follow, the whole ordered
        result is stored as a snapshot that the next cursor reads from."""
        if query.limit >= self._snapshot_max:
            return await self._page(conn, query, identity, None, None)
        full = dataclasses.replace(query, limit=self._snapshot_max)
        compiled = compile_query(full, self._dialect)
        rows = (await conn.execute(compiled.statement)).mappings().all()
        if len(rows) <= query.limit:  # one page: nothing to pin, and these rows are the page
            return self._encode_page(query, compiled, rows, identity, None)
        tail = None
        if len(rows) > self._snapshot_max:
            rows = rows[: self._snapshot_max]
            tail = [_sort_value(rows[-1][s.label], s.type) for s in compiled.sort]
        outputs = compiled.outputs
        snap = Snapshot(
            [c.name for c in outputs],
            [msgspec.json.encode({c.name: _convert(r[f"c{i}"], c) for i, c in enumerate(outputs)})
             for r in rows],
            [None if r["as_of"] is None else int(r["as_of"]) for r in rows],
            tail)
        snapshot_id = secrets.token_urlsafe(12)
        if not await self._store(identity, snapshot_id, snap):
            # No place to keep it: keyset pages, as before snapshots (counted and logged).
            return await self._page(conn, query, identity, None, None)
        return msgspec.msgpack.encode(_slice(snap, identity, snapshot_id, 0, query.limit))

    async def _snapshot_page(self, query: Query, identity: str, ref: SnapshotRef) -> Page:
        raw = None
        if self._cache is not None:
            try:
                raw = await self._cache.get(_snapshot_key(identity, ref.id))
            except BackendUnavailable as exc:
                # Unlike an answer, a snapshot cannot be recomputed: say "try again".
                CACHE_ERRORS.inc()
                log.warning("query.cache_unavailable", error=exc.message)
                raise
        if raw is None:
            REJECTED.labels("invalid").inc()
            raise CursorExpiredError(self._snapshot_ttl)
        snap = msgspec.msgpack.decode(raw, type=Snapshot)
        return _slice(snap, identity, ref.id, ref.offset, query.limit)

    async def _store(self, identity: str, snapshot_id: str, snap: Snapshot) -> bool:
        assert self._cache is not None
        try:
            await self._cache.put(_snapshot_key(identity, snapshot_id),
                                  msgspec.msgpack.encode(snap), self._snapshot_ttl)
        except BackendUnavailable as exc:
            CACHE_ERRORS.inc()
            log.warning("query.cache_unavailable", error=exc.message)
            return False
        return True

    async def _renew(self, identity: str, snapshot_id: str) -> bool:
        """Give a snapshot a full lifetime again; False if it is gone (or unreachable)."""
        if self._cache is None:
            return False
        try:
            return await self._cache.touch(_snapshot_key(identity, snapshot_id),
                                           self._snapshot_ttl)
        except BackendUnavailable as exc:
            CACHE_ERRORS.inc()
            log.warning("query.cache_unavailable", error=exc.message)
            return False

    # -- caching any answer ------------------------------------------------------------------

    async def cached(
        self,
        key: str,
        deps: Deps,
        *,
        index: bool,
        compute: Callable[[AsyncConnection], Awaitable[bytes]],
        use_cache: bool = True,
        label: str,
        started: float | None = None,
    ) -> tuple[bytes, bool]:
        """The answer under `key`: from the cache if nothing in `deps` changed since it was
        computed, else from `compute` (run read-only under the statement timeout).

        Args:
            key: identifies the answer (hash of the normalised request).
            deps: what the answer depends on (for the freshness probe).
            index: the answer reads the read model (refresh it first when behind).
            use_cache: False = skip the lookup (the answer is still stored).
            label: the dataset or route, for metrics.

        Returns:
            (payload, True if it came from the cache).
        """
        started = time.perf_counter() if started is None else started
        use_cache = use_cache and self._ttl > 0
        for attempt in range(2):
            raw = await self._cache_get(key) if use_cache else None
            entry = msgspec.msgpack.decode(raw, type=CacheEntry) if raw is not None else None
            # At most one pooled connection per request at any time (a refresh takes its own),
            # so a burst of misses cannot starve the pool.
            state = await self._probe(entry.watermark if entry else None, deps, index)
            if entry is not None and not state.changed:
                # Re-store only when the position moved (saves a Redis SET per hit while
                # unrelated transactions advance the PostgreSQL snapshot's xmin/xmax).
                if not same_position(state.watermark, entry.watermark):
                    await self._cache_put(key, CacheEntry(state.watermark, entry.payload))
                self._observe(label, "hit", started)
                return entry.payload, True
            waiting = self._inflight.get(key)
            if waiting is not None and attempt == 0 and use_cache:
                await asyncio.shield(waiting)  # then re-check: its answer may predate ours
                continue
            payload = await self._compute(key, state.index_stale, compute,
                                          state.watermark)
            self._observe(label, "miss", started)
            return payload, False
        raise AssertionError("unreachable: the second attempt always returns")

    # The cache only saves work: when its backend fails, answer from the database (a miss)
    # rather than fail the request, and count it.
    async def _cache_get(self, key: str) -> bytes | None:
        if self._cache is None:
            return None
        try:
            return await self._cache.get(key)
        except BackendUnavailable as exc:
            CACHE_ERRORS.inc()
            log.warning("query.cache_unavailable", error=exc.message)
            return None

    async def _cache_put(self, key: str, entry: CacheEntry) -> None:
        if self._cache is None or self._ttl <= 0:
            return
        try:
            await self._cache.put(key, msgspec.msgpack.encode(entry), self._ttl)
        except BackendUnavailable as exc:
            CACHE_ERRORS.inc()
            log.warning("query.cache_unavailable", error=exc.message)

    async def _probe(self, since: str | None, deps: Deps, index: bool) -> Probe:
        # Autocommit: the probe is one statement, so no BEGIN/ROLLBACK round trips.
        return await read_retrying(
            self._probe_engine, lambda conn: probe(conn, since=since, deps=deps, index=index))

    async def _compute(self, key: str, refresh: bool,
                       compute: Callable[[AsyncConnection], Awaitable[bytes]],
                       watermark: str) -> bytes:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        try:
            if refresh:
                await self.read_model.refresh()
            async with self.engine.connect() as conn, self._guard(conn):
                payload = await compute(conn)
            await self._cache_put(key, CacheEntry(watermark, payload))
            return payload
        finally:
            if self._inflight.get(key) is done:
                del self._inflight[key]
            done.set_result(None)

    @contextlib.asynccontextmanager
    async def _guard(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """A read-only transaction with the statement timeout; timeouts become 400s."""
        try:
            if self._dialect == "postgresql":
                # One round trip: timeout, read-only (defence in depth: the SQL is ours, but a
                # read path has no business writing) and no JIT (its compile time dwarfs these
                # short queries), and room to sort a group-by over every protocol in memory.
                await conn.execute(text(
                    "SELECT set_config('statement_timeout', :t, true), "
                    "set_config('transaction_read_only', 'on', true), "
                    "set_config('jit', 'off', true), set_config('work_mem', '16MB', true)"),
                    {"t": f"{self._timeout_ms}ms"})
                yield
            else:
                async with _sqlite_deadline(conn, self._timeout_ms / 1000):
                    yield
        except DBAPIError as exc:
            if _is_timeout(exc):
                REJECTED.labels("timeout").inc()
                log.warning("query.timeout", timeout_ms=self._timeout_ms)
                raise QueryTimeoutError(
                    f"the query ran longer than {self._timeout_ms} ms; narrow the time range, "
                    "add filters or group less finely") from exc
            raise
        finally:
            await conn.rollback()

    @staticmethod
    def _observe(label: str, outcome: str, started: float) -> None:
        QUERIES.labels(label, outcome).inc()
        QUERY_SECONDS.labels(label, outcome).observe(time.perf_counter() - started)


def _is_timeout(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == _PG_CANCELED or getattr(orig, "pgcode", None) == (
            _PG_CANCELED):
        return True
    return "interrupted" in str(orig).lower()


@contextlib.asynccontextmanager
async def _sqlite_deadline(conn: AsyncConnection, seconds: float) -> AsyncIterator[None]:
    """SQLite has no statement timeout: a progress handler, called every 1,000 VM steps in the
    connection's thread, aborts the statement once the deadline passes ("interrupted")."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    deadline = time.monotonic() + seconds

    def past_deadline() -> int:
        return 1 if time.monotonic() > deadline else 0

    await driver.set_progress_handler(past_deadline, 1_000)
    try:
        yield
    finally:
        await driver.set_progress_handler(None, 0)


def _convert(value: Any, col: OutputColumn) -> Any:
    if value is None:
        return None
    if col.type == FieldType.NUMBER:
        return float(value)
    if col.type == FieldType.INTEGER:
        return int(value)
    if col.type == FieldType.LIST:
        return list(value) if isinstance(value, list | tuple) else msgspec.json.decode(value)
    return str(value)


def _sort_value(value: Any, ftype: FieldType) -> Scalar:
    if value is None:
        return None
    if ftype == FieldType.INTEGER:
        return int(value)
    if ftype == FieldType.NUMBER:
        return float(value)
    return str(value)
