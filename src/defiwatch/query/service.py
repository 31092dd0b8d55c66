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
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from defiwatch.errors import BackendUnavailable, ValidationError
from defiwatch.query.cache import CacheEntry, ResultCache
from defiwatch.query.compile import compile_query, sort_columns
from defiwatch.query.cursor import decode_cursor, encode_cursor
from defiwatch.query.dsl import Limits, OutputColumn, Query, Scalar, parse_query
from defiwatch.query.fields import FieldType
from defiwatch.query.freshness import Deps, Probe, probe
from defiwatch.query.index import ReadModel

__all__ = [
    "CACHE_ERRORS",
    "QUERIES",
    "QUERY_SECONDS",
    "REJECTED",
    "Answer",
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


class QueryTimeoutError(ValidationError):
    """The statement ran longer than DEFIWATCH_QUERY_STATEMENT_TIMEOUT_MS (HTTP 400)."""

    code = "query_timeout"


class Page(msgspec.Struct, array_like=True, frozen=True):
    """One page of an answer as cached: `data` is the JSON array of row objects."""

    data: bytes
    columns: list[str]
    count: int
    next_cursor: str | None
    as_of: int | None


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

    # -- the advanced query ------------------------------------------------------------------

    async def advanced(self, body: Any, *, use_cache: bool = True) -> Answer:
        """Parse and answer one POST /v1/query/advanced body.

        Raises:
            ValidationError: the body is invalid (field = JSON path), or the cursor is.
            QueryTimeoutError: the statement hit the timeout.
        """
        started = time.perf_counter()
        try:
            query = parse_query(body, self.limits)
            sort = sort_columns(query)
            identity = _digest(query.canonical(with_page=False))
            after: list[Scalar] | None = None
            pin: int | None = None
            if query.cursor is not None:
                after, pin = decode_cursor(query.cursor, identity, sort)
        except ValidationError:
            REJECTED.labels("invalid").inc()
            raise
        spec = query.spec
        uses_join = any(spec.fields[f].join for f in query.fields_used())
        deps = Deps(spec.metrics, spec.protocol_metadata or uses_join, query.time_from,
                    query.time_to)

        async def compute(conn: AsyncConnection) -> bytes:
            return await self._page(conn, query, identity, after, pin)

        payload, hit = await self.cached(
            "q:" + _digest(query.canonical()), deps, index=spec.name == "protocols",
            compute=compute, use_cache=use_cache, label=spec.name, started=started)
        page = msgspec.msgpack.decode(payload, type=Page)
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        return Answer(page, "hit" if hit else "miss", took_ms)

    async def _page(self, conn: AsyncConnection, query: Query, identity: str,
                    after: Sequence[Scalar] | None, pin: int | None) -> bytes:
        compiled = compile_query(query, self._dialect, after=after, pin=pin)
        rows = (await conn.execute(compiled.statement)).mappings().all()
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
                if state.watermark != entry.watermark:
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
        for attempt in (1, 2):
            try:
                # Autocommit: the probe is one statement, so no BEGIN/ROLLBACK round trips.
                async with self._probe_engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    return await probe(conn, since=since, deps=deps, index=index)
            except DBAPIError as exc:
                if not exc.connection_invalidated or attempt == 2:
                    raise
        raise AssertionError("unreachable")

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
                # short queries).
                await conn.execute(text(
                    "SELECT set_config('statement_timeout', :t, true), "
                    "set_config('transaction_read_only', 'on', true), "
                    "set_config('jit', 'off', true)"), {"t": f"{self._timeout_ms}ms"})
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
