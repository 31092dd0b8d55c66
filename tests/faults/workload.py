"""The traffic the faults are injected under, and the ledgers that judge what survived.

- `Ingestor`: steady ingest over the HTTP API. Every tick stores one point per series with a
  value alternating between `HIGH` and `LOW`, so every point after the first is a significant
  change: one `tvl_change` event, and one transition of the alert rule (`lt THRESHOLD` fires on
  LOW, resolves on HIGH). A tick is retried until the API accepts it (a client retrying through
  an outage), so the ledger of accepted ticks is exactly what the database holds.
- `Subscriber`: a `RealtimeClient` on `tvl_changes`, recording each event by its identity
  (subject, ts): offsets restart when Redis loses its data, identities do not.
- `WebhookReceiver`: the rule's webhook target, a local aiohttp server.
- `alert_keys`: the transitions the alert engine recorded (alert_history), read from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web

from defiwatch.client import RealtimeClient, Subscription

from .topology import Topology

__all__ = [
    "HIGH",
    "LOW",
    "SERIES",
    "SETUP_DEADLINE_S",
    "STATIC",
    "THRESHOLD",
    "Harness",
    "Ingestor",
    "Key",
    "Subscriber",
    "WebhookReceiver",
    "alert_keys",
    "alert_rule",
    "latest_complete",
    "poll",
    "seconds_until",
]

SERIES = ("faults-a", "faults-b", "faults-c")  # changing on every tick
STATIC = ("faults-static-a", "faults-static-b")  # stored once: only a rebuilt cache shows them
HIGH, LOW, THRESHOLD = 1.2e9, 0.9e9, 1e9
# Starting the topology and the quiet start of a scenario (not the judged 30 s of issue 10).
SETUP_DEADLINE_S = 60.0 * float(os.environ.get("DEFIWATCH_TEST_TIMEOUT_FACTOR", "1"))


async def poll(check: Callable[[], Awaitable[bool]], deadline_s: float, what: str,
               topology: Topology) -> None:
    """Await `check()` (polling a live system) or fail with the roles' last problems."""
    if await seconds_until(check, time.monotonic(), deadline_s) is None:
        pytest.fail(f"{what} not within {deadline_s:.0f} s; exited: {topology.exited()}; "
                    f"logs: {topology.evidence()}")


async def seconds_until(check: Callable[[], Awaitable[bool]], since: float, deadline_s: float
                        ) -> float | None:
    """Seconds from `since` until `check()` holds, polling the live system; None past
    `deadline_s`."""
    while time.monotonic() - since <= deadline_s:
        if await check():
            return round(time.monotonic() - since, 1)
        await asyncio.sleep(0.2)
    return None


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _failure(task: asyncio.Task[None] | None) -> BaseException | None:
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


@dataclass(frozen=True, order=True)
class Key:
    """An event's identity across stream lives: the series' subject and observation time."""

    subject: str
    ts: int


def alert_rule(receiver_url: str) -> dict[str, Any]:
    """A rule with a transition on every event of SERIES: fire below THRESHOLD, resolve above,
    no cooldown, a webhook for both."""
    return {"name": "faults: every change",
            "condition": {"metric": "tvl", "subject": "*", "op": "lt", "threshold": THRESHOLD},
            "channels": [{"type": "webhook", "url": receiver_url}],
            "throttle_minutes": 0, "notify_on_resolve": True}


@dataclass
class Ingestor:
    """Steady ingest of SERIES, `rate_hz` ticks per second, each retried until accepted."""

    api: httpx.AsyncClient
    base_ts: int
    rate_hz: float = 5.0
    accepted: list[tuple[int, float]] = field(default_factory=list)  # (tick, monotonic time)
    failures: Counter[str] = field(default_factory=Counter)  # why attempts were not accepted
    _task: asyncio.Task[None] | None = None

    def ts(self, tick: int) -> int:
        return self.base_ts + tick

    @staticmethod
    def value(tick: int) -> float:
        return HIGH if tick % 2 == 0 else LOW

    async def ingest(self, points: list[dict[str, Any]]) -> bool:
        """One attempt; True when every point is stored (accepted now or before)."""
        try:
            answer = await self.api.post("/v1/ingest", json={"points": points}, timeout=2.0)
        except httpx.HTTPError as exc:
            self.failures[type(exc).__name__] += 1
            return False
        if answer.status_code != 200:
            self.failures[f"http {answer.status_code}"] += 1
            return False
        body = answer.json()
        if body["rejected"]:
            raise AssertionError(f"the API rejected workload points: {body['rejected']}")
        return True

    async def run(self) -> None:
        tick = 0
        while True:
            points = [{"metric": "tvl", "subject": s, "ts": self.ts(tick), "value": self.value(tick)}
                      for s in SERIES]
            if await self.ingest(points):
                self.accepted.append((tick, time.monotonic()))
                tick += 1
            await asyncio.sleep(1 / self.rate_hz)  # the pace of the workload, not a wait

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="faults-ingest")

    async def close(self) -> None:
        await _cancel(self._task)

    def failed(self) -> BaseException | None:
        """Why the workload stopped (it is meant to run until closed)."""
        return _failure(self._task)

    @property
    def last_tick(self) -> int:
        return self.accepted[-1][0] if self.accepted else -1

    def last_tick_before(self, when: float) -> int:
        return max((tick for tick, at in self.accepted if at <= when), default=-1)

    def first_tick_after(self, when: float) -> int | None:
        return next((tick for tick, at in self.accepted if at > when), None)

    def ticks_between(self, start: float, end: float) -> int:
        return sum(1 for _, at in self.accepted if start < at <= end)

    def event_keys(self, first: int, last: int) -> set[Key]:
        """The events ticks first..last produce (tick 0 is each series' first point: none)."""
        return {Key(s, self.ts(t)) for t in range(max(first, 1), last + 1) for s in SERIES}

    def latest_values(self) -> dict[str, tuple[int, float]]:
        tick = self.last_tick
        return {s: (self.ts(tick), self.value(tick)) for s in SERIES}


