"""DefiLlama live poller: `/protocols` TVL and current coin prices, pushed into the ingest service.

Two layers, kept apart so the parsing can be tested with values alone:

- `parse_protocols` and `parse_prices` are pure: a decoded response in, protocol metadata and raw
  points out. They never raise for a bad entry; they skip it and count why in `skipped`.
- `DefiLlamaPoller` is the I/O shell: it fetches both endpoints with bounded retries and pushes
  what it got into a `PointSink` (which validates every point again; we do not trust ourselves
  to be the only gate).

Endpoints (DefiLlama API docs, https://defillama.com/docs/api):
- `GET {api}/protocols`: every protocol with `tvl` (the default TVL, which excludes the
  `staking`/`pool2`/`borrowed`/... sub-keys) and `chainTvls` (per chain, plus those sub-keys).
- `GET {coins}/prices/current/{coins}`: `coins` is a comma-separated list of `{chain}:{address}`
  or `coingecko:{id}` ids; the answer is `{"coins": {id: {price, symbol, timestamp, confidence}}}`.
"""

from __future__ import annotations

import ast
import asyncio
import email.utils
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Final, TypedDict

import httpx
import structlog
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram

from defiwatch import __version__
from defiwatch.domain import (
    NO_CHAIN,
    ProtocolMeta,
    normalize_chain,
    normalize_subject,
    split_chain_tvl_key,
)
from defiwatch.ingest.base import PointSink
from defiwatch.ops import health

__all__ = [
    "SOURCE",
    "USER_AGENT",
    "DefiLlamaPoller",
    "PollReport",
    "RawPoint",
    "backoff_delay",
    "parse_prices",
    "parse_protocols",
    "parse_retry_after",
]

log = structlog.get_logger(__name__)

SOURCE: Final = "defillama"
USER_AGENT: Final = f"defiwatch/{__version__} (DeFi analytics poller; python-httpx)"

