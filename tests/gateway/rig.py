"""Test helpers: a real gateway on 127.0.0.1 (ephemeral port) over a real platform, and a small test client.

`Rig` bundles the platform (`open_platform`), a second stream for fired alerts, one or more
gateways and helpers to make keys, produce real events (ingest + processor drain) and connect.
Waits are on frames, with timeouts scaled by DEFIWATCH_TEST_TIMEOUT_FACTOR; no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import TIMEOUT_FACTOR
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.domain import Event, ProtocolMeta
from defiwatch.gateway import Gateway
from defiwatch.store.keys import Principal, authenticate, create_key
from defiwatch.stream import EventStream, MemoryEventStream, RedisEventStream

T0 = 1_710_115_200  # 2024-03-11 00:00 UTC
DAY = 86_400
WAIT = 5.0 * TIMEOUT_FACTOR  # seconds to wait for one expected frame

BASE: dict[str, Any] = {"replay_enabled": False, "demo_key": False, "processor_poll_s": 0.2,
                        "gateway_host": "127.0.0.1", "gateway_port": 0}


def by_rule(event: Event) -> str:
    """The alerts stream's dedup identity: rule and series."""
    return f"{(event.detail or {}).get('rule_id')}|{event.series}"


def point(subject: str, ts: int, value: float, metric: str = "tvl", chain: str = "Ethereum"
          ) -> dict[str, Any]:
    return {"metric": metric, "subject": subject, "chain": chain, "ts": ts, "value": value}


def synthetic(i: int, subject: str = "aave", chain: str = "ethereum", value: float | None = None,
              detail: dict[str, Any] | None = None, type_: str = "tvl_change") -> Event:
    """An event as the processor would emit it, for tests that need many of them quickly."""
    return Event(type=type_, metric="tvl", subject=subject, chain=chain,
                 value=float(i) if value is None else value, previous=1.0, change_abs=1.0,
                 change_pct=5.0, change_1h=None, change_24h=None, change_7d=None, ts=T0 + i,
                 emitted_at=float(T0 + i), source="test", detail=detail)


class Client:
    """A protocol v1 client for tests: frames as dicts, events kept aside while waiting for a
    reply."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self.pending: list[dict[str, Any]] = []  # frames received while waiting for another
        self._ids = 0

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop(0)
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return frame

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def request(self, frame: dict[str, Any] | str, request_id: Any = None
                      ) -> dict[str, Any]:
        """Send a frame and return the reply (ack, pong or error) to its id; other frames
        received meanwhile stay in `pending`, in order."""
        if isinstance(frame, dict) and "id" not in frame:
            self._ids += 1
            frame = {**frame, "id": self._ids}
        if isinstance(frame, dict):
            request_id = frame["id"]
        await self.send(frame)
        skipped: list[dict[str, Any]] = []
        try:
            while True:
                got: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
                if got["type"] in ("ack", "pong", "error") and got.get("id") == request_id:
                    return got
                skipped.append(got)
        finally:
            self.pending += skipped

    async def subscribe(self, channel: str, **options: Any) -> dict[str, Any]:
        reply = await self.request({"type": "subscribe", "channel": channel, **options})
        assert reply["type"] == "ack", reply
        return reply

    async def event(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next event frame (other frame types are skipped)."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == "event":
                return frame

    async def events_until(self, stop: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Event frames up to and including the first for which `stop` is true."""
        got: list[dict[str, Any]] = []
        while True:
            frame = await self.event()
            got.append(frame)
            if stop(frame):
                return got

    async def close_code(self, timeout: float = WAIT) -> int | None:
        """Read until the server closes; return the close code it sent."""
        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.recv()
        await asyncio.wait_for(drain(), timeout)
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


