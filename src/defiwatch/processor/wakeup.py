"""Wake-ups for the processor (and the notifier): in-process signals and PostgreSQL NOTIFY.

A wake-up is only a hint that change_log (or the notification outbox) has new rows; both also
poll, so a lost hint costs latency, never data.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

__all__ = ["CHANNEL", "Wakeup", "listen_postgres"]

log = structlog.get_logger(__name__)

CHANNEL = "defiwatch_change_log"


class Wakeup:
    """A level-triggered flag: any number of `notify()` calls before `wait()` wake it once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True if woken, False on timeout; clears the flag either way."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._event.clear()


async def listen_postgres(dsn: str, wakeup: Wakeup, stop: asyncio.Event, *,
                          channel: str = CHANNEL) -> None:
    """LISTEN on `channel` until `stop`; reconnect with backoff if the link drops."""
    import asyncpg

    delay = 0.5
    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn)
            await conn.add_listener(channel, lambda *_: wakeup.notify())
            log.info("listen.started", channel=channel)
            delay = 0.5
            wakeup.notify()  # rows may have arrived while we were not listening
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            stop_task = asyncio.create_task(stop.wait())
            lost_task = asyncio.create_task(lost.wait())
            await asyncio.wait({stop_task, lost_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            lost_task.cancel()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("listen.failed", channel=channel, error=str(exc), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            delay = min(delay * 2, 30.0)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()
