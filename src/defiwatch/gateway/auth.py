"""API keys -> principals for the gateway: a short-lived cache of verified keys, and revocation.

Every WebSocket connect presents an API key. Looking each one up in the database made a connect
storm (bench/ws_fanout.py: 500 connects/s) queue behind the database: with SQLite every lookup is
several hops to an aiosqlite worker thread that competes with the event loop for the GIL on the
same core, and the lookups plus their SQLAlchemy and asyncio plumbing were ~30 % of the loop's
CPU per connect. So verified keys are cached for `ttl_s` (by the SHA-256 of the key: the cache
holds no plaintext secret), and concurrent lookups of one uncached key share one query.

Revocation stays bounded: the gateway calls `Authenticator.revoked` every
`REVALIDATE_INTERVAL_S` with the distinct key ids of its live connections (and those in the
cache): one query for all of them, not one per connection. Revoked keys leave the cache and their
connections are closed (4001). So a revoked key stops working on a gateway within one
revalidation interval plus one query while the database is reachable; if it is not, cached
entries still expire after `ttl_s`, after which a connect needs the database again.

Only accepted keys are cached: an unknown, malformed or revoked key is looked up every time (the
connect-rate cap bounds that), so a key created or un-revoked a moment ago is never refused from
a stale entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Collection

from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.gateway.protocol import ErrorCode, Rejection
from defiwatch.store.keys import Principal, active_key_ids, authenticate

__all__ = ["KEY_CACHE_SIZE", "KEY_CACHE_TTL_S", "REQUIRED_SCOPE", "REVALIDATE_INTERVAL_S",
           "Authenticator", "KeyCache", "admit", "digest"]

REQUIRED_SCOPE = "read"  # streaming events is reading them (`admin` implies every scope)
KEY_CACHE_TTL_S = 60.0  # seconds a verified key is served from the cache; 0: no cache
KEY_CACHE_SIZE = 10_000  # verified keys held at most (oldest out first)
REVALIDATE_INTERVAL_S = 10.0  # seconds between re-checks of live connections' keys


def admit(principal: Principal | None) -> Principal | Rejection:
    """The principal when it may stream, else why not (`unauthorized`, `forbidden`)."""
    if principal is None:
        return Rejection(ErrorCode.UNAUTHORIZED, "invalid or revoked API key", "api_key")
    if REQUIRED_SCOPE not in principal.scopes and "admin" not in principal.scopes:
        return Rejection(
            ErrorCode.FORBIDDEN,
            f"this key lacks the '{REQUIRED_SCOPE}' scope "
            f"(it has: {', '.join(sorted(principal.scopes))})", "api_key")
    return principal


def digest(key: str) -> bytes:
    """The cache's name for a key: its SHA-256, so no plaintext key stays in memory."""
    return hashlib.sha256(key.encode()).digest()


class KeyCache:
    """Verified keys (key digest -> principal), each for `ttl_s` seconds after it was verified,
    at most `max_entries` (the oldest verified goes first). Pure: `now` is passed in.

    Args:
        ttl_s: seconds an entry is served; 0 or less: nothing is ever served.
        max_entries: entries held at most (>= 1).
    """

    def __init__(self, ttl_s: float, max_entries: int = KEY_CACHE_SIZE) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # Insertion order is verification order (`put` re-inserts): the first entry is the oldest.
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key_digest: bytes, now: float) -> Principal | None:
        entry = self._entries.get(key_digest)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[key_digest]
            return None
        return entry[1]

    def put(self, key_digest: bytes, principal: Principal, now: float) -> None:
        if self.ttl_s <= 0:
            return
        self._entries.pop(key_digest, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key_digest] = (now + self.ttl_s, principal)

    def key_ids(self) -> set[int]:
        """The key ids of every entry (expired ones included until they are next looked at)."""
        return {principal.key_id for _, principal in self._entries.values()}

    def forget(self, key_ids: Collection[int]) -> int:
        """Drop the entries of these keys (revoked); return how many were dropped."""
        gone = [d for d, (_, principal) in self._entries.items() if principal.key_id in key_ids]
        for key_digest in gone:
            del self._entries[key_digest]
        return len(gone)


class Authenticator:
    """Authenticates API keys against the database through a `KeyCache` (module docstring).

    Args:
        engine: the database holding the keys.
        ttl_s: seconds a verified key is served from the cache (0: always ask the database).
        max_entries: verified keys cached at most.
        monotonic: the clock of the cache, in seconds.
    """

    def __init__(self, engine: AsyncEngine, *, ttl_s: float = KEY_CACHE_TTL_S,
                 max_entries: int = KEY_CACHE_SIZE,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self.cache = KeyCache(ttl_s, max_entries)
        self._monotonic = monotonic
        self._inflight: dict[bytes, asyncio.Task[Principal | None]] = {}

    async def authenticate(self, key: str) -> Principal | Rejection:
        """The principal of `key`, or why it is refused (`unauthorized`, `forbidden`).

        Raises:
            sqlalchemy.exc.SQLAlchemyError, OSError: the database could not be reached.
        """
        key_digest = digest(key)
        principal = self.cache.get(key_digest, self._monotonic())
        if principal is None:
            principal = await self._lookup(key_digest, key)
        return admit(principal)

    async def _lookup(self, key_digest: bytes, key: str) -> Principal | None:
        # Single flight: the connects of one key arriving while its lookup runs (a client fleet
        # reconnecting at once) wait for that lookup instead of each sending its own.
        task = self._inflight.get(key_digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key))
            self._inflight[key_digest] = task

            def done(t: asyncio.Task[Principal | None]) -> None:
                self._inflight.pop(key_digest, None)
                if t.cancelled():
                    return
                if t.exception() is None and (found := t.result()) is not None:
                    # Cached when the lookup ends: an entry never outlives its query by more
                    # than ttl_s.
                    self.cache.put(key_digest, found, self._monotonic())

            task.add_done_callback(done)
        # Shielded: one waiter giving up (its client left) must not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _query(self, key: str) -> Principal | None:
        async with self._engine.connect() as conn:
            return await authenticate(conn, key)

    async def revoked(self, key_ids: Collection[int]) -> set[int]:
        """Of `key_ids`, those no longer valid (revoked or deleted), in one query per 5,000
        keys; they (and any other revoked key found in the cache) leave the cache.

        Raises:
            sqlalchemy.exc.SQLAlchemyError, OSError: the database could not be reached.
        """
        asked = set(key_ids)
        ids = asked | self.cache.key_ids()
        if not ids:
            return set()
        async with self._engine.connect() as conn:
            active = await active_key_ids(conn, ids)
        gone = ids - active
        if gone:
            self.cache.forget(gone)
        return gone & asked