class Rig:
    """A platform with an alerts stream and gateways; see the module docstring."""

    def __init__(self, platform: Platform, alerts: EventStream) -> None:
        self.platform = platform
        self.settings = platform.settings
        self.alerts = alerts
        self.gateways: list[Gateway] = []
        self._processor = platform.processor()
        self._unprocessed = 0  # change_log rows written by helpers, not yet processed

    @property
    def gateway(self) -> Gateway:
        return self.gateways[0]

    async def start_gateway(self, *, options: dict[str, Any] | None = None, **overrides: Any
                            ) -> Gateway:
        """Start one more gateway: `overrides` of settings, `options` of the Gateway itself."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        gateway = Gateway(settings=settings, engine=self.platform.engine,
                          stream=self.platform.stream, cache=self.platform.cache,
                          alerts=self.alerts, **(options or {}))
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def key(self, user: str = "alice", tier: str = "pro",
                  scopes: Sequence[str] = ("read",)) -> tuple[str, Principal]:
        async with self.platform.engine.begin() as conn:
            key, _ = await create_key(conn, user=user, tier=tier, scopes=scopes,
                                      tiers=list(self.settings.tiers))
            principal = await authenticate(conn, key)
        assert principal is not None
        return key, principal

    async def ingest(self, points: Sequence[dict[str, Any]]) -> list[Event]:
        """Store points, run the processor over them, return the events it published."""
        before = await self.platform.stream.last_offset()
        result = await self.platform.ingest.ingest_points(points, source="test")
        assert not result.rejected, result.rejected
        await self._process(result.accepted)
        return (await self.platform.stream.read(before, 10_000)).events

    async def ingest_protocols(self, metas: Sequence[ProtocolMeta], ts: int) -> list[Event]:
        before = await self.platform.stream.last_offset()
        await self._process(await self.platform.ingest.ingest_protocols(metas, ts=ts,
                                                                        source="test"))
        return (await self.platform.stream.read(before, 10_000)).events

    async def _process(self, rows: int) -> None:
        # On PostgreSQL the processor reads only rows of transactions older than the oldest one
        # running anywhere in the cluster (store/changelog.py), so one drain may not see ours
        # yet while another test's transaction is open: drain until our rows are through.
        self._unprocessed += rows
        async with asyncio.timeout(WAIT):
            while True:
                self._unprocessed -= await self._processor.drain()
                if self._unprocessed <= 0:
                    return
                await asyncio.sleep(0.01)

    async def connect(self, key: str | None, *, how: str = "bearer",
                      gateway: Gateway | None = None, welcome: bool = True,
                      **options: Any) -> Client:
        """Connect with the key sent `how`: bearer, x-api-key, query, message or none."""
        gw = gateway or self.gateway
        url, headers = gw.url, {}
        if how == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif how == "x-api-key":
            headers["X-API-Key"] = str(key)
        elif how == "query":
            url += f"?apiKey={key}"
        ws = await connect(url, additional_headers=headers, open_timeout=WAIT,
                           close_timeout=WAIT, **options)
        client = Client(ws)
        if how == "message":
            await client.send({"type": "auth", "api_key": key})
        if welcome:
            frame = await client.recv()
            assert frame["type"] == "welcome", frame
            client.welcome = frame
        return client


@contextlib.asynccontextmanager
async def open_rig(settings: Settings, *, gateway: bool = True) -> AsyncIterator[Rig]:
    async with open_platform(settings) as platform:
        # The platform's own alerts stream when app.py provides one; else one made here.
        alerts: EventStream | None = getattr(platform, "alerts", None)
        own = alerts is None
        if alerts is None:
            alerts = (
                RedisEventStream(platform.redis, prefix=settings.redis_prefix, name="alerts",
                                 retention=settings.alerts_stream_retention, dedup_key=by_rule)
                if platform.redis is not None
                else MemoryEventStream(settings.alerts_stream_retention, dedup_key=by_rule)
            )
        rig = Rig(platform, alerts)
        try:
            if gateway:
                await rig.start_gateway()
            yield rig
        finally:
            for gw in rig.gateways:
                await gw.stop()
            if own:
                await alerts.close()


def embedded_settings(tmp_path: os.PathLike[str], **overrides: Any) -> Settings:
    return Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/defiwatch.db",
                    state_dir=tmp_path, **{**BASE, **overrides})


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait for a condition of server state that no frame announces (e.g. a handler's cleanup
    after the client is gone): checked on every loop turn, bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        # Polling on purpose: the server exposes no event for this, and adding one for tests
        # only would be API nobody else needs.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def small_receive_buffer_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so a client that stops reading pushes back
    on the server quickly (set before connecting: it bounds the TCP window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def tls_client_context(cafile: str, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if maximum is not None:
        context.maximum_version = maximum
    return context
