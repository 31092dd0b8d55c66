"""Skip a failing backend for a moment instead of paying its timeout on every request.

During a Redis stall each request-path call waits the request timeout (0.5 s); several calls
in one request add up, and concurrent requests pile up on the pool. After one failure, the
callers on the request path (the rate limiter, the query result cache) treat the backend as
down for `seconds` without asking it, then try again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["REQUEST_PATH_COOLDOWN_S", "Cooldown"]

REQUEST_PATH_COOLDOWN_S = 1.0  # for the API's calls to Redis (rate limiter, result cache)


class Cooldown:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._until = float("-inf")

    @property
    def active(self) -> bool:
        """True while the last failure is less than `seconds` old."""
        return self._clock() < self._until

    def start(self) -> None:
        """A call just failed: skip the backend for `seconds` from now."""
        self._until = self._clock() + self.seconds
