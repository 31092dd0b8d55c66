"""Per-tier API rate limits (README, Tiers: free 60, pro 600, enterprise 6,000 requests a minute).

Algorithm: GCRA (the generic cell rate algorithm, as in ATM networks and e.g. the `redis-cell`
module). Each caller has a theoretical arrival time (TAT); a request moves it one emission
interval T = 60 s / limit later and is refused while the TAT would be more than one minute ahead
of now. That allows a full minute's quota at once, then one request per T, without the
double-burst of fixed windows at their boundary, and needs one number per caller. We wrote it
ourselves because it is twenty lines; the Redis step is `api/lua/rate_limit.lua`, atomic and on
Redis's clock, so all API processes share one budget per key.

Who is counted: a valid API key (by key id) at its user's tier; a request without a valid key
by client address at the `free` tier (so key guessing is rate-limited too). The key is found
where the routes look for it: `Authorization: Bearer`, `X-API-Key`, `?apiKey=`, or the first
path segment (`/dw_.../protocols`, DefiLlama Pro's key-in-path style).

Headers on every limited response: `X-RateLimit-Limit` (requests per minute),
`X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds until the full quota is back); a refusal
is `429` with `Retry-After` (seconds) and the usual error body. Unauthenticated operational
routes (/healthz, /readyz, /metrics, /docs, /openapi.json) are not limited. If Redis (or the
database, for the key lookup) cannot be reached or does not answer within
`DEFIWATCH_REDIS_REQUEST_TIMEOUT_S`, the request is let through, logged
(`ratelimit.fail_open`) and counted in `defiwatch_ratelimit_fail_open_total`: an outage of the
limiter should not become an outage of the API.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from importlib import resources
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.api.errors import send_error
from defiwatch.api.keycache import KeyCache
from defiwatch.cooldown import REQUEST_PATH_COOLDOWN_S, Cooldown
from defiwatch.errors import BackendUnavailable, RateLimited
from defiwatch.redis_keys import RedisKeys
from defiwatch.store.db import DATABASE_ERRORS, database_unreachable

__all__ = [
    "EXEMPT_PATHS",
    "EXEMPT_PREFIX",
    "RATE_LIMITED",
    "Decision",
    "MemoryRateStore",
    "RateLimitMiddleware",
    "RateLimiter",
    "RateStore",
    "RedisRateStore",
    "gcra",
    "key_from_scope",
]

log = structlog.get_logger(__name__)

RATE_LIMITED = Counter("defiwatch_ratelimit_rejections_total",
                       "API requests refused with 429, by tier", ["tier"])
FAIL_OPEN = Counter("defiwatch_ratelimit_fail_open_total",
                    "Rate-limit checks that failed (Redis or database unreachable or too slow); "
                    "the request passed unlimited")

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect",
                          "/redoc", "/openapi.json"})
EXEMPT_PREFIX = "/docs/"  # the docs pages' own assets (api/openapi.py DOCS_STATIC_URL)

_MINUTE_US = 60_000_000
_RATE_LUA = resources.files("defiwatch.api").joinpath("lua/rate_limit.lua").read_text("utf-8")


class Decision(NamedTuple):
    allowed: bool
    limit: int  # requests per minute
    remaining: int
    reset_s: float  # until the full quota is available again
    retry_after_s: float  # until the next request is allowed (0 when allowed)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"x-ratelimit-limit", str(self.limit).encode()),
               (b"x-ratelimit-remaining", str(max(0, self.remaining)).encode()),
               (b"x-ratelimit-reset", str(math.ceil(self.reset_s)).encode())]
        if not self.allowed:
            out.append((b"retry-after", str(max(1, math.ceil(self.retry_after_s))).encode()))
        return out


def gcra(tat_us: int | None, now_us: int, limit: int) -> tuple[Decision, int | None]:
    """One GCRA step: the decision and the caller's new TAT (None: unchanged). Pure.

    Args:
        tat_us: the caller's theoretical arrival time (µs), None for a new caller.
        now_us: now (µs).
        limit: requests per minute; 0 refuses everything.
    """
    if limit <= 0:
        return Decision(False, 0, 0, 60.0, 60.0), None
    interval = _MINUTE_US // limit
    tat = max(tat_us if tat_us is not None else now_us, now_us)
    new_tat = tat + interval
    allow_at = new_tat - _MINUTE_US
    if now_us < allow_at:
        return Decision(False, limit, 0, (tat - now_us) / 1e6, (allow_at - now_us) / 1e6), None
    remaining = (_MINUTE_US - (new_tat - now_us)) // interval
    return Decision(True, limit, remaining, (new_tat - now_us) / 1e6, 0.0), new_tat


class RateStore(Protocol):
    async def hit(self, who: str, limit: int) -> Decision:
        """Count one request of `who` against `limit` per minute; atomic per `who`."""
        ...


class MemoryRateStore:
    """TATs in a dict, for one process (embedded). Entries whose TAT has passed are dropped
    when the dict grows past `max_callers`, so idle callers cost nothing."""

    def __init__(self, *, max_callers: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._tats: dict[str, int] = {}
        self._max = max_callers
        self._clock = clock

    async def hit(self, who: str, limit: int) -> Decision:
        now = int(self._clock() * 1_000_000)
        decision, tat = gcra(self._tats.get(who), now, limit)
        if tat is not None:
            self._tats[who] = tat
            if len(self._tats) > self._max:
                self._tats = {k: v for k, v in self._tats.items() if v > now}
        return decision


class RedisRateStore:
    """TATs in Redis (`{prefix}ratelimit:{who}`), one atomic script per request."""

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        self._client = client
        self._keys = RedisKeys(prefix)
        self._script = client.register_script(_RATE_LUA)

    async def hit(self, who: str, limit: int) -> Decision:
        if limit <= 0:
            return gcra(None, 0, 0)[0]
        try:
            allowed, remaining, reset_us, retry_us = await self._script(
                keys=[self._keys.rate_limit(who)], args=[_MINUTE_US // limit, _MINUTE_US])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(
                f"rate limiter unreachable: {type(exc).__name__}: {exc}") from exc
        return Decision(bool(allowed), limit, int(remaining), int(reset_us) / 1e6,
                        int(retry_us) / 1e6)


class _Caller(NamedTuple):
    who: str
    tier: str


class RateLimiter:
    """Finds who is calling and asks the store.

    Args:
        engine: to look API keys up (results are remembered for `key_ttl_s`, so a busy key
            costs one database query per `key_ttl_s`, and a revoked key keeps its old budget
            at most that long; the routes themselves still check every request). The
            lookups are `keys`, which the body gate shares.
        store: memory or Redis.
        tier_limits: requests per minute per tier name; unknown tiers get `free`'s limit.
    """

    def __init__(self, engine: AsyncEngine, store: RateStore, tier_limits: Mapping[str, int],
                 *, key_ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = KeyCache(engine, ttl_s=key_ttl_s, clock=clock)
        self._store = store
        self._limits = dict(tier_limits)

    def limit_for(self, tier: str) -> int:
        return self._limits.get(tier, self._limits.get("free", 60))

    async def check(self, key: str | None, client: str) -> tuple[Decision, str]:
        """The decision for one request, and the tier it was counted under.

        Raises:
            BackendUnavailable: the store or the key lookup could not answer.
        """
        caller = await self._caller(key) if key else None
        if caller is None:
            caller = _Caller(f"ip:{client}", "free")
        return await self._store.hit(caller.who, self.limit_for(caller.tier)), caller.tier

    async def _caller(self, key: str) -> _Caller | None:
        try:
            principal = await self.keys.principal(key)
        except DATABASE_ERRORS as exc:
            if not database_unreachable(exc):
                raise
            raise BackendUnavailable(f"key lookup failed: {type(exc).__name__}: {exc}") from exc
        return _Caller(f"key:{principal.key_id}", principal.tier) if principal else None


def key_from_scope(scope: Mapping[str, Any]) -> str | None:
    """The API key of a request, looked up like the routes do (plus the key-in-path form)."""
    headers: dict[bytes, bytes] = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if headers.get(b"x-api-key"):  # an empty one falls through, as in the routes
        return headers[b"x-api-key"].decode("latin-1")
    query = scope.get("query_string") or b""
    if b"apiKey=" in query:
        values: list[str] = parse_qs(query.decode("latin-1")).get("apiKey", [])
        if values:
            return values[0]
    first = str(scope.get("path", "")).lstrip("/").split("/", 1)[0]
    return first if first.startswith("dw_") else None


_ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]],
                     Callable[[MutableMapping[str, Any]], Awaitable[None]]], Awaitable[None]]


# After a failed check, requests pass unchecked (still counted) this many seconds: during a
# Redis stall each would otherwise wait the request timeout, and pile up on the pool.
FAIL_OPEN_COOLDOWN_S = REQUEST_PATH_COOLDOWN_S


class RateLimitMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streaming bodies)."""

    def __init__(self, app: _ASGIApp, limiter: RateLimiter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._app = app
        self._limiter = limiter
        self._cooldown = Cooldown(FAIL_OPEN_COOLDOWN_S, clock)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIX):
            await self._app(scope, receive, send)
            return
        if self._cooldown.active:
            FAIL_OPEN.inc()
            await self._app(scope, receive, send)
            return
        client = scope.get("client")
        try:
            decision, tier = await self._limiter.check(key_from_scope(scope),
                                                       client[0] if client else "unknown")
        except BackendUnavailable as exc:
            FAIL_OPEN.inc()
            self._cooldown.start()
            log.warning("ratelimit.fail_open", error=exc.message, path=path,
                        unchecked_for_s=FAIL_OPEN_COOLDOWN_S)
            await self._app(scope, receive, send)
            return
        headers = decision.headers()
        if not decision.allowed:
            RATE_LIMITED.labels(tier).inc()
            retry_after = max(1, math.ceil(decision.retry_after_s))
            await send_error(send, RateLimited(
                f"more than {decision.limit} requests a minute for the {tier!r} tier; "
                f"retry after {retry_after} s", retry_after=retry_after), headers)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self._app(scope, receive, send_with_headers)