REQUESTS = PromCounter(
    "defiwatch_poller_requests_total",
    "HTTP requests made by the DefiLlama poller, by endpoint and HTTP status "
    "(or timeout/network_error)",
    ["endpoint", "status"],
)
REQUEST_SECONDS = Histogram(
    "defiwatch_poller_request_seconds",
    "Duration of one DefiLlama request including the body download, seconds",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
POINTS = PromCounter(
    "defiwatch_poller_points_total",
    "Points the DefiLlama poller pushed into ingest, by endpoint",
    ["endpoint"],
)
SKIPPED = PromCounter(
    "defiwatch_poller_skipped_total",
    "Entries of DefiLlama responses the poller could not use, by reason",
    ["endpoint", "reason"],
)

# Upper bound on a repr string we feed to the literal parser (the biggest real chainTvls is a
# few KB); beyond it the parse cost and recursion depth are not worth the risk.
_MAX_LITERAL_CHARS = 1_000_000

# Bare names that appear in Python-repr dumps (pandas writes `nan`) or JSON-ish text, mapped to
# the constants `ast.literal_eval` would not accept on its own.
_LITERAL_NAMES: Final[dict[str, Any]] = {
    "nan": math.nan, "NaN": math.nan, "inf": math.inf, "Infinity": math.inf,
    "null": None, "true": True, "false": False,
}


class RawPoint(TypedDict):
    """One observed value as the ingest service takes it (it validates and normalises again)."""

    metric: str
    subject: str
    chain: str
    ts: int
    value: float


# --------------------------------------------------------------------------------------------
# Pure parsing
# --------------------------------------------------------------------------------------------


class _LiteralNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _LITERAL_NAMES:
            return ast.copy_location(ast.Constant(_LITERAL_NAMES[node.id]), node)
        return node  # literal_eval rejects it below


def _literal(text: str) -> Any:
    """Parse a Python-repr (or JSON-ish) literal safely; raise ValueError when it is not one.

    Some dumps of `/protocols` went through pandas and hold `chains`, `chainTvls`, ... as repr
    strings (`"{'Ethereum': 1.0}"`). `ast.literal_eval` only builds literals, so untrusted text
    cannot run code (never `eval`); the transformer lets `nan`/`null` through as constants.
    """
    if len(text) > _MAX_LITERAL_CHARS:
        raise ValueError("literal too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
        return ast.literal_eval(_LiteralNames().visit(tree).body)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a literal: {exc}") from exc


def _structured(value: Any, kind: type[Any]) -> Any:
    """`value` as a `kind` (list or dict), decoding a repr string; None when it is not one."""
    if isinstance(value, str):
        try:
            value = _literal(value)
        except ValueError:
            return None
    return value if isinstance(value, kind) else None


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, infinities, booleans and non-numeric text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if value and value != "-" else None  # DefiLlama writes "-" for "no symbol"


def _meta(item: Mapping[str, Any], slug: str, chains: Iterable[str]) -> ProtocolMeta:
    listed = _number(item.get("listedAt"))
    return ProtocolMeta(
        slug=slug,
        name=_text(item.get("name")) or slug,
        category=_text(item.get("category")),
        chains=tuple(dict.fromkeys(c for c in (normalize_chain(x) for x in chains)
                                   if c != NO_CHAIN)),
        gecko_id=_text(item.get("gecko_id")),
        symbol=_text(item.get("symbol")),
        url=_text(item.get("url")),
        listed_at=int(listed) if listed is not None else None,
    )


def parse_protocols(
    payload: Any, *, ts: int, skipped: Counter[str] | None = None
) -> tuple[list[ProtocolMeta], list[RawPoint]]:
    """Turn a `GET /protocols` response into protocol metadata and TVL points observed at `ts`.

    Per protocol: a `tvl` point for the total (chain `-`), a `tvl` point per plain `chainTvls`
    key, and each sub-key (`Ethereum-borrowed`, bare `staking`, `-pool2`, ...) as its own metric
    through `split_chain_tvl_key`. Accepts the API's lists/dicts and repr-string dumps alike.

    Args:
        payload: the decoded response body (a list of protocol objects).
        ts: observation time, epoch seconds (the endpoint carries no timestamp of its own).
        skipped: if given, incremented by reason for every entry or value left out.

    Returns:
        `(metas, points)`; metas and points in response order, one point per series.

    Raises:
        ValueError: the payload is not a list at all (an error body, not a bad entry).
    """
    if not isinstance(payload, list):
        raise ValueError(f"/protocols payload is a {type(payload).__name__}, expected a list")
    skip: Counter[str] = skipped if skipped is not None else Counter()
    metas: list[ProtocolMeta] = []
    points: list[RawPoint] = []
    seen_slugs: set[str] = set()
    for item in payload:
        if not isinstance(item, Mapping):
            skip["protocol_not_an_object"] += 1
            continue
        raw_slug = item.get("slug")
        slug = normalize_subject("tvl", raw_slug) if isinstance(raw_slug, str) else ""
        if not slug:
            skip["protocol_without_slug"] += 1
            continue
        if slug in seen_slugs:
            skip["protocol_duplicate_slug"] += 1
            continue
        seen_slugs.add(slug)

        def point(metric: str, chain: str, value: float, slug: str = slug) -> RawPoint:
            return {"metric": metric, "subject": slug, "chain": chain, "ts": ts, "value": value}

        total = _number(item.get("tvl"))
        if total is None:
            skip["tvl_not_numeric"] += 1
        else:
            points.append(point("tvl", NO_CHAIN, total))

        chain_tvls = _structured(item.get("chainTvls", {}), dict)
        if chain_tvls is None:
            skip["chain_tvls_unreadable"] += 1
            chain_tvls = {}
        # DefiLlama sometimes lists one chain under two spellings with the same numbers
        # (`op_bnb` and `Op_Bnb` in the 2024-03 capture); after normalisation they are one
        # series, so the first wins and the sum of chains still equals the total.
        series_seen: set[tuple[str, str]] = set()
        plain_chains: list[str] = []
        for key, raw_value in chain_tvls.items():
            split = split_chain_tvl_key(key) if isinstance(key, str) else None
            if split is None:
                skip["chain_tvls_unknown_key"] += 1
                continue
            metric, chain = split
            if metric == "tvl" and chain == NO_CHAIN:
                skip["chain_tvls_key_without_chain"] += 1  # would collide with the total
                continue
            if split in series_seen:
                skip["chain_tvls_duplicate_key"] += 1
                continue
            value = _number(raw_value)
            if value is None:
                skip["chain_value_not_numeric"] += 1
                continue
            series_seen.add(split)
            if metric == "tvl":
                plain_chains.append(chain)
            points.append(point(metric, chain, value))

        chains = _structured(item.get("chains", []), list)
        if chains is None:
            skip["chains_unreadable"] += 1
            chains = plain_chains
        metas.append(_meta(item, slug, (c for c in chains if isinstance(c, str))))
    return metas, points


def parse_prices(payload: Any, *, skipped: Counter[str] | None = None) -> list[RawPoint]:
    """Turn a `GET /prices/current/{coins}` response into `price` points.

    Each point carries the coin's own `timestamp` (when DefiLlama last saw the price), not our
    poll time: a stale price must not look fresh.

    Raises:
        ValueError: the payload has no `coins` object (an error body, not a bad entry).
    """
    coins = payload.get("coins") if isinstance(payload, Mapping) else None
    if not isinstance(coins, Mapping):
        raise ValueError("prices payload has no 'coins' object")
    skip: Counter[str] = skipped if skipped is not None else Counter()
    points: list[RawPoint] = []
    for coin, quote in coins.items():
        if not isinstance(coin, str) or not coin.strip() or not isinstance(quote, Mapping):
            skip["price_not_an_object"] += 1
            continue
        price = _number(quote.get("price"))
        stamp = _number(quote.get("timestamp"))
        if price is None:
            skip["price_not_numeric"] += 1
            continue
        if stamp is None:
            skip["price_without_timestamp"] += 1
            continue
        points.append({"metric": "price", "subject": normalize_subject("price", coin),
                       "chain": NO_CHAIN, "ts": int(stamp), "value": price})
    return points


# --------------------------------------------------------------------------------------------
# Retry policy (pure)
# --------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header, or None when absent or unreadable.

    RFC 9110 section 10.2.3: either delay-seconds (a non-negative integer) or an HTTP-date; a
    date in the past means "now" (0).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def backoff_delay(retry: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retry)].

    Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter") spreads the retries of
    many pollers instead of having them hit a recovering server in lockstep.
    """
    return rng.uniform(0.0, min(cap_s, base_s * 2.0 ** retry))


# --------------------------------------------------------------------------------------------
# Poller (I/O shell)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PollReport:
    """What one `poll_once` did; `failed` names endpoints that yielded nothing this time."""

    ts: int
    protocols: int = 0
    protocols_changed: int = 0
    points: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Parsed:
    ts: int
    metas: list[ProtocolMeta]
    points: list[RawPoint]
    skipped: Counter[str]


class DefiLlamaPoller:
    """Polls DefiLlama every `interval_s` and pushes protocols, then points, into `sink`.

    Args:
        sink: where points and protocol metadata go (the ingest service).
        api_url: base of the TVL API (`https://api.llama.fi`; the pro API's base holds the key,
            so URLs are never logged).
        coins_url: base of the coins API (`https://coins.llama.fi`).
        interval_s: seconds from the start of one poll to the start of the next.
        coins: coin ids for the prices endpoint (`coingecko:ethereum`); empty skips prices.
        client: an httpx client to use (not closed by us); None creates and owns one.
        clock: epoch seconds; stamps `/protocols` observations and resolves Retry-After dates.
        sleep: awaited for every backoff and interval wait (tests record instead of waiting).
        max_backoff_s: cap of one backoff wait, seconds. A Retry-After longer than this is not
            waited out inside the poll: the endpoint is skipped until that time has passed.
        backoff_base_s: first backoff bound, seconds; doubles per retry up to `max_backoff_s`.
        max_attempts: requests per endpoint per poll, first one included (>= 1).
        batch_size: points per `ingest_points` call.
        timeout: per-request httpx timeout; the default allows a minute for the 4 MB body.
        rng: randomness for the jitter (tests pass a deterministic one).
    """

    def __init__(
        self,
        sink: PointSink,
        *,
        api_url: str,
        coins_url: str,
        interval_s: float,
        coins: Sequence[str],
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_backoff_s: float = 600.0,
        backoff_base_s: float = 2.0,
        max_attempts: int = 6,
        batch_size: int = 5_000,
        timeout: httpx.Timeout | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if interval_s <= 0 or max_backoff_s < 0 or backoff_base_s < 0:
            raise ValueError("interval_s must be > 0; backoff bounds must be >= 0")
        if max_attempts < 1 or batch_size < 1:
            raise ValueError("max_attempts and batch_size must be >= 1")
        self._sink = sink
        self._api_url = api_url.rstrip("/")
        self._coins_url = coins_url.rstrip("/")
        self._interval_s = interval_s
        self._coins = [c.strip() for c in coins if c.strip()]
        self._owns_client = client is None
        self._timeout = timeout or httpx.Timeout(60.0, connect=10.0, pool=10.0)
        self._client = client or httpx.AsyncClient(timeout=self._timeout)
        self._clock = clock
        self._sleep = sleep
        self._max_backoff_s = max_backoff_s
        self._backoff_base_s = backoff_base_s
        self._max_attempts = max_attempts
        self._batch_size = batch_size
        self._rng = rng or random.Random()
        self._stop: asyncio.Event | None = None
        # endpoint -> epoch seconds before which a long Retry-After asked us not to call again
        self._not_before: dict[str, float] = {}
        # Serialises pushes so protocols always precede their points in the sink.
        self._push_lock = asyncio.Lock()

    async def __aenter__(self) -> DefiLlamaPoller:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the httpx client if we created it."""
        if self._owns_client:
            await self._client.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `interval_s` until `stop` is set; a failed poll waits for the next tick."""
        self._stop = stop
        log.info("poller.started", interval_s=self._interval_s, coins=len(self._coins))
        try:
            while not stop.is_set():
                started = self._clock()
                error: str | None = None
                try:
                    report = await self.poll_once()
                    if report.failed:
                        error = f"failed endpoints: {', '.join(report.failed)}"
                except Exception as exc:  # the sink or a bug: log it, keep the poller alive
                    log.exception("poller.poll_failed")
                    error = str(exc)
                wait = max(0.0, started + self._interval_s - self._clock())
                health.beat("poller", error=error, idle_s=wait)
                if not stop.is_set():
                    await self._pause(wait)
        finally:
            self._stop = None
            log.info("poller.stopped")

    async def poll_once(self) -> PollReport:
        """Fetch both endpoints (concurrently), then push protocols, their points, and prices.

        A failed endpoint is reported in `failed` and does not stop the other. Errors of the
        sink propagate (the store is down: nothing to gain from carrying on).
        """
        report = PollReport(ts=int(self._clock()))
        outcomes = await asyncio.gather(
            self._fetch_protocols(), self._fetch_prices(), return_exceptions=True
        )
        for endpoint, outcome in zip(("protocols", "prices"), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancellation and friends are not ours to swallow
                log.error("poller.fetch_crashed", endpoint=endpoint,
                          error=type(outcome).__name__, exc_info=outcome)
                report.failed.append(endpoint)
            elif outcome is None:
                report.failed.append(endpoint)
        protocols, prices = outcomes
        async with self._push_lock:
            if isinstance(protocols, _Parsed):
                report.ts = protocols.ts
                report.skipped.update(protocols.skipped)
                report.protocols = len(protocols.metas)
                report.protocols_changed = await self._sink.ingest_protocols(
                    protocols.metas, ts=protocols.ts, source=SOURCE
                )
                await self._push("protocols", protocols.points, report)
            if isinstance(prices, _Parsed):
                report.skipped.update(prices.skipped)
                await self._push("prices", prices.points, report)
        log.info("poller.polled", ts=report.ts, protocols=report.protocols,
                 protocols_changed=report.protocols_changed, points=report.points,
                 accepted=report.accepted, duplicates=report.duplicates,
                 rejected=report.rejected, skipped=sum(report.skipped.values()),
                 failed=report.failed)
        return report

    async def _push(self, endpoint: str, points: list[RawPoint], report: PollReport) -> None:
        for start in range(0, len(points), self._batch_size):
            batch = points[start : start + self._batch_size]
            result = await self._sink.ingest_points(batch, source=SOURCE)
            POINTS.labels(endpoint).inc(len(batch))
            report.points += len(batch)
            report.accepted += result.accepted
            report.duplicates += len(result.duplicates)
            report.rejected += len(result.rejected)
            if result.rejected:
                first = result.rejected[0]
                log.warning("poller.points_rejected", endpoint=endpoint,
                            rejected=len(result.rejected), first_field=first.field,
                            first_reason=first.reason)

    async def _fetch_protocols(self) -> _Parsed | None:
        response = await self._get("protocols", f"{self._api_url}/protocols")
        if response is None:
            return None
        ts = int(self._clock())  # /protocols has no timestamp: the observation is "now"
        try:
            # ~4 MB of JSON and ~12k points: decode and parse off the event loop so the
            # gateway sharing this process keeps sending.
            return await asyncio.to_thread(_decode_protocols, response.content, ts)
        except ValueError as exc:
            log.error("poller.bad_payload", endpoint="protocols", error=str(exc)[:200])
            return None

    async def _fetch_prices(self) -> _Parsed | None:
        if not self._coins:
            return _Parsed(ts=int(self._clock()), metas=[], points=[], skipped=Counter())
        # DefiLlama takes the coin list comma-separated in the path; ':' needs no escaping.
        url = f"{self._coins_url}/prices/current/{','.join(self._coins)}"
        response = await self._get("prices", url)
        if response is None:
            return None
        skipped: Counter[str] = Counter()
        try:
            points = parse_prices(json.loads(response.content), skipped=skipped)
        except ValueError as exc:
            log.error("poller.bad_payload", endpoint="prices", error=str(exc)[:200])
            return None
        _count_skipped("prices", skipped)
        return _Parsed(ts=int(self._clock()), metas=[], points=points, skipped=skipped)

    async def _get(self, endpoint: str, url: str) -> httpx.Response | None:
        """GET with bounded retries; the 2xx response, or None when this poll gives up.

        Retried: 429, 5xx, timeouts and network errors (backoff with full jitter, or the
        server's Retry-After on 429/503). Not retried: other statuses, which a retry within
        minutes will not fix (a 404 means our URL is wrong); the next interval tries again.
        """
        now = self._clock()
        not_before = self._not_before.get(endpoint, 0.0)
        if now < not_before:
            log.info("poller.deferred", endpoint=endpoint, wait_s=round(not_before - now, 1))
            return None
        for attempt in range(1, self._max_attempts + 1):
            started = time.perf_counter()
            retry_after: float | None = None
            try:
                response = await self._client.get(
                    url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                    timeout=self._timeout,
                )
            except httpx.TransportError as exc:  # connect/read timeouts, resets, refused
                status = "timeout" if isinstance(exc, httpx.TimeoutException) else "network_error"
                self._observe(endpoint, status, started)
                reason = f"{status}: {type(exc).__name__}"
            else:
                code = response.status_code
                self._observe(endpoint, str(code), started)
                if 200 <= code < 300:
                    self._not_before.pop(endpoint, None)
                    return response
                if code != 429 and code < 500:
                    log.warning("poller.http_error", endpoint=endpoint, status=code,
                                detail=response.text[:200])
                    return None
                if code in (429, 503):
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), now=self._clock()
                    )
                reason = f"http {code}"
            if attempt >= self._max_attempts:
                log.error("poller.gave_up", endpoint=endpoint, attempts=attempt, reason=reason)
                return None
            if retry_after is not None and retry_after > self._max_backoff_s:
                # Honour the server: do not call before the time it named, even across polls.
                self._not_before[endpoint] = self._clock() + retry_after
                log.warning("poller.deferred", endpoint=endpoint, reason=reason,
                            wait_s=retry_after)
                return None
            delay = retry_after if retry_after is not None else backoff_delay(
                attempt - 1, base_s=self._backoff_base_s, cap_s=self._max_backoff_s,
                rng=self._rng,
            )
            log.warning("poller.retry", endpoint=endpoint, attempt=attempt, reason=reason,
                        delay_s=round(delay, 3), retry_after=retry_after is not None)
            if not await self._pause(delay):
                return None
        return None  # unreachable: the loop returns on its last attempt

    @staticmethod
    def _observe(endpoint: str, status: str, started: float) -> None:
        REQUESTS.labels(endpoint, status).inc()
        REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` with the injected sleep, cut short by `stop`; False when stopped."""
        stop = self._stop
        if stop is None:
            await self._sleep(seconds)
            return True
        if stop.is_set():
            return False
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)
        return not stop.is_set()


def _decode_protocols(content: bytes, ts: int) -> _Parsed:
    skipped: Counter[str] = Counter()
    # stdlib json, not msgspec: it accepts the NaN tokens some dumps of this endpoint contain.
    metas, points = parse_protocols(json.loads(content), ts=ts, skipped=skipped)
    _count_skipped("protocols", skipped)
    return _Parsed(ts=ts, metas=metas, points=points, skipped=skipped)


def _count_skipped(endpoint: str, skipped: Counter[str]) -> None:
    for reason, n in skipped.items():
        SKIPPED.labels(endpoint, reason).inc(n)
    if skipped:
        log.info("poller.skipped", endpoint=endpoint, reasons=dict(skipped))
