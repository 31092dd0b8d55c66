"""API key lookups remembered for a few seconds, for the middlewares that run before the routes.

The rate limiter and the body gate (bodylimit.py) both need to know who is calling before a
route runs; sharing one cache means a busy key costs one database query per `ttl_s` for both,
not one per request. A revoked key keeps passing the middlewares at most `ttl_s` longer; the
routes themselves still check every request (auth.py).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.store.db import read_retrying
from defiwatch.store.keys import Principal, authenticate

__all__ = ["KeyCache"]


class KeyCache:
    """Principal (or None: unknown or revoked) per key, for `ttl_s` seconds.

    Args:
        engine: to look keys up (a pool without pre-ping is fine: reads retry once).
        ttl_s: how long an answer is remembered, seconds.
        max_entries: least recently used answers are dropped beyond this.
        clock: monotonic seconds.
    """

    def __init__(self, engine: AsyncEngine, *, ttl_s: float = 10.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def principal(self, key: str) -> Principal | None:
        """Who holds `key`, or None if no live key matches.

        Raises:
            whatever the database raises when it cannot be read (see
            store/db.py `database_unreachable`); nothing is remembered then.
        """
        # Digests as cache keys: the raw keys (secrets) do not sit in memory longer than needed.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        now = self._clock()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await read_retrying(self._engine, lambda conn: authenticate(conn, key))
        self._entries[digest] = (now + self._ttl, found)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return found