@dataclass
class Received:
    key: Key
    offset: int
    at: float


@dataclass
class Subscriber:
    """A live `RealtimeClient` on `tvl_changes` recording what it delivers."""

    url: str
    api_key: str
    events: list[Received] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # monotonic times of gap messages
    _task: asyncio.Task[None] | None = None

    async def _consume(self) -> None:
        async with RealtimeClient([self.url], self.api_key, [Subscription("tvl_changes")]) as client:
            async for message in client:
                if message.type == "gap":
                    self.gaps.append(time.monotonic())
                elif message.type == "event" and message.data["subject"] in SERIES:
                    self.events.append(Received(Key(message.data["subject"], message.data["ts"]),
                                                message.offset, time.monotonic()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume(), name="faults-subscriber")

    async def close(self) -> None:
        await _cancel(self._task)

    def failed(self) -> BaseException | None:
        """Why the client stopped (it is meant to run until closed)."""
        return _failure(self._task)

    def keys(self) -> Counter[Key]:
        return Counter(r.key for r in self.events)


@dataclass(frozen=True)
class Webhook:
    id: str  # webhook-id: the notification's idempotency key, the same on every attempt
    kind: str  # alert_fired / alert_resolved
    key: Key  # the observation that decided the transition


class WebhookReceiver:
    """The alert rule's webhook endpoint on loopback; answers 200 to everything it records."""

    def __init__(self) -> None:
        self.hooks: list[Webhook] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.json()
        event = body["data"]["event"]
        self.hooks.append(Webhook(request.headers["webhook-id"], body["type"],
                                  Key(event["subject"], int(event["ts"]))))
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def keys(self) -> set[Key]:
        return {hook.key for hook in self.hooks}

    def duplicated(self, keys: Iterable[Key]) -> int:
        """Transitions notified under more than one notification id (a redelivery of one id is
        at-least-once by design and not counted)."""
        wanted = set(keys)
        ids: dict[tuple[str, Key], set[str]] = {}
        for hook in self.hooks:
            if hook.key in wanted:
                ids.setdefault((hook.kind, hook.key), set()).add(hook.id)
        return sum(len(found) - 1 for found in ids.values())

    def redelivered(self, keys: Iterable[Key]) -> int:
        """Repeated deliveries of one notification id (at least once: a receiver dedups them)."""
        wanted = set(keys)
        counts = Counter(hook.id for hook in self.hooks if hook.key in wanted)
        return sum(n - 1 for n in counts.values())


async def alert_keys(dsn: str) -> set[Key] | None:
    """Every observation the alert engine recorded a transition for (fired or resolved);
    None while the database is unreachable."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        rows = await conn.fetch(
            "SELECT subject, (event::jsonb->>'ts')::bigint AS fired, "
            "(resolved_event::jsonb->>'ts')::bigint AS resolved FROM alert_history")
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    finally:
        await conn.close()
    found: set[Key] = set()
    for row in rows:
        found |= {Key(row["subject"], ts) for ts in (row["fired"], row["resolved"]) if ts is not None}
    return found


async def latest_complete(api: httpx.AsyncClient, want: dict[str, tuple[int, float]]) -> bool:
    """`/v1/latest` holds every wanted series at (or after) the wanted observation."""
    try:
        answer = await api.get("/v1/latest", params={"metric": "tvl"}, timeout=2.0)
    except httpx.HTTPError:
        return False
    if answer.status_code != 200:
        return False
    have = {item["subject"]: (item["ts"], item["value"]) for item in answer.json()["data"]}
    return all(s in have and (have[s][0] > ts or have[s] == (ts, value))
               for s, (ts, value) in want.items())


@dataclass
class Harness:
    """What every scenario drives: the processes, the API as the workload's user, the ingest
    ledger and the webhook receiver."""

    topology: Topology
    api: httpx.AsyncClient
    api_key: str
    ingestor: Ingestor
    receiver: WebhookReceiver
    static: dict[str, tuple[int, float]]  # STATIC series as stored: (ts, value)

    @property
    def dsn(self) -> str:
        """The suite's PostgreSQL for asyncpg (the test reads alert_history itself)."""
        return self.topology.postgres.url.replace("+asyncpg", "")

    def subscriber(self) -> Subscriber:
        return Subscriber(self.topology.gateway_url, self.api_key)

    def latest_wanted(self, tick: int) -> dict[str, tuple[int, float]]:
        """/v1/latest as it must be once `tick` is processed."""
        return {**self.static,
                **{s: (self.ingestor.ts(tick), self.ingestor.value(tick)) for s in SERIES}}
