"""Supervised roles: a role task that raises is logged and started again after a backoff,
instead of stopping every other role of the process with it.

Each role's loop already retries the failures it knows (a database or Redis outage); this is
the net under them, for what they do not catch (a bug, an unexpected library error).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from defiwatch.errors import DefiwatchError
from defiwatch.ops.health import Health
from defiwatch.ops.metrics import ROLE_RESTARTS

__all__ = ["BACKEND_ERRORS", "Backoff", "describe", "supervise", "wait_or_stop"]

log = structlog.get_logger(__name__)

# Failures a role's own loop retries in place with `Backoff`: backends unreachable or answering
# errors (RedisError covers replies such as NOGROUP that a stream group could not repair).
BACKEND_ERRORS: tuple[type[Exception], ...] = (DefiwatchError, SQLAlchemyError, RedisError,
                                               OSError)


@dataclass(frozen=True)
class Backoff:
    """Restart delays: `first_s`, doubling per consecutive failure up to `cap_s` (seconds).
    A run that lasted `cap_s` or longer counts as healthy: the next failure waits `first_s`."""

    first_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, previous: float | None, ran_s: float = 0.0) -> float:
        """The wait before the next try, given the previous wait (None: none yet) and how long
        the failed run lasted (a retry loop's consecutive failures leave it at 0)."""
        if previous is None or ran_s >= self.cap_s:
            return self.first_s
        return min(previous * 2, self.cap_s)


async def supervise(
    role: str,
    run: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    health: Health,
    backoff: Backoff = Backoff(),
    name: str | None = None,
) -> None:
    """Run `run()` until it returns (a finite role is done) or `stop` is set; restart it after
    it raises. Beats of the loop inside go to `health`.

    Args:
        role: the role `run` belongs to, as health and the logs name it.
        run: starts one run of the role; called again for every restart.
        name: the task's own name in logs when a role has several (e.g. `listen`).
    """
    task_name = name or role
    delay: float | None = None
    with health.bound():
        while True:
            started = time.monotonic()
            try:
                await run()
            except Exception as exc:  # any failure of a role: log it, start the role again
                delay = backoff.delay(delay, time.monotonic() - started)
                error = describe(exc)
                log.error("role.failed", role=role, task=task_name, error=error,
                          error_type=type(exc).__name__,
                          retry_in_s=None if stop.is_set() else delay, exc_info=exc)
                if stop.is_set():
                    return
                health.failed(role, error)
                ROLE_RESTARTS.labels(role).inc()
                if await wait_or_stop(stop, delay):
                    return
                log.info("role.restarting", role=role, task=task_name)
            else:
                if not stop.is_set() and task_name == role:
                    health.finished(role)
                log.info("role.finished", role=role, task=task_name)
                return


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` (a backoff), cut short by `stop` so shutdown never waits out a retry
    delay; True when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def describe(exc: BaseException) -> str:
    """The error text for logs and readiness; a task group's failure is its members' texts
    ("unhandled errors in a TaskGroup" tells an operator nothing)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return str(exc) or type(exc).__name__
